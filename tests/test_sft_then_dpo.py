"""SFT-then-DPO (issue 11, item 3; ``dpo --sft-steps N``): with N = 0 the run is plain DPO bit for bit;
with N > 0 the reference of the DPO loss and of the final evaluation is the SFT-on-chosen model (loss ln 2
at the first step), the phase lowers the chosen responses' NLL, --resume stays exact, and the options are
validated and documented."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf_zoo.cli import main
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.evaluation import evaluate
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import build_registry
from rlhf_zoo.runner import run
from rlhf_zoo_plugins.dpo import DPOConfig, encode_pairs, load_pairs, reference_logprobs, sft_on_chosen

LN2 = math.log(2.0)
DPO = {"steps": 4, "batch_size": 16, "max_pairs": 64, "warmup_steps": 1, "eval_prompts": 2, "eval_samples": 1}
SFT = {"sft_steps": 8, "sft_batch_size": 16, "sft_learning_rate": 3e-3}


class Watcher:
    """Keeps the run's reference as it was at the start, and the one in ctx.reference at the end."""

    @hookimpl
    def on_run_start(self, run):
        self.reference0 = run.reference
        self.reference0_state = {k: v.clone() for k, v in run.reference.state_dict().items()}
        self.tracked = sorted(run._tracked)

    @hookimpl
    def on_run_end(self, run, summary):
        self.reference1 = run.reference
        self.tracked_at_end = sorted(run._tracked)


def _run(out, options, seed=0, **kw):
    watcher = Watcher()
    summary = run("dpo", task="exact", seed=seed, out=out, device="cpu", progress=False, options=options,
                  registry=build_registry(extra_plugins={"watcher": watcher}), **kw)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, watcher


def _same_figures(a: dict, b: dict) -> None:
    skip = {"wall_seconds", "train_seconds", "tokens_per_second", "peak_memory_mb", "phase_seconds"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def _weights(out):
    return load_file(str(out / "policy" / "model.safetensors"))


# --- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "match"), [
    ({"sft_steps": -1}, "sft_steps must be >= 0, got -1"),
    ({"sft_batch_size": 0}, "sft_batch_size must be > 0"),
    ({"sft_learning_rate": 0.0}, "sft_learning_rate must be > 0"),
])
def test_config_rejects_bad_sft_options(options, match):
    with pytest.raises(ConfigError, match=match):
        DPOConfig.from_dict(options)


def test_preset_and_help(capsys):
    assert DPOConfig.from_dict({}, preset="quick-sft").sft_steps == 100
    assert main(["run", "dpo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--sft-steps INTEGER", "--sft-batch-size INTEGER", "--sft-learning-rate FLOAT"):
        assert flag in text
    assert "SFT-then-DPO, for pairs not sampled from the reference" in text
    assert "quick-sft" in text


# --- sft_steps = 0 is plain DPO -----------------------------------------------------------------------
def test_sft_steps_0_is_plain_dpo_bit_for_bit(tmp_path):
    plain, plain_rows, w_plain = _run(tmp_path / "plain", DPO)
    zero, zero_rows, w_zero = _run(tmp_path / "zero", {**DPO, "sft_steps": 0, **{k: v for k, v in SFT.items()
                                                                                 if k != "sft_steps"}})
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "zero")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain_rows == zero_rows
    _same_figures(plain, zero)
    assert "reference_model" not in zero and "sft_on_chosen" not in zero
    assert w_zero.reference1 is w_zero.reference0  # the world's reference, untouched
    assert w_zero.tracked_at_end == w_plain.tracked_at_end == ["optimizer", "pair_order", "scheduler"]
    assert zero_rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)


# --- sft_steps > 0 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-then-dpo")
    return (*_run(out, {**DPO, **SFT}), out)


def _sft_model(task, options, seed=0):
    """The SFT-on-chosen model, computed here from the task's starting policy."""
    cfg = DPOConfig.from_dict(options)
    pairs, _ = encode_pairs(task, load_pairs(task, cfg), task.max_new_tokens, "cpu")
    model = task.load_policy("cpu")
    sft_on_chosen(model, pairs, task, cfg, seed)
    return model, pairs


def test_reference_is_the_sft_model_and_replaces_the_worlds(sft_run, exact_task):
    summary, _, w, _ = sft_run
    assert w.reference1 is not w.reference0
    assert not any(p.requires_grad for p in w.reference1.parameters()) and not w.reference1.training
    model, _ = _sft_model(exact_task, {**DPO, **SFT})
    mine, theirs = model.state_dict(), w.reference1.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the world's reference is not the SFT model, and was left as it was
    assert any(not torch.equal(v, theirs[k]) for k, v in w.reference0_state.items())
    assert all(torch.equal(v, w.reference0.state_dict()[k]) for k, v in w.reference0_state.items())
    assert summary["reference_model"].startswith("sft-on-chosen")
    assert summary["sft_on_chosen"]["steps"] == SFT["sft_steps"]


def test_first_dpo_step_is_at_policy_equals_reference(sft_run):
    _, rows, _, _ = sft_run
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]  # DPO steps only
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["reward_chosen"] == pytest.approx(0.0, abs=1e-5)


def test_sft_phase_lowers_the_chosen_nll(sft_run, exact_task):
    summary, _, _, _ = sft_run
    s = summary["sft_on_chosen"]
    assert s["nll_chosen_after"] < s["nll_chosen_before"]
    model, pairs = _sft_model(exact_task, {**DPO, **SFT})
    before = reference_logprobs(exact_task.load_policy("cpu"), pairs, exact_task.suppress_ids)[0]
    after = reference_logprobs(model, pairs, exact_task.suppress_ids)[0]
    tokens = pairs.chosen_mask.sum()
    assert float(-before.sum() / tokens) == pytest.approx(s["nll_chosen_before"], abs=1e-5)
    assert float(-after.sum() / tokens) == pytest.approx(s["nll_chosen_after"], abs=1e-5)


def test_baseline_figures_are_the_sft_models(sft_run, exact_task):
    summary, _, w, _ = sft_run
    figures = evaluate(ModelPolicy(w.reference1), exact_task, reference=w.reference1,
                       reward_fn=exact_task.reward_function(device="cpu"), prompts=exact_task.prompts("eval"),
                       samples_per_prompt=1, max_new_tokens=exact_task.max_new_tokens, temperature=1.0, seed=0,
                       beta=exact_task.beta, missing_eos_penalty=exact_task.missing_eos_penalty,
                       device=torch.device("cpu"))
    assert summary["baseline_gold_reward"] == pytest.approx(figures["gold_reward"], abs=1e-9)
    assert summary["baseline_kl_to_optimum"] == pytest.approx(figures["kl_to_optimum"], abs=1e-9)
    assert summary["baseline_kl_to_ref"] == pytest.approx(0.0, abs=1e-9)


# --- resume -------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


class CrashAt:
    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics) -> None:
        if iteration == self.at:
            raise Crash(iteration)


def test_resume_reruns_the_sft_phase_and_ends_identical(tmp_path):
    options = {**DPO, **SFT, "steps": 7}
    kw = dict(task="exact", seed=3, device="cpu", progress=False, options=options, checkpoint_every=3)
    full = run("dpo", out=tmp_path / "full", **kw)
    with pytest.raises(Crash):
        run("dpo", out=tmp_path / "resumed", registry=build_registry({"crash": CrashAt(5)}), **kw)
    resumed = run("dpo", out=tmp_path / "resumed", resume=True, **kw)
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["resumed_from"] == "iter-000003"
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    _same_figures(full, resumed)
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "resumed" / "metrics.jsonl").read_text()
