"""rrhf: the loss on hand-computed cases (ordering, ties, length normalisation, fine-tuning term), its
invariance to candidate order, one training step through a real RunContext, and a learning test; the
candidate sources (sample, beam, diverse-beam, dataset) mixed, rank_weight 0 (learning from best-of-N),
IP-n rounds and the KL term."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import pytest
import torch

from rlhf_zoo.beam import beam_search
from rlhf_zoo.cli import build_cli
from rlhf_zoo.conformance import CHECKS, check_algorithm
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.ops import response_logprobs
from rlhf_zoo.registry import get_registry
from rlhf_zoo.runner import RunContext, run
from rlhf_zoo_plugins import rrhf
from rlhf_zoo_plugins.rrhf import RRHFConfig, logprobs_and_kl, parse_candidates, rrhf_loss, spread


def candidates(per_token: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt whose candidates have the given per-token log-probs (ragged; padding gets -inf, which
    the mask must keep out).  -> logprobs (1, K, T), mask (1, K, T)"""
    T = max(map(len, per_token))
    lp = torch.full((1, len(per_token), T), float("-inf"))
    mask = torch.zeros((1, len(per_token), T), dtype=torch.long)
    for k, row in enumerate(per_token):
        lp[0, k, : len(row)] = torch.tensor(row)
        mask[0, k, : len(row)] = 1
    return lp, mask


def test_rrhf_loss_rank_term_zero_when_model_order_agrees():
    lp, mask = candidates([[-3.0], [-2.0], [-1.0]])  # p = -3 < -2 < -1, like the scores
    _, stats = rrhf_loss(lp, mask, torch.tensor([[0.0, 1.0, 2.0]]), ft_weight=0.0)
    assert stats["rank_loss"].item() == 0.0
    assert stats["correct_pairs"].item() == 1.0
    assert stats["pairs"].item() == 3


def test_rrhf_loss_rank_term_hand_computed_when_order_reversed():
    lp, mask = candidates([[-1.0], [-2.0], [-3.0]])  # p = -1 > -2 > -3, scores increase: all wrong
    loss, stats = rrhf_loss(lp, mask, torch.tensor([[0.0, 1.0, 2.0]]), ft_weight=0.0)
    # pairs (0<1): -1 - -2 = 1; (0<2): -1 - -3 = 2; (1<2): -2 - -3 = 1
    assert loss.item() == pytest.approx(4.0)
    assert stats["rank_loss"].item() == pytest.approx(4.0)
    assert stats["correct_pairs"].item() == 0.0


def test_rrhf_loss_ties_make_no_pair():
    lp, mask = candidates([[-1.0], [-2.0], [-3.0]])
    loss, stats = rrhf_loss(lp, mask, torch.tensor([[1.0, 1.0, 2.0]]), ft_weight=0.0)
    # (0, 1) tie: no pair, though p_0 > p_1; (0<2): 2; (1<2): 1
    assert loss.item() == pytest.approx(3.0)
    assert stats["pairs"].item() == 2
    all_tied, stats = rrhf_loss(lp, mask, torch.zeros(1, 3), ft_weight=0.0)
    assert all_tied.item() == 0.0 and stats["pairs"].item() == 0 and stats["correct_pairs"].item() == 0.0


def test_rrhf_loss_length_normalises_the_model_score():
    # A: four tokens at -1 (sum -4, mean -1); B: one token at -3 (sum -3, mean -3); the RM prefers B.
    lp, mask = candidates([[-1.0, -1.0, -1.0, -1.0], [-3.0]])
    loss, stats = rrhf_loss(lp, mask, torch.tensor([[0.0, 1.0]]), ft_weight=1.0)
    # mean log-probs: max(0, -1 - -3) = 2 (summed log-probs would give max(0, -4 - -3) = 0); ft: NLL of B = 3
    assert stats["rank_loss"].item() == pytest.approx(2.0)
    assert stats["ft_loss"].item() == pytest.approx(3.0)
    assert loss.item() == pytest.approx(5.0)
    assert math.isfinite(loss.item())


def test_rrhf_loss_ft_term_equals_naive_nll_of_first_best():
    gen = torch.Generator().manual_seed(0)
    B, K, T = 3, 4, 5
    lp = -torch.rand(B, K, T, generator=gen) * 3
    lengths = torch.randint(1, T + 1, (B, K), generator=gen)
    mask = (torch.arange(T)[None, None, :] < lengths[..., None]).long()
    scores = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 3.0], [0.0, 0.1, 0.2, 0.3]])
    _, stats = rrhf_loss(lp, mask, scores, ft_weight=1.0)
    first_best = [1, 0, 3]  # ties go to the first index
    naive = []
    for b, k in enumerate(first_best):
        n = int(lengths[b, k])
        naive.append(-sum(float(lp[b, k, t]) for t in range(n)) / n)
    assert stats["ft_loss"].item() == pytest.approx(sum(naive) / B, rel=1e-6)
    # and the total is rank + ft_weight * ft
    loss, stats = rrhf_loss(lp, mask, scores, ft_weight=2.5)
    assert loss.item() == pytest.approx(stats["rank_loss"].item() + 2.5 * stats["ft_loss"].item(), rel=1e-6)


def test_rrhf_loss_rank_term_matches_naive_pair_loop():
    gen = torch.Generator().manual_seed(1)
    B, K, T = 2, 5, 4
    lp = -torch.rand(B, K, T, generator=gen) * 2
    mask = torch.ones(B, K, T, dtype=torch.long)
    mask[:, :, 3] = 0
    scores = torch.tensor([[0.0, 1.0, 1.0, 2.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    _, stats = rrhf_loss(lp, mask, scores, ft_weight=0.0)
    p = lp[:, :, :3].mean(-1)
    naive = sum(max(0.0, float(p[b, i] - p[b, j])) for b in range(B)
                for i, j in itertools.permutations(range(K), 2) if scores[b, i] < scores[b, j]) / B
    assert stats["rank_loss"].item() == pytest.approx(naive, rel=1e-6)


def test_rrhf_loss_invariant_to_candidate_order():
    gen = torch.Generator().manual_seed(2)
    B, K, T = 3, 6, 7
    lp = (-torch.rand(B, K, T, generator=gen) * 4).requires_grad_(True)
    mask = (torch.arange(T)[None, None, :] < torch.randint(1, T + 1, (B, K, 1), generator=gen)).long()
    scores = torch.randn(B, K, generator=gen)
    loss, stats = rrhf_loss(lp, mask, scores)
    for seed in range(3):
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
        loss_p, stats_p = rrhf_loss(lp[:, perm], mask[:, perm], scores[:, perm])
        assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)
        for key in stats:
            assert stats_p[key].item() == pytest.approx(stats[key].item(), rel=1e-6)


def test_rrhf_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="candidates"):
        RRHFConfig(candidates=1)
    with pytest.raises(ConfigError, match="ft_weight"):
        RRHFConfig(ft_weight=-1.0)
    with pytest.raises(ConfigError, match="learning_rate"):
        RRHFConfig(learning_rate=0.0)


def make_ctx(task, tmp_path, **options) -> RunContext:
    registry = get_registry()
    reference = task.load_policy().requires_grad_(False)
    return RunContext(registry.algorithm("rrhf"), RRHFConfig(**options), task, 0, torch.device("cpu"), tmp_path,
                      registry, task.load_policy(), reference, task.reward_function(),
                      torch.Generator().manual_seed(0), show_progress=False)


def test_rrhf_train_one_step_changes_every_parameter_and_not_the_reference(exact_task, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    ctx = make_ctx(exact_task, tmp_path, iterations=1, epochs=1, prompts_per_iteration=4, candidates=4, ft_weight=1.0,
                   learning_rate=1e-3)
    sft = exact_task.load_policy().state_dict()
    result = rrhf.train(ctx, ctx.config)
    assert result.model is ctx.policy
    for name, param in ctx.policy.named_parameters():
        assert not torch.equal(param.detach(), sft[name]), f"{name} did not change"
    for name, param in ctx.reference.state_dict().items():
        assert torch.equal(param, sft[name]), f"reference {name} changed"
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    for key in ("loss", "rank_loss", "ft_loss", "mean_score", "best_score", "correct_pairs", "kl"):
        assert math.isfinite(row[key]), key
    assert row["loss"] == pytest.approx(row["rank_loss"] + row["ft_loss"], rel=1e-5)
    assert ctx.counters["generated_tokens"] > 0
    assert ctx.counters["trained_tokens"] > ctx.counters["generated_tokens"]  # prompt tokens are fed too


def test_rrhf_train_adds_the_dataset_responses_of_each_prompt(exact_task, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("")
    seen = []

    def recording_loss(logprobs, mask, scores, ft_weight, **kwargs):
        seen.append(scores.shape)
        return rrhf_loss(logprobs, mask, scores, ft_weight, **kwargs)

    monkeypatch.setattr(rrhf, "rrhf_loss", recording_loss)
    data = rrhf.dataset_responses(exact_task)
    assert all(p in data for p in exact_task.prompts("train"))
    m = len(next(iter(data.values()))[0])
    ctx = make_ctx(exact_task, tmp_path, iterations=2, epochs=1, prompts_per_iteration=3, candidates=2,
                   dataset_candidates=True)
    rrhf.train(ctx, ctx.config)
    assert seen == [torch.Size([3, 2 + m])] * 2
    assert ctx.counters["generated_tokens"] <= 2 * 3 * 2 * exact_task.max_new_tokens  # only policy samples


@pytest.mark.slow
def test_rrhf_quick_beats_sft_on_sentiment(tmp_path):
    summary = run("rrhf", task="sentiment", preset="quick", seed=0, out=tmp_path, device="cpu", progress=False)
    assert summary["gold_reward"] > summary["baseline_gold_reward"]
    assert summary["proxy_reward"] > summary["baseline_proxy_reward"]
    assert summary["trained_tokens"] > 0 and summary["generated_tokens"] > 0


# --- candidate sources, rank weight, rounds and the KL term (issue 11) ------------------------------------
def test_rrhf_candidates_spec_parses_and_the_old_forms_still_work():
    assert parse_candidates("sample:4,beam:2,diverse-beam:2,dataset:2") == [
        ("sample", 4), ("beam", 2), ("diverse-beam", 2), ("dataset", 2)]
    assert parse_candidates(" beam:3 , dataset ") == [("beam", 3), ("dataset", 0)]  # bare dataset: the whole ranking
    assert RRHFConfig(candidates=4).sources() == [("sample", 4)]  # the old count, from a config file
    assert RRHFConfig(candidates="3").sources() == [("sample", 3)]  # ... and from the command line
    assert RRHFConfig(candidates=2, dataset_candidates=True).sources() == [("sample", 2), ("dataset", 0)]
    assert RRHFConfig(candidates="dataset").sources() == [("dataset", 0)]  # a ranking has >= 2 responses
    assert RRHFConfig().sources() == [("sample", 4)]


@pytest.mark.parametrize("options, match", [
    ({"candidates": "greedy:2"}, "unknown source 'greedy'"),
    ({"candidates": "sample:2,sample:2"}, "given twice"),
    ({"candidates": "beam"}, "needs a count"),
    ({"candidates": "beam:0,sample:2"}, "must be >= 1"),
    ({"candidates": "beam:1"}, ">= 2 candidates"),
    ({"candidates": "diverse-beam:3"}, "multiple of beam_groups=2"),
    ({"candidates": "sample:2,dataset:2", "dataset_candidates": True}, "give only one"),
    ({"rounds": 41}, "rounds"),
    ({"rank_weight": -1.0}, "rank_weight"),
    ({"kl_coef": -0.1}, "kl_coef"),
    ({"rank_weight": 0.0, "ft_weight": 0.0}, "all 0"),
])
def test_rrhf_config_rejects_bad_candidates_and_weights(options, match):
    with pytest.raises(ConfigError, match=match):
        RRHFConfig(**options)


def test_rrhf_help_documents_every_option(capsys):
    rc = build_cli().commands["run"].main(["rrhf", "--help"], prog_name="zoo run", standalone_mode=False)
    assert rc == 0
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # undo click's wrapping (at hyphens too)
    for f in dataclasses.fields(RRHFConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert re.sub(r"-\s+", "-", " ".join(f.metadata["help"].split())) in text, f.name
    assert "[default: 4]" in text  # sample:4, stored as 4 as before sources existed (bench results stay reusable)


def test_spread_takes_the_best_and_the_worst_first():
    ranking = ["a", "b", "c", "d"]  # best first
    assert spread(ranking, 1) == ["a"]
    assert spread(ranking, 2) == ["a", "d"]  # the chosen / rejected pair
    assert spread(ranking, 3) == ["a", "c", "d"]
    assert spread(ranking, 4) == ranking


def test_rrhf_loss_rank_weight_zero_is_only_the_ft_term():
    gen = torch.Generator().manual_seed(3)
    lp = (-torch.rand(2, 4, 5, generator=gen) * 3).requires_grad_(True)
    mask = torch.ones(2, 4, 5, dtype=torch.long)
    scores = torch.tensor([[0.0, 2.0, 1.0, -1.0], [1.0, 0.5, 0.0, 3.0]])  # best: 1 and 3
    loss, stats = rrhf_loss(lp, mask, scores, ft_weight=2.0, rank_weight=0.0)
    assert stats["rank_loss"].item() > 0  # the hinge is still measured and logged ...
    assert loss.item() == pytest.approx(2.0 * stats["ft_loss"].item(), rel=1e-6)  # ... but not trained
    loss.backward()
    grad_rows = lp.grad.abs().sum(-1)  # (2, 4): only the best candidate of each prompt gets a gradient
    assert grad_rows[0].nonzero().flatten().tolist() == [1]
    assert grad_rows[1].nonzero().flatten().tolist() == [3]
    full, full_stats = rrhf_loss(lp, mask, scores, ft_weight=2.0, rank_weight=0.5)
    assert full.item() == pytest.approx(0.5 * full_stats["rank_loss"].item() + 2.0 * full_stats["ft_loss"].item(),
                                        rel=1e-6)


def test_rrhf_train_mixed_sources_give_the_right_candidates_per_prompt(exact_task, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("")
    seen, searched = [], []

    def recording_loss(logprobs, mask, scores, ft_weight, **kwargs):
        seen.append((logprobs.shape, mask.detach().clone(), scores.clone()))
        return rrhf_loss(logprobs, mask, scores, ft_weight, **kwargs)

    def recording_search(*args, **kwargs):
        out = beam_search(*args, **kwargs)
        searched.append((kwargs["num_groups"], out))
        return out

    monkeypatch.setattr(rrhf, "rrhf_loss", recording_loss)
    monkeypatch.setattr(rrhf, "beam_search", recording_search)
    ctx = make_ctx(exact_task, tmp_path, iterations=2, epochs=1, prompts_per_iteration=3,
                   candidates="sample:2,beam:2,diverse-beam:2,dataset:2")
    rrhf.train(ctx, ctx.config)
    assert [s[0][:2] for s in seen] == [torch.Size([3, 8])] * 2  # 2 + 2 + 2 + 2 per prompt, every iteration
    assert [g for g, _ in searched] == [1, 2] * 2  # beam, then diverse beam (2 groups), each iteration
    T = exact_task.max_new_tokens
    for it in range(2):
        _, mask, scores = seen[it]
        beam, diverse = searched[2 * it][1], searched[2 * it + 1][1]
        assert torch.equal(mask[:, 2:4], beam.response_mask)  # the beams sit after the samples, in spec order
        assert torch.equal(mask[:, 4:6], diverse.response_mask)
        assert mask.shape[-1] == T and torch.isfinite(scores).all()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("score_sample", "score_beam", "score_diverse_beam", "score_dataset", "kl", "mean_score"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert "kl_term" not in rows[0] and "round" not in rows[0]


def test_rrhf_train_without_samples_uses_only_deterministic_sources(exact_task, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    ctx = make_ctx(exact_task, tmp_path, iterations=1, epochs=1, prompts_per_iteration=2, candidates="beam:2,dataset:2")
    rrhf.train(ctx, ctx.config)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert "kl" not in row and "score_sample" not in row  # no samples: no behaviour log-probs to measure
    assert 0 < ctx.counters["generated_tokens"] <= 2 * 2 * exact_task.max_new_tokens  # the beams returned


def test_rrhf_train_rank_weight_zero_trains_only_the_ft_term(exact_task, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    ctx = make_ctx(exact_task, tmp_path, iterations=2, epochs=1, prompts_per_iteration=4, rank_weight=0.0,
                   ft_weight=1.0, learning_rate=1e-3)
    rrhf.train(ctx, ctx.config)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["loss"] == pytest.approx(row["ft_loss"], rel=1e-6)
        assert math.isfinite(row["rank_loss"])


def test_rrhf_rounds_sample_a_frozen_policy_per_round_and_add_the_kl_term_from_round_two(exact_task, tmp_path,
                                                                                           monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("")
    samplers = []
    real_collect = rrhf.collect

    def recording_collect(ctx, env, model, idx):
        samplers.append(next(model.parameters()).detach().clone())
        return real_collect(ctx, env, model, idx)

    monkeypatch.setattr(rrhf, "collect", recording_collect)
    ctx = make_ctx(exact_task, tmp_path, iterations=4, rounds=2, kl_coef=0.5, epochs=1, prompts_per_iteration=4,
                   learning_rate=1e-2, candidates="sample:2,beam:2")
    sft = next(exact_task.load_policy().parameters()).detach()
    rrhf.train(ctx, ctx.config)
    # round 1 (iterations 1-2) samples the SFT policy; round 2 (3-4) the policy after iteration 2, frozen
    assert torch.equal(samplers[0], sft) and torch.equal(samplers[1], sft)
    assert torch.equal(samplers[2], samplers[3]) and not torch.equal(samplers[2], sft)
    assert not torch.equal(next(ctx.policy.parameters()).detach(), samplers[3])  # the policy moved on
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 1, 2, 2]
    assert ["kl_term" in r for r in rows] == [False, False, True, True]
    for r in rows[2:]:
        assert math.isfinite(r["kl_term"]) and r["kl_term"] > 0
        assert r["loss"] == pytest.approx(r["rank_loss"] + 10.0 * r["ft_loss"] + 0.5 * r["kl_term"], rel=1e-5)


def test_rrhf_kl_term_is_the_exact_kl_and_pulls_toward_the_reference(exact_task):
    task = exact_task
    reference = task.load_policy().requires_grad_(False).eval()
    policy = task.load_policy().eval()
    p_ids, p_mask = task.encode_prompts(task.prompts("eval")[:3], "cpu")
    r_ids, r_mask = task.encode_responses(["x y", "z", "y y x"], task.max_new_tokens, "cpu")
    args = (p_ids, p_mask, r_ids, r_mask, 0.8, task.suppress_ids)
    lp, kl = logprobs_and_kl(policy, reference, *args)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)  # policy == reference
    assert torch.allclose(lp, response_logprobs(policy, *args), atol=1e-6)
    with torch.no_grad():
        for q in policy.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    lp, kl = logprobs_and_kl(policy, reference, *args)
    # the exact KL of the next-token distributions at one position, computed naively
    ids = torch.cat([p_ids, r_ids], 1)[0:1]
    mask = torch.cat([p_mask, r_mask], 1)[0:1]
    P = p_ids.shape[1]

    def dist(model):
        logits = model(input_ids=ids, attention_mask=mask).logits[0, P].double() / 0.8  # predicts response token 1
        logits[list(task.suppress_ids)] = float("-inf")
        return torch.log_softmax(logits, -1)

    with torch.no_grad():
        lp_pol, lp_ref = dist(policy), dist(reference)
    keep = torch.isfinite(lp_pol)
    naive = float((lp_pol.exp()[keep] * (lp_pol[keep] - lp_ref[keep])).sum())
    assert kl[0, 1].item() == pytest.approx(naive, rel=1e-4)
    assert (kl[r_mask.bool()] > 0).all() and (kl[~r_mask.bool()] == 0).all()
    # gradient steps on the KL term alone bring the policy back toward the reference
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    before = kl.sum().item()
    for _ in range(20):
        _, kl = logprobs_and_kl(policy, reference, *args)
        opt.zero_grad()
        kl.sum().backward()
        opt.step()
    after = logprobs_and_kl(policy, reference, *args)[1].sum().item()
    assert math.isfinite(after) and after < 0.7 * before


def test_rrhf_mixed_sources_with_rounds_pass_the_conformance_kit(tmp_path):
    results = check_algorithm("rrhf", tmp_path, options={
        "candidates": "sample:1,beam:1,diverse-beam:2,dataset:2", "iterations": 3, "rounds": 2, "kl_coef": 0.5})
    assert [(r.name, r.status) for r in results] == [(c, "PASS") for c in CHECKS], results
