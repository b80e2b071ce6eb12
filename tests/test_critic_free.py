"""RLOO and GRPO (plugins/critic_free.py): the group math by hand, the DESIGN.md section 8 invariants that
apply (first minibatch, KL term, degenerate batches), the conformance kit, 2 ranks = 1 rank, and (slow)
learning on ``sentiment`` and ``exact``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import critic_free_worker as cw
import numpy as np
import pytest
import torch
from distributed_worker import save_rollout
from safetensors.torch import load_file

from rlhf_zoo.conformance import check_algorithm
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.ops.advantages import group_advantages, rloo_advantages
from rlhf_zoo.ops.policy_losses import clipped_policy_loss, sequence_aggregation_weights
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.rollout import collect, draw_prompts
from rlhf_zoo.runner import make_context, run
from rlhf_zoo.training import optimizer_step
from rlhf_zoo_plugins.critic_free import (
    GRPOConfig,
    RLOOConfig,
    group_loss,
    grpo_sequence_advantages,
    rloo_sequence_advantages,
)

HERE = Path(__file__).resolve().parent
TINY = {"iterations": 2, "prompts_per_iteration": 4, "k": 3, "eval_prompts": 2, "eval_samples": 1}


# --- the group math ------------------------------------------------------------------------------------
def test_rloo_baseline_is_the_mean_of_the_other_samples():
    returns = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 60.0]])
    # sample 0 of prompt 0: 1 - (2 + 3) / 2 = -1.5; sample 2 of prompt 1: 60 - (10 + 20) / 2 = 45
    assert rloo_advantages(returns).tolist() == [[-1.5, 0.0, 1.5], [-30.0, -15.0, 45.0]]
    assert rloo_advantages(torch.tensor([[1.0, 4.0]])).tolist() == [[-3.0, 3.0]]  # K = 2: the other one
    # K/(K-1) (R - mean): not the plain mean baseline, which would include the sample itself
    assert torch.allclose(rloo_advantages(returns), 1.5 * (returns - returns.mean(-1, keepdim=True)))
    assert torch.equal(rloo_advantages(returns).sum(-1), torch.zeros(2))
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(torch.ones(3, 1))


def test_group_advantages_hand_computed():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 2.0]])
    # both rows have mean 2; unbiased std: row 0 sqrt((1 + 0 + 1) / 2) = 1, row 1 sqrt((4 + 4 + 0) / 2) = 2
    out = group_advantages(scores, normalize_std=True, eps=1e-4)
    assert torch.allclose(out, torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 2.0, 0.0]]) / torch.tensor([[1.0001], [2.0001]]))
    dr = group_advantages(scores, normalize_std=False)
    assert dr.tolist() == [[-1.0, 0.0, 1.0], [-2.0, 2.0, 0.0]]  # Dr. GRPO: only centred


@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3, 123.456, -2.5, 0.0])
@pytest.mark.parametrize("k", [2, 5, 7, 8])
def test_group_advantages_are_exactly_zero_for_equal_rewards(value, k):
    scores = torch.tensor([[value] * k, [float(i) for i in range(k)]])
    for normalize in (True, False):
        out = group_advantages(scores, normalize_std=normalize)
        assert torch.equal(out[0], torch.zeros(k))  # (r - mean) rounds to ~1e-8; / (0 + eps) must not inflate it
        assert (out[1] != 0).sum() >= k - 1
    assert torch.equal(group_advantages(torch.tensor([[3.0]])), torch.zeros(1, 1))  # a group of one


def test_sequence_aggregation_weights_hand_computed():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert sequence_aggregation_weights(mask, "sum").tolist() == mask.float().tolist()
    assert sequence_aggregation_weights(mask, "mean").tolist() == [[0.5, 0.5, 0, 0], [0.25] * 4, [0.0] * 4]
    assert sequence_aggregation_weights(mask, "constant", max_len=8).tolist() == [[0.125, 0.125, 0, 0], [0.125] * 4,
                                                                                 [0.0] * 4]
    with pytest.raises(ValueError, match="max_len"):
        sequence_aggregation_weights(mask, "constant")


def test_clipped_policy_loss_weights_scale_each_token_before_the_reduction():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 0.5], [1.0, 1.0]]))
    adv = torch.ones(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    w = sequence_aggregation_weights(mask, "mean")  # [[.5, .5], [1, 0]]
    out = clipped_policy_loss(new, old, adv, mask, 0.2, normalizer=2.0, weights=w)
    # row 0: mean of -min(1.5, 1.2) and -min(0.5, 0.8) = -(1.2 + 0.5) / 2; row 1: -1; then the mean of the rows
    assert out.loss.item() == pytest.approx((-(1.2 + 0.5) / 2 - 1.0) / 2)
    assert out.clipfrac.item() == pytest.approx(1 / 3)  # statistics stay token means


# --- the plugin's loss on real rollouts of the exact task ----------------------------------------------
def _ctx(algo, tmp_path, **options):
    return make_context(algo, task="exact", out=tmp_path / algo, device="cpu", options={**TINY, **options},
                        progress=False)


def _rollout(ctx, n_prompts=4, seed=0):
    env = ctx.make_env(n_prompts * ctx.config.k)
    idx = draw_prompts(np.random.default_rng(seed), len(ctx.task.prompts("train")), n_prompts, ctx.config.k)
    return collect(ctx, env, ctx.policy, idx)


@pytest.mark.parametrize(("algo", "options"), [("rloo", {}), ("grpo", {}), ("grpo", {"loss_type": "dr_grpo"})])
def test_first_minibatch_has_ratio_one_clipfrac_zero_and_kl_zero(exact_task, tmp_path, algo, options):
    ctx = _ctx(algo, tmp_path, **options)
    r = _rollout(ctx)
    adv = torch.randn(len(r.scores), generator=torch.Generator().manual_seed(0))
    loss, pl, kl_loss = group_loss(ctx, ctx.config, ctx.policy, r, adv, float(len(r.scores)))
    assert torch.isfinite(loss)
    assert pl.ratio_mean.item() == pytest.approx(1.0, abs=1e-5)
    assert pl.clipfrac.item() == 0.0
    assert abs(pl.approx_kl.item()) < 1e-6
    assert abs(kl_loss.item()) < 1e-6  # the policy starts as the reference: k3 KL 0


def test_grpo_and_dr_grpo_aggregate_as_specified(exact_task, tmp_path):
    """At ratio 1 the surrogate is -1/N sum_i A_i sum_t w_it: GRPO's per-sequence mean gives -mean(A);
    Dr. GRPO's constant divides every sequence's sum by max_new_tokens, so it weights A_i by |y_i| / L."""
    grpo, dr = _ctx("grpo", tmp_path), _ctx("grpo", tmp_path / "dr", loss_type="dr_grpo")
    r = _rollout(grpo)
    r.scores = torch.tensor([0.0, 1.0, 5.0]).repeat(4)  # distinct rewards, the same in every group
    adv_grpo, _ = grpo_sequence_advantages(grpo, grpo.config, r)
    adv_dr, _ = grpo_sequence_advantages(dr, dr.config, r)
    std = torch.tensor([0.0, 1.0, 5.0]).std().item()
    assert torch.allclose(adv_grpo, (torch.tensor([-2.0, -1.0, 3.0]) / (std + 1e-4)).repeat(4))
    assert torch.allclose(adv_dr, torch.tensor([-2.0, -1.0, 3.0]).repeat(4))  # no std division
    lengths = r.response_mask.sum(-1).float()
    n = float(len(r.scores))
    loss_grpo, _, _ = group_loss(grpo, grpo.config, grpo.policy, r, adv_grpo, n)
    loss_dr, _, _ = group_loss(dr, dr.config, dr.policy, r, adv_dr, n)
    nonempty = (lengths > 0).float()
    assert loss_grpo.item() == pytest.approx(-(adv_grpo * nonempty).sum().item() / n, abs=1e-5)
    assert loss_dr.item() == pytest.approx(-(adv_dr * lengths).sum().item() / (n * dr.max_new_tokens), abs=1e-5)


def test_rloo_returns_are_the_environments_kl_shaped_reward(exact_task, tmp_path):
    ctx = _ctx("rloo", tmp_path, normalize_advantages=False)
    r = _rollout(ctx)
    adv, sums = rloo_sequence_advantages(ctx, ctx.config, r)
    returns = r.rewards.sum(-1)  # what the environment paid: score - beta * sum_t k1
    assert sums["return"].item() == pytest.approx(returns.sum().item(), abs=1e-5)
    assert torch.allclose(adv, rloo_advantages(returns.view(-1, 3)).view(-1), atol=1e-6)
    whitened, _ = rloo_sequence_advantages(ctx, RLOOConfig(**TINY), r)  # over the whole batch: variance 1
    assert (whitened.square().sum() / (len(whitened) - 1)).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(whitened / whitened.norm(), adv / adv.norm(), atol=1e-5)  # a rescaling: mean already 0


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_losses_are_finite_for_one_prompt_equal_rewards_and_empty_responses(exact_task, tmp_path, algo):
    ctx = _ctx(algo, tmp_path, prompts_per_iteration=1, k=2, minibatches=1)
    r = _rollout(ctx, n_prompts=1)  # a batch of one prompt
    advantages = grpo_sequence_advantages if algo == "grpo" else rloo_sequence_advantages
    for score in (0.0, 2.0):  # equal rewards (and, for RLOO, equal log-probs give equal returns)
        r.scores = torch.full_like(r.scores, score)
        r.logprobs, r.ref_logprobs = torch.zeros_like(r.logprobs), torch.zeros_like(r.ref_logprobs)
        adv, _ = advantages(ctx, ctx.config, r)
        assert torch.equal(adv, torch.zeros_like(adv))
        loss, _, _ = group_loss(ctx, ctx.config, ctx.policy, r, adv, 2.0)
        assert torch.isfinite(loss)
    r.response_mask = torch.zeros_like(r.response_mask)  # empty responses: nothing counts
    loss, pl, kl_loss = group_loss(ctx, ctx.config, ctx.policy, r, torch.ones(2), 2.0)
    assert loss.item() == 0.0 and kl_loss.item() == 0.0 and math.isfinite(pl.ratio_mean.item())


def test_grpo_kl_term_gradient_is_zero_at_the_reference_and_pulls_towards_it(exact_task, tmp_path):
    ctx = _ctx("grpo", tmp_path, beta=1.0)
    r = _rollout(ctx)
    zero = torch.zeros(len(r.scores))  # no reward signal: only the KL term
    loss, _, _ = group_loss(ctx, ctx.config, ctx.policy, r, zero, float(len(r.scores)))
    loss.backward()
    assert max(p.grad.abs().max().item() for p in ctx.policy.parameters()) < 1e-5  # policy == reference
    ctx.policy.zero_grad()
    ref = ModelPolicy(ctx.reference).exact_logprobs(exact_task)
    from rlhf_zoo_envs.tasks import exact as E

    with torch.no_grad():  # move the policy away from the reference
        for p in ctx.policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    before = float(E.kl(ModelPolicy(ctx.policy).exact_logprobs(exact_task), ref).mean())
    r = _rollout(ctx, n_prompts=8)
    opt = torch.optim.AdamW(ctx.policy.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(5):
        loss, _, kl_loss = group_loss(ctx, ctx.config, ctx.policy, r, torch.zeros(len(r.scores)), float(len(r.scores)))
        assert kl_loss.item() > 0
        optimizer_step(loss, opt, 1.0, "kl loss")
    after = float(E.kl(ModelPolicy(ctx.policy).exact_logprobs(exact_task), ref).mean())
    assert after < before


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_with_a_reward_that_pays_nothing_training_pulls_towards_the_reference(exact_task, tmp_path, algo):
    """RLOO's reward is then -beta * KL; GRPO's groups all tie (advantage 0), leaving the KL loss term."""
    ctx = make_context(algo, task="exact", out=tmp_path, device="cpu", progress=False,
                       options={**TINY, "iterations": 12, "prompts_per_iteration": 16, "beta": 1.0,
                                "learning_rate": 2e-3})
    with torch.no_grad():
        for p in ctx.policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ctx.reward_fn = lambda ids, mask, p: torch.zeros(ids.shape[0])
    from rlhf_zoo_envs.tasks import exact as E

    ref = ModelPolicy(ctx.reference).exact_logprobs(exact_task)

    def kl_now() -> float:
        return float(E.kl(ModelPolicy(ctx.policy).exact_logprobs(exact_task), ref).mean())

    before = kl_now()
    ctx.algorithm.train(ctx, ctx.config)
    assert kl_now() < 0.8 * before


def test_config_validation():
    for cls in (RLOOConfig, GRPOConfig):
        with pytest.raises(ConfigError, match="k must be >= 2"):
            cls(k=1)
        with pytest.raises(ConfigError, match="minibatches"):
            cls(prompts_per_iteration=2, minibatches=3)
        with pytest.raises(ConfigError, match="beta"):
            cls(beta=-0.1)
        assert cls.kl_coefficient == "beta"
    with pytest.raises(ConfigError, match="loss_type"):
        GRPOConfig(loss_type="dapo")
    assert GRPOConfig.from_dict({}, preset="quick").loss_type == "grpo"


def test_beta_sets_the_environment_penalty_and_the_evaluations_optimum(exact_task, tmp_path):
    assert _ctx("rloo", tmp_path, beta=0.25).beta == 0.25
    assert _ctx("grpo", tmp_path / "g").beta == exact_task.beta


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_zoo_check_passes(name, tmp_path):
    results = check_algorithm(name, tmp_path)
    assert [r.status for r in results] == ["PASS"] * 6, [(r.name, r.detail) for r in results if not r.passed]


# --- data parallel -------------------------------------------------------------------------------------
def test_two_ranks_take_the_whole_batch_steps(exact_task, tmp_path):
    """5 prompt groups over 2 ranks (3 + 2), 2 minibatches x 2 epochs: the same parameters as one rank."""
    ctx = make_context("grpo", task="exact", out=tmp_path / "rollout-ctx", device="cpu",
                       options={**cw.OPTIONS}, progress=False, checkpoint_every=0)
    r = _rollout(ctx, n_prompts=5, seed=3)
    assert len(set(r.scores.tolist())) > 3  # the rewards differ, within and across groups
    save_rollout(r, tmp_path / "rollout.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "critic_free_worker.py"), str(tmp_path), str(tmp_path / "rollout.safetensors")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = {n: p.detach().clone() for n, p in ctx.policy.named_parameters()}
    for case in cw.CASES:
        single = cw.update_on_rollout(case, tmp_path / "single", tmp_path / "rollout.safetensors")
        two = load_file(str(tmp_path / f"{case}.safetensors"))
        worst = max((two[k] - v).abs().max().item() for k, v in single.items())
        assert worst <= 1e-5, f"{case}: largest difference {worst:.3g}"
        assert max((single[k] - v).abs().max().item() for k, v in start.items()) > 1e-4  # it moved


def test_zoo_run_nproc_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_zoo", "run", "rloo", "--task", "exact", "--preset", "smoke",
                           "--prompts-per-iteration", "3", "--nproc", "2", "--device", "cpu", "--quiet",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trained_tokens"] > 0 and np.isfinite(summary["gold_reward"])


# --- learning (slow) -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_quick_beats_the_sft_policy_on_sentiment(algo, seed, tmp_path):
    s = run(algo, task="sentiment", preset="quick", seed=seed, out=tmp_path, device="cpu", progress=False)
    print(f"{algo} sentiment seed {seed}: gold {s['gold_reward']:.3f} baseline {s['baseline_gold_reward']:.3f} "
          f"kl {s['kl_to_ref']:.2f}")
    assert s["gold_reward"] > s["baseline_gold_reward"] + 0.3
    assert math.isfinite(s["kl_to_ref"]) and s["kl_to_ref"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_quick_on_exact_reports_kl_to_optimum(algo, tmp_path):
    s = run(algo, task="exact", preset="quick", out=tmp_path, device="cpu", progress=False)
    print(f"{algo} exact seed 0: gold {s['gold_reward']:.3f} baseline {s['baseline_gold_reward']:.3f} "
          f"kl_to_optimum {s['kl_to_optimum']:.3f} frontier_efficiency {s['frontier_efficiency']:.3f}")
    assert s["gold_reward"] > s["baseline_gold_reward"]
    assert math.isfinite(s["kl_to_optimum"]) and s["kl_to_optimum"] >= 0
