"""rrhf: the loss on hand-computed cases (ordering, ties, length normalisation, fine-tuning term), its
invariance to candidate order, one training step through a real RunContext, and a learning test."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from rlhf_zoo.errors import ConfigError
from rlhf_zoo.registry import get_registry
from rlhf_zoo.runner import RunContext, run
from rlhf_zoo_plugins import rrhf
from rlhf_zoo_plugins.rrhf import RRHFConfig, rrhf_loss


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

    def recording_loss(logprobs, mask, scores, ft_weight):
        seen.append(scores.shape)
        return rrhf_loss(logprobs, mask, scores, ft_weight)

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
