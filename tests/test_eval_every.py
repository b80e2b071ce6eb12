"""``--eval-every N``: the policy evaluated during training, logged as ``eval/*`` rows of metrics.jsonl.

Every point is measured as the final evaluation is (same prompts, samples and seed), so on ``exact``,
where the figures are exact expectations, the last point equals summary.json; the evaluation draws from
its own random stream, so training is the same with and without it; and a resumed run logs the same
curve as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_zoo.config import AlgoConfig
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.registry import build_registry
from rlhf_zoo.runner import run

PPO = {"iterations": 4, "batch_prompts": 16, "minibatches": 2, "epochs": 1, "eval_prompts": 8, "eval_samples": 2}
DPO = {"steps": 7, "batch_size": 16, "max_pairs": 48, "warmup_steps": 2, "eval_prompts": 8, "eval_samples": 2}
EXACT_FIGURES = ("gold_reward", "proxy_reward", "kl_to_ref", "kl_to_optimum", "frontier_efficiency")


def _run(algo: str, out: Path, options: dict, **kwargs) -> dict:
    return run(algo, task="exact", seed=5, out=out, device="cpu", options=options, progress=False, **kwargs)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def _curve(out: Path) -> list[dict]:
    return [r for r in _rows(out) if any(k.startswith("eval/") for k in r)]


def _training_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in _rows(out)
            if not any(k.startswith("eval/") for k in r)]


@pytest.mark.parametrize(("algo", "options", "every", "points"), [
    ("ppo", PPO, 2, [0, 2, 4]),
    ("dpo", DPO, 3, [0, 3, 6, 7]),  # the last iteration is always a point
])
def test_curve_points_and_the_last_equals_the_final_evaluation(tmp_path, algo, options, every, points):
    summary = _run(algo, tmp_path / "run", {**options, "eval_every": every})
    curve = _curve(tmp_path / "run")
    assert [r["iteration"] for r in curve] == points
    for r in curve:
        assert set(f"eval/{k}" for k in EXACT_FIGURES) <= set(r)
        assert 0.0 <= r["eval/kl_to_ref"] and 0.0 <= r["eval/kl_to_optimum"]
    # the starting policy is the reference: KL 0 and the baseline's gold
    assert curve[0]["eval/kl_to_ref"] == pytest.approx(0.0, abs=1e-9)
    assert curve[0]["eval/gold_reward"] == pytest.approx(summary["baseline_gold_reward"], abs=1e-9)
    for k in EXACT_FIGURES:
        assert curve[-1][f"eval/{k}"] == pytest.approx(summary[k], rel=1e-9, abs=1e-12), k
    assert summary["phase_seconds"]["eval_every"] > 0


def test_training_is_the_same_with_and_without_it(tmp_path):
    _run("ppo", tmp_path / "plain", PPO)
    _run("ppo", tmp_path / "curve", {**PPO, "eval_every": 1})
    assert _training_rows(tmp_path / "plain") == _training_rows(tmp_path / "curve")
    assert len(_curve(tmp_path / "curve")) == PPO["iterations"] + 1
    a = load_file(str(tmp_path / "plain" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "curve" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class CrashAfter:
    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics) -> None:
        if iteration == self.at + 1:
            raise RuntimeError("simulated crash")


def test_a_resumed_run_logs_the_same_curve(tmp_path):
    options = {**PPO, "eval_every": 1}
    _run("ppo", tmp_path / "full", options, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run("ppo", tmp_path / "crashed", options, checkpoint_every=2, registry=build_registry({"c": CrashAfter(2)}))
    _run("ppo", tmp_path / "crashed", options, checkpoint_every=2, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "full")) == strip(_rows(tmp_path / "crashed"))


def test_an_algorithm_without_iterations_says_only_the_final_evaluation_ran(tmp_path, capsys):
    _run("best-of-n", tmp_path / "bon", {"n": 2, "eval_prompts": 4, "eval_samples": 1, "eval_every": 5})
    assert "best-of-n has no training iterations; only the final evaluation ran" in capsys.readouterr().err
    assert _curve(tmp_path / "bon") == []


def test_negative_is_refused():
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        AlgoConfig.from_dict({"eval_every": -1})
