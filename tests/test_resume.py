"""Checkpoints and resume: a run that crashes and is resumed ends exactly where the uninterrupted run ends.

The crash is simulated in-process by a plugin whose ``on_iteration_end`` hook raises after a chosen
iteration (the checkpoint of that iteration, if any, is already on disk, as after a SIGKILL); the
real SIGKILL of a ``zoo run`` process is the slow test at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhf_zoo.checkpoint import (
    complete_checkpoints,
    flatten,
    read_checkpoint,
    restore,
    state_of,
    unflatten,
    write_checkpoint,
)
from rlhf_zoo.errors import ConfigError, NonFiniteError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.registry import build_registry
from rlhf_zoo.runner import run

# small runs on ``exact``: several iterations, each of them cheap
SMALL = {
    "ppo": {"iterations": 5, "batch_prompts": 16, "minibatches": 2, "epochs": 2, "eval_prompts": 8, "eval_samples": 2},
    "dpo": {"steps": 7, "batch_size": 16, "max_pairs": 48, "warmup_steps": 2, "eval_prompts": 8, "eval_samples": 2},
    "rejection-sampling": {"rounds": 4, "prompts_per_round": 16, "k": 4, "epochs": 1.0, "eval_prompts": 8,
                           "eval_samples": 2},
    "rrhf": {"iterations": 4, "prompts_per_iteration": 8, "candidates": 3, "eval_prompts": 8, "eval_samples": 2},
    "ppo-ptx": {"iterations": 4, "batch_prompts": 16, "minibatches": 2, "epochs": 1, "ptx_batch_size": 8,
                "eval_prompts": 8, "eval_samples": 2},
    # sft and reward-model log (and so call the hook) every 10 steps: crash at step 20
    "sft": {"steps": 22, "batch_size": 8, "eval_prompts": 8, "eval_samples": 2},
    "reward-model": {"steps": 22, "batch_size": 4},
}
FIGURES = ("gold_reward", "proxy_reward", "kl_to_ref", "kl_to_optimum", "frontier_efficiency",
           "generated_tokens", "trained_tokens")


class Crash(Exception):
    pass


class CrashAfter:
    """A plugin that makes the run fail during iteration ``at + 1``, after ``at`` has finished (and been
    checkpointed if it was due). Raised from the metrics hook, i.e. after the iteration's update."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics) -> None:
        if iteration == self.at + 1:
            raise Crash(f"simulated crash during iteration {iteration}")


def _run(algo: str, out: Path, **kwargs):
    return run(algo, task="exact", seed=3, out=out, device="cpu", options=SMALL[algo], progress=False, **kwargs)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    kind = "model" if (out / "model").is_dir() else "policy"  # reward models are saved as model/
    return load_file(str(out / kind / "model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"parameter {name} differs after resume"
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    for key in FIGURES + ("heldout_gold_accuracy", "heldout_pairs"):
        assert sa.get(key) == sb.get(key), key
    ma = (a / "metrics.jsonl").read_text().splitlines()
    mb = (b / "metrics.jsonl").read_text().splitlines()
    assert len(ma) == len(mb)
    for la, lb in zip(ma, mb, strict=True):  # every logged figure but the wall-clock ones
        ra, rb = json.loads(la), json.loads(lb)
        assert {k: v for k, v in ra.items() if "time" not in k} == {k: v for k, v in rb.items() if "time" not in k}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    """The reference runs, computed once per algorithm when first asked for."""
    cache: dict[str, Path] = {}

    def get(algo: str) -> Path:
        if algo not in cache:
            out = tmp_path_factory.mktemp(f"full-{algo}")
            _run(algo, out, checkpoint_every=1)
            cache[algo] = out
        return cache[algo]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize(("algo", "every", "crash_at"), [
    ("ppo", 1, 2),  # crash right after a checkpoint: resume at an iteration boundary
    ("ppo", 2, 3),  # crash mid-way between checkpoints: iteration 3 is redone
    ("dpo", 1, 3),
    ("dpo", 3, 5),
    ("rejection-sampling", 1, 2),
    ("rejection-sampling", 2, 3),
    ("rrhf", 2, 3),
    ("ppo-ptx", 1, 2),
    ("sft", 3, 19),
    ("reward-model", 1, 19),
])
def test_crash_and_resume_is_the_uninterrupted_run(tmp_path, uninterrupted, algo, every, crash_at):
    out = tmp_path / "run"
    crashing = build_registry({"crash": CrashAfter(crash_at)})
    with pytest.raises(Crash):
        _run(algo, out, checkpoint_every=every, registry=crashing)
    assert not (out / "summary.json").exists()
    last = (crash_at // every) * every
    assert [p.name for p in complete_checkpoints(out / "checkpoints")][-1] == f"iter-{last:06d}"
    _run(algo, out, checkpoint_every=every, resume=True)
    assert json.loads((out / "config.json").read_text())["resumed_from"] == f"iter-{last:06d}"
    _assert_same_run(uninterrupted(algo), out)


def test_resume_after_the_last_iteration_only_evaluates(tmp_path, uninterrupted, monkeypatch):
    """A crash during the final evaluation: the last iteration's checkpoint is always written."""
    import rlhf_zoo.runner

    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise Crash("simulated crash during the evaluation")

    with monkeypatch.context() as m:
        m.setattr(rlhf_zoo.runner, "_evaluate_against_baseline", crash)
        with pytest.raises(Crash):
            _run("dpo", out, checkpoint_every=3)
    assert complete_checkpoints(out / "checkpoints")[-1].name == f"iter-{SMALL['dpo']['steps']:06d}"
    _run("dpo", out, checkpoint_every=3, resume=True)
    _assert_same_run(uninterrupted("dpo"), out)


def test_keep_last_n_and_partial_checkpoints_are_ignored(tmp_path):
    out = tmp_path / "run"
    _run("dpo", out, checkpoint_every=1, keep_checkpoints=3)
    names = [p.name for p in complete_checkpoints(out / "checkpoints")]
    assert names == ["iter-000005", "iter-000006", "iter-000007"]
    # a checkpoint directory without its checkpoint.json (a crash mid-write) is not complete
    partial = out / "checkpoints" / "iter-000009"
    partial.mkdir()
    (partial / "state.json").write_text("{")
    assert complete_checkpoints(out / "checkpoints")[-1].name == "iter-000007"


def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run"
    _run("dpo", out, checkpoint_every=2)
    with pytest.raises(ConfigError, match="different config"):
        run("dpo", task="exact", seed=3, out=out, device="cpu", options={**SMALL["dpo"], "learning_rate": 1e-3},
            progress=False, resume=True)


def test_resume_without_checkpoint_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    summary = _run("dpo", out, resume=True)
    assert "starting from the beginning" in capsys.readouterr().err
    assert summary["trained_tokens"] > 0


def test_a_fresh_run_clears_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    _run("dpo", out, checkpoint_every=1)
    stale = out / "checkpoints" / "iter-000099"
    stale.mkdir()
    (stale / "checkpoint.json").write_text("{}")
    _run("dpo", out, checkpoint_every=0)
    assert not (out / "checkpoints").exists()


class NaNWeightsAfter:
    """Turns the policy's weights to NaN during iteration ``at + 1`` (after its update), as a blown-up
    update would: the checkpoint of that iteration must not be written."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics) -> None:
        if iteration == self.at + 1:
            with torch.no_grad():
                for p in run.policy.parameters():
                    p.fill_(float("nan"))


class NaNReference:
    """A broken reference model: its weights are NaN from the start, so every log-ratio is NaN."""

    def __init__(self, at: int) -> None:
        pass

    @hookimpl
    def on_run_start(self, run) -> None:
        with torch.no_grad():
            for p in run.reference.parameters():
                p.fill_(float("nan"))


class NaNRewardAfter:
    """The environment's reward turns NaN from the rollout of iteration ``at + 1`` on (a broken reward model)."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_run_start(self, run) -> None:
        inner, calls = run.reward_fn, [0]

        def reward(input_ids, attention_mask, prompt_length):
            calls[0] += 1
            scores = inner(input_ids, attention_mask, prompt_length)
            return scores * float("nan") if calls[0] > self.at else scores

        run.reward_fn = reward


@pytest.mark.parametrize(("algo", "fault", "stopped_at", "term"), [
    ("dpo", NaNWeightsAfter, 3, "the policy's parameter model.embed_tokens.weight is non-finite at the end"),
    ("rejection-sampling", NaNWeightsAfter, 3, "the policy's parameter model.embed_tokens.weight is non-finite"),
    ("ppo", NaNRewardAfter, 3, "the reward is non-finite for 16 of 16 responses"),
    ("rrhf", NaNRewardAfter, 3, "the reward is non-finite for 24 of 24 responses"),
    ("dpo", NaNReference, 1, "sigmoid loss is nan"),
    ("ppo", NaNReference, 1, "policy loss is nan"),
])
def test_non_finite_values_stop_naming_iteration_and_term_and_keep_the_good_checkpoint(
        tmp_path, algo, fault, stopped_at, term):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        _run(algo, out, checkpoint_every=1, registry=build_registry({"fault": fault(2)}))
    message = str(err.value)
    assert f"{algo} iteration {stopped_at}: {term}" in message, message
    good = [p.name for p in complete_checkpoints(out / "checkpoints")]
    assert good == [f"iter-{i:06d}" for i in range(max(1, stopped_at - 2), stopped_at)]  # keep 2, none bad
    if good:
        assert good[-1] in message
        state, _ = read_checkpoint(out / "checkpoints" / good[-1])
        assert all(torch.isfinite(t).all() for t in state["policy"].values())
    else:
        assert "no checkpoint was written" in message


def test_state_round_trip_without_pickle(tmp_path):
    """Nested dicts with int keys, tuples, tensors sharing memory, RNG states: saved and read back equal."""
    shared = torch.arange(6.0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(7)
    rng.random(3)
    state = {"a": shared, "b": shared.view(2, 3), "c": {0: (1, 2.5, None, "x"), 1: [True, 2**70]},
             "opt": state_of(opt), "gen": state_of(gen), "rng": state_of(rng)}
    tensors, skeleton = flatten(state)
    json.dumps(skeleton)  # JSON-able
    back = unflatten(tensors, skeleton)
    assert back["c"] == {0: (1, 2.5, None, "x"), 1: [True, 2**70]}
    assert torch.equal(back["b"], shared.view(2, 3))
    path = write_checkpoint(tmp_path, 1, state, {"note": "t"}, keep=2)
    read, info = read_checkpoint(path)
    assert info == {"iteration": 1, "complete": True, "note": "t"}
    gen2, rng2 = torch.Generator(), np.random.default_rng(0)
    restore(gen2, read["gen"])
    restore(rng2, read["rng"])
    assert torch.equal(torch.rand(4, generator=gen2), torch.rand(4, generator=gen))
    assert np.array_equal(rng2.random(4), rng.random(4))
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    restore(opt2, read["opt"])
    assert opt2.state_dict()["param_groups"][0]["lr"] == 0.1
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def _zoo(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_zoo", "run", "ppo", "--task", "exact", "--preset", "quick",
            "--device", "cpu", "--quiet", *args]


@pytest.mark.slow
def test_sigkill_after_the_first_checkpoint_then_resume(tmp_path):
    """The issue's acceptance run: `zoo run ppo --task exact --preset quick` killed with SIGKILL after its
    first checkpoint, re-run with --resume, equals the uninterrupted run (weights and summary figures)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_zoo("--out", str(full)), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_zoo("--out", str(killed)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not complete_checkpoints(killed / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    subprocess.run(_zoo("--out", str(killed), "--resume"), check=True, env=env, capture_output=True)
    _assert_same_run(full, killed)
