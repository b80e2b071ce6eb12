"""Contract every registered algorithm must meet (DESIGN.md sections 5 and 8), built-ins and plugins alike."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlhf_zoo.policy import ModelPolicy, RewardModelResult
from rlhf_zoo.registry import get_registry
from rlhf_zoo.runner import make_context

BUILTINS = {"sft", "reward-model", "best-of-n", "ppo", "ppo-ptx", "dpo", "rrhf", "rejection-sampling", "rloo", "grpo",
            "iterated-rlhf"}
ALGORITHMS = sorted(get_registry().algorithms)


def test_every_builtin_algorithm_is_registered():
    assert BUILTINS <= set(ALGORITHMS), f"missing: {BUILTINS - set(ALGORITHMS)}; errors: {get_registry().load_errors}"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_config_is_frozen_with_help_and_smoke_preset(name):
    cls = get_registry().algorithm(name).config_cls
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}: field {f.name} has no help text"
    assert "smoke" in cls.presets, f"{name}: no smoke preset"
    assert "quick" in cls.presets, f"{name}: no quick preset"
    cls.from_dict({}, preset="smoke")  # valid


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_one_update_changes_trainable_parameters_and_not_the_reference(name, exact_task, tmp_path):
    ctx = make_context(name, task="exact", out=tmp_path, device="cpu", preset="smoke", progress=False)
    ref_before = {k: v.clone() for k, v in ctx.reference.state_dict().items()}
    start = {k: v.detach().clone() for k, v in ctx.policy.named_parameters()}
    result = ctx.algorithm.train(ctx, ctx.config)
    for k, v in ctx.reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"{name} changed the reference ({k})"
    assert all(not p.requires_grad for p in ctx.reference.parameters())
    kind = ctx.algorithm.kind
    if kind == "reward_model":
        assert isinstance(result, RewardModelResult)
        assert all(math.isfinite(v) for v in result.metrics.values() if isinstance(v, float))
        return
    assert isinstance(result, ModelPolicy)
    if kind == "inference":
        return
    trained = dict(result.model.named_parameters())
    unchanged = [k for k, p in trained.items() if p.requires_grad and k in start and torch.equal(p, start[k])]
    assert not unchanged, f"{name}: one update left {unchanged} unchanged"
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        assert "NaN" not in line and "Infinity" not in line


def test_hh_runs_optimise_the_llama2_combination_and_report_both_objectives(tmp_path):
    from rlhf_zoo.runner import run
    from rlhf_zoo_envs.tasks.hh import Llama2Reward

    ctx = make_context("best-of-n", task="hh", out=tmp_path / "ctx", device="cpu", preset="smoke", progress=False)
    assert isinstance(ctx.reward_fn, Llama2Reward)  # what the environment pays on hh
    s = run("best-of-n", task="hh", out=tmp_path / "run", device="cpu", preset="smoke", progress=False)
    for key in ("gold_helpfulness", "gold_harmlessness", "baseline_gold_helpfulness", "baseline_gold_harmlessness"):
        assert math.isfinite(s[key])


def test_reward_model_run_trains_the_policy_trunk_in_place_and_never_loads_the_reference(exact_task, tmp_path):
    """reward-model holds one model: its trunk is the policy's own modules (no copy) and the reference,
    which it never reads, is never loaded (`RunContext.reference` loads on first use for this kind)."""
    ctx = make_context("reward-model", task="exact", out=tmp_path, device="cpu", preset="smoke", progress=False)
    assert not isinstance(ctx._reference, torch.nn.Module)  # a loader, not a model
    before = {k: v.detach().clone() for k, v in ctx.policy.base_model.named_parameters()}
    result = ctx.algorithm.train(ctx, ctx.config)
    assert isinstance(result, RewardModelResult) and result.model.base_model is ctx.policy.base_model
    assert any(not torch.equal(before[k], v) for k, v in ctx.policy.base_model.named_parameters())
    assert not isinstance(ctx._reference, torch.nn.Module)  # still never loaded
    reference = ctx.reference  # asking for it loads it, frozen, equal to the task's SFT policy
    assert isinstance(reference, torch.nn.Module) and not any(p.requires_grad for p in reference.parameters())
    fresh = exact_task.load_reference()
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), fresh.state_dict().values(), strict=True))
