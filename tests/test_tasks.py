"""The built-in tasks: determinism, tokenizer contract, data formats, reward-model quality, exact math."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlhf_zoo.registry import get_registry
from rlhf_zoo_envs.tasks import exact as E
from rlhf_zoo_envs.tasks import labelers
from rlhf_zoo_envs.tasks.build import build_tokenizer
from rlhf_zoo_envs.tasks.sentiment import SentimentLanguage


@pytest.fixture(scope="session")
def sentiment_task():
    return get_registry().task("sentiment").load(seed=0, progress=False)


@pytest.fixture(scope="session")
def hh_task():
    return get_registry().task("hh").load(seed=0, progress=False)


def test_tokenizer_special_tokens_distinct_and_words_roundtrip():
    tok = build_tokenizer(["the", "movie", "was", "good", "."])
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(ids) == 4
    enc = tok.encode("the movie was good .", add_special_tokens=False)
    assert len(enc) == 5 and tok.decode(enc) == "the movie was good ."
    assert tok.encode("zzz", add_special_tokens=False) == [tok.unk_token_id]


def test_exact_task_build_is_deterministic(exact_task, tmp_path, monkeypatch):
    """Same seed, same artifacts. Weights are bit-identical for the same torch thread count (the order of
    floating-point reductions depends on it), so a cache built with another count is rebuilt first."""
    if exact_task.manifest.get("torch_threads") != torch.get_num_threads():
        monkeypatch.setenv("RLHF_ZOO_CACHE", str(tmp_path / "first"))
        exact_task = get_registry().task("exact").load(seed=0, progress=False)
    monkeypatch.setenv("RLHF_ZOO_CACHE", str(tmp_path / "second"))
    again = get_registry().task("exact").load(seed=0, progress=False)
    assert again.path != exact_task.path
    assert again.prompts("train") == exact_task.prompts("train")
    a, b = exact_task.dataset("pairs"), again.dataset("pairs")
    assert a["chosen"] == b["chosen"] and a["rejected"] == b["rejected"]
    for name in ("sft", "reward"):
        pa = dict(exact_task.load_policy().named_parameters()) if name == "sft" else \
            dict(exact_task.load_reward_model().named_parameters())
        pb = dict(again.load_policy().named_parameters()) if name == "sft" else \
            dict(again.load_reward_model().named_parameters())
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_exact_enumeration_is_a_distribution(exact_task):
    space = exact_task.space
    assert len(space.texts) == sum(3**n for n in range(E.MAX_NEW_TOKENS)) + 3**E.MAX_NEW_TOKENS  # 40 + 81
    lp = E.policy_logprobs(exact_task.load_policy(), exact_task, exact_task.prompts("eval"), space)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(lp.shape[0], dtype=torch.float64), atol=1e-5)


def test_exact_optimal_policy_is_the_kl_regularised_argmax(exact_task):
    """pi*_beta maximises E[r] - beta KL; any perturbation does worse (checked on random mixtures)."""
    ref = E.policy_logprobs(exact_task.load_policy(), exact_task, exact_task.prompts("eval"), exact_task.space)
    r = exact_task.exact_rewards
    beta = 0.5

    def objective(lp):
        return float((E.expected(lp, r) - beta * E.kl(lp, ref)).mean())

    best = E.optimal_logprobs(ref, r, beta)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        other = torch.log_softmax(best + 0.3 * torch.randn(best.shape, generator=gen, dtype=torch.float64), -1)
        assert objective(other) < objective(best)
    # beta -> infinity gives pi_ref, beta -> 0 puts all mass on the argmax reward
    assert torch.allclose(E.optimal_logprobs(ref, r, 1e6).exp(), ref.exp(), atol=1e-5)
    assert torch.allclose(E.expected(E.optimal_logprobs(ref, r, 1e-4), r), r.max(-1).values, atol=1e-3)


def test_best_of_n_exact_distribution_and_kl_bound(exact_task):
    ref = E.policy_logprobs(exact_task.load_policy(), exact_task, exact_task.prompts("eval"), exact_task.space)
    r = exact_task.exact_rewards
    assert torch.allclose(E.best_of_n_logprobs(ref, r, 1).exp(), ref.exp(), atol=1e-12)  # N = 1 is pi_ref
    for n in (2, 4, 16):
        bon = E.best_of_n_logprobs(ref, r, n)
        assert torch.allclose(bon.exp().sum(-1), torch.ones(9, dtype=torch.float64), atol=1e-9)
        kl = E.kl(bon, ref)
        assert (kl <= E.best_of_n_kl_bound(n) + 1e-9).all()
        # the frontier dominates best-of-N at the same KL
        assert E.frontier_reward(ref, r, float(kl.mean())) >= float(E.expected(bon, r).mean()) - 1e-6


def test_best_of_n_ties_split_in_proportion_to_reference():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    scores = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    p = E.best_of_n_logprobs(ref, scores, 2).exp()[0]
    # P(best in tie group) = 1 - 0.5^2 = 0.75, split 1:1 by pi_ref; the low one only if both draws are it
    assert torch.allclose(p, torch.tensor([0.25, 0.375, 0.375], dtype=torch.float64))
    assert math.isclose(E.best_of_n_kl_bound(2), math.log(2) - 0.5)


def test_labeler_calibration_hits_target_agreement():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(500, 4))
    tau = labelers.calibrate_temperature(gold, 0.7)
    assert abs(labelers.agreement(gold, tau) - 0.7) < 1e-6
    # empirical agreement of two simulated labelers on the same items matches the expectation
    agree = total = 0
    for g in gold:
        o1, _ = labelers.rank(g, tau, rng)
        o2, _ = labelers.rank(g, tau, rng)
        r1, r2 = np.argsort(o1), np.argsort(o2)
        for i in range(4):
            for j in range(i + 1, 4):
                agree += (r1[i] < r1[j]) == (r2[i] < r2[j])
                total += 1
    assert abs(agree / total - 0.7) < 0.04


def test_sentiment_gold_hand_computed_cases():
    lang = SentimentLanguage()
    g = {r: lang.gold("the movie was", r)["gold_reward"] for r in
         ["good .", "very good .", "not good .", "bad .", "not bad .", "bad but great .", "", "good good ."]}
    assert math.isclose(g["good ."], 2 * math.tanh(0.5))
    assert math.isclose(g["very good ."], 2 * math.tanh(0.75))
    assert math.isclose(g["not good ."], 2 * math.tanh(-0.3))
    assert math.isclose(g["not bad ."], -g["not good ."])
    assert math.isclose(g["bad but great ."], 2 * math.tanh((-0.5 + 1.5) / 2))
    assert g[""] == -2.0
    assert g["good good ."] < g["good ."]


def test_sentiment_gold_costs_verbosity_that_the_labelers_reward():
    lang = SentimentLanguage()
    short = "good . the film was great ."  # 7 tokens: no verbosity cost
    long = "good . the film was great . the plot is fun ."  # 12 tokens: 2 beyond the 10th
    quality = {short: 2 * math.tanh(1.0), long: 2 * math.tanh(1.5)}
    for r, n, excess in ((short, 7, 0), (long, 12, 2)):
        assert math.isclose(lang.gold("the movie was", r)["gold_reward"], quality[r] - 0.3 * excess)
        assert math.isclose(lang.labeler_view("the movie was", r)["gold_reward"], quality[r] + 0.1 * n)
    # the labelers prefer the longer review; the gold prefers the shorter one
    assert lang.labeler_view("", long)["gold_reward"] > lang.labeler_view("", short)["gold_reward"]
    assert lang.gold("", long)["gold_reward"] < lang.gold("", short)["gold_reward"]


def test_rankings_keep_the_gold_while_labelers_rank_what_they_perceive(sentiment_task):
    ranks = sentiment_task.dataset("rankings_reward").select(range(50))
    lang = sentiment_task.language
    for p, rs, gold in zip(ranks["prompt"], ranks["responses"], ranks["gold"], strict=True):
        assert gold == [lang.gold(p, r)["gold_reward"] for r in rs]
    # over the rankings, the labelers' first choice is longer than their last (revision 0's unbiased
    # labelers: 0.91 tokens shorter; revision 1: 0.96 longer)
    ranks = sentiment_task.dataset("rankings_reward")
    first = np.mean([len(rs[0].split()) for rs in ranks["responses"]])
    last = np.mean([len(rs[-1].split()) for rs in ranks["responses"]])
    assert first - last > 0.5


@pytest.mark.parametrize("name,threshold", [("sentiment", 0.75), ("hh", 0.75)])
def test_reward_models_beat_chance_against_gold(name, threshold, sentiment_task, hh_task):
    task = {"sentiment": sentiment_task, "hh": hh_task}[name]
    for rm in task.manifest["reward_models"].values():
        assert rm["heldout_gold_accuracy"] > threshold
    for stats in task.manifest["labelers"].values():
        assert abs(stats["inter_labeler_agreement"] - 0.7) < 0.01


def test_task_datasets_have_documented_columns(sentiment_task):
    pairs = sentiment_task.dataset("pairs")
    assert set(pairs.column_names) >= {"prompt", "chosen", "rejected", "margin", "level"}
    assert all(c != r for c, r in zip(pairs["chosen"], pairs["rejected"], strict=True))
    ranks = sentiment_task.dataset("rankings_reward")
    k = len(ranks[0]["responses"])
    assert all(len(m) == k * (k - 1) // 2 for m in ranks["margins"])
    assert set(np.unique(np.concatenate(ranks["levels"]))) <= {0, 1, 2, 3}
    manifest = json.loads((sentiment_task.path / "manifest.json").read_text())
    assert manifest["pairs"]["kept"] == len(pairs)


def test_hh_proxy_is_llama2_combination(hh_task):
    rf = hh_task.proxy_reward()
    prompts = ["user : how do i steal car ?", "user : how do i bake bread ?"]
    responses = ["assistant : sorry , i can not help with that .", "assistant : sure . first get the flour ."]
    p_ids, p_mask = hh_task.encode_prompts(prompts)
    r_ids, r_mask = hh_task.encode_responses(responses)
    ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
    c = rf.components(ids, mask, p_ids.shape[1])
    assert c["is_safety"].tolist() == [True, False]
    assert torch.equal(c["combined"][0], c["safety"][0])  # safety prompt -> safety score
    expect = c["safety"][1] if torch.sigmoid(c["safety"][1]) < 0.15 else c["helpful"][1]
    assert torch.equal(c["combined"][1], expect)
    gold = hh_task.gold(prompts, responses)
    assert set(gold) == {"gold_reward", "helpfulness", "harmlessness"}
