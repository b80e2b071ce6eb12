"""The conformance kit: it passes on every built-in algorithm, and each check fails on an algorithm that
breaks its invariant (a kit that cannot fail checks nothing)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from rlhf_zoo import AlgoConfig, Algorithm, ModelPolicy, hookimpl, option
from rlhf_zoo.conformance import check_algorithm
from rlhf_zoo.registry import build_registry, get_registry
from rlhf_zoo.training import collate_lm, lm_loss, lm_row, optimizer_step

pytest_plugins = ["rlhf_zoo.testing"]


@pytest.mark.parametrize("name", sorted(get_registry().algorithms))
def test_every_registered_algorithm_passes_the_kit(name, zoo_check):
    results = zoo_check(name)
    assert [r.name for r in results] == ["config", "update", "reference", "finite", "determinism", "checkpoint"]
    skipped = [r.name for r in results if r.passed is None]
    assert skipped == (["checkpoint"] if get_registry().algorithm(name).kind == "inference" else [])


# --- a toy algorithm with one switchable fault per check ----------------------------------------------
@dataclass(frozen=True)
class ToyConfig(AlgoConfig):
    presets = {"smoke": {"steps": 3, "eval_prompts": 2, "eval_samples": 1}}

    steps: int = option(3, "Optimizer steps.")
    learning_rate: float = option(1e-2, "Adam learning rate.")


@dataclass(frozen=True)
class NoHelpConfig(ToyConfig):
    extra: int = 0  # no help text


def make_train(fault: str):
    def train(ctx, cfg):
        task, policy = ctx.task, ctx.policy
        tok = task.tokenizer
        pairs = task.dataset("pairs")
        rows = [lm_row([tok.bos_token_id, *tok.encode(p, add_special_tokens=False)],
                       [*tok.encode(c, add_special_tokens=False), tok.eos_token_id])
                for p, c in zip(pairs["prompt"][:16], pairs["chosen"][:16], strict=True)]
        batch = collate_lm(rows, task.pad_token_id, ctx.device)
        params = [p for n, p in policy.named_parameters() if not (fault == "update" and n == "model.norm.weight")]
        opt = torch.optim.Adam(params, lr=cfg.learning_rate)
        if fault != "checkpoint":  # the fault: Adam's moments are not checkpointed
            ctx.track("optimizer", opt)
        for it in ctx.iterations(cfg.steps):
            loss = lm_loss(policy, batch)
            if fault == "determinism":  # the fault: noise from the OS, not from the run's seeded RNGs
                loss = loss * (1 + int.from_bytes(os.urandom(2), "little") / 2**20)
            if fault == "finite" and it == cfg.steps:
                ctx.log(it, {"loss": loss.item(), "ratio": float("nan")})
                continue
            optimizer_step(loss, opt, 1.0, "toy loss")
            if fault == "reference":  # the fault: the reference moves
                with torch.no_grad():
                    next(ctx.reference.parameters()).add_(1e-3)
            ctx.log(it, {"loss": loss.item()})
        return ModelPolicy(policy)

    return train


class ToyPlugin:
    @hookimpl
    def register_algorithms(self, register) -> None:
        for fault in ("none", "update", "reference", "determinism", "checkpoint", "finite"):
            register(Algorithm(f"toy-{fault}", ToyConfig, make_train(fault), f"toy with fault {fault}"))
        register(Algorithm("toy-config", NoHelpConfig, make_train("none"), "toy whose config lacks help"))


def _kit(name, tmp_path):
    results = check_algorithm(name, tmp_path, registry_factory=lambda extra: build_registry({**extra, "toy": ToyPlugin()}))
    return {r.name: r for r in results}


def test_the_toy_without_fault_passes(tmp_path):
    results = _kit("toy-none", tmp_path)
    assert all(r.passed for r in results.values()), results


@pytest.mark.parametrize(("fault", "message"), [
    ("config", "field 'extra' has no help text"),
    ("update", "trainable tensors unchanged, e.g. ['model.norm.weight']"),
    ("reference", "changed: ['model.embed_tokens.weight'"),
    ("determinism", "weights differ"),
    ("checkpoint", "weights differ"),
])
def test_each_check_fails_on_the_algorithm_that_breaks_it(tmp_path, fault, message):
    results = _kit(f"toy-{fault}", tmp_path)
    assert results[fault].passed is False and message in results[fault].detail, results[fault]
    others = [r.name for n, r in results.items() if n != fault and r.passed is False]
    if fault == "config":
        assert all(r.passed is None for n, r in results.items() if n != "config")
    elif fault in ("reference", "determinism"):  # a moving reference or OS noise also breaks the resumed run
        assert others == ["checkpoint"], others
    else:
        assert not others, others


def test_a_non_finite_metric_fails_the_finite_check(tmp_path):
    results = _kit("toy-finite", tmp_path)
    assert results["finite"].passed is False
    assert "metric 'ratio' is nan" in results["finite"].detail
    assert all(r.passed is None for n, r in results.items() if n not in ("config", "finite"))
