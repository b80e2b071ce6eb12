"""SFT checkpoint selection by reward (issue 11, item 2; InstructGPT: "the SFT model among the 16
checkpoints with the highest RM score"): the snapshot steps, the argmax of the recorded scores, the saved
policy is the selected snapshot, exact --resume, the options' validation, and a user's own model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_zoo.checkpoint import read_checkpoint
from rlhf_zoo.cli import main
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.evaluation import evaluate
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import build_registry
from rlhf_zoo.runner import run
from rlhf_zoo_plugins.sft import CheckpointSelection, SFTConfig, snapshot_steps

OPTIONS = {"steps": 20, "batch_size": 8, "select_checkpoints": 4, "eval_prompts": 2, "eval_samples": 1}


# --- the pieces ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("steps", "n", "expected"), [
    (100, 4, [25, 50, 75, 100]),
    (20, 4, [5, 10, 15, 20]),
    (22, 4, [6, 11, 16, 22]),
    (5, 5, [1, 2, 3, 4, 5]),
    (7, 1, [7]),
])
def test_snapshot_steps_are_evenly_spaced_and_end_at_the_last_step(steps, n, expected):
    assert snapshot_steps(steps, n) == expected


def test_selection_keeps_the_argmax_and_its_weights_ties_go_to_the_earlier_snapshot():
    model = torch.nn.Linear(2, 1)
    scores = iter([0.1, 0.5, 0.5, 0.2])
    selection = CheckpointSelection(model, [1, 2, 3, 4], lambda m: {"proxy_reward": next(scores)})
    weights = {}
    for step in range(1, 6):  # step 5 is not a snapshot step
        with torch.no_grad():
            model.weight.fill_(float(step))
        selection.observe(step)
        weights[step] = model.weight.detach().clone()
    assert [r["step"] for r in selection.records] == [1, 2, 3, 4]
    assert selection.best_step == 2 and selection.best_record()["proxy_reward"] == 0.5
    assert torch.equal(selection.best["weight"], weights[2])
    again = CheckpointSelection(torch.nn.Linear(2, 1), [1, 2, 3, 4], None)
    again.load_state_dict(selection.state_dict())
    assert again.records == selection.records and again.best_step == 2
    assert torch.equal(again.best["weight"], weights[2])


@pytest.mark.parametrize(("options", "match"), [
    ({"select_checkpoints": -1}, r"select_checkpoints must be >= 0 \(0: off\), got -1"),
    ({"steps": 3, "select_checkpoints": 4}, r"select_checkpoints \(4\) must be <= steps \(3\)"),
    ({"select_checkpoints": 2, "selection_prompts": 0}, "selection_prompts must be > 0"),
])
def test_config_rejects_bad_selection_options(options, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig.from_dict(options)


def test_cli_bad_selection_option_is_one_line(capsys, tmp_path):
    rc = main(["run", "sft", "--task", "exact", "--steps", "3", "--select-checkpoints", "4", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == ["zoo: error: select_checkpoints (4) must be <= steps (3): a snapshot is taken after an optimizer step"]


def test_help_documents_the_options(capsys):
    assert main(["run", "sft", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--select-checkpoints INTEGER" in text and "--selection-prompts INTEGER" in text
    assert "Checkpoint selection by reward (InstructGPT)" in text


# --- a run on exact -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, exact_task):
    out = tmp_path_factory.mktemp("sft-select")
    summary = run("sft", task="exact", seed=1, out=out, device="cpu", progress=False, options=OPTIONS,
                  checkpoint_every=1, keep_checkpoints=100)
    return summary, out


def test_summary_records_every_snapshot_and_the_argmax(selected_run):
    summary, _ = selected_run
    sel = summary["checkpoint_selection"]
    snaps = sel["snapshots"]
    assert [s["step"] for s in snaps] == [5, 10, 15, 20]
    assert all({"proxy_reward", "kl_to_ref", "gold_reward"} <= set(s) for s in snaps)
    scores = [s["proxy_reward"] for s in snaps]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of the highest
    assert sel["selected_step"] == snaps[best]["step"]
    assert sel["selected_proxy_reward"] == scores[best] == max(scores)
    assert sel["final_step"] == 20
    # measured: this run's best snapshot is not the last one, so the choice matters
    assert sel["selected_step"] < sel["final_step"]


def test_saved_policy_is_the_selected_snapshot(selected_run, exact_task):
    summary, out = selected_run
    step = summary["checkpoint_selection"]["selected_step"]
    saved = load_file(str(out / "policy" / "model.safetensors"))
    at_step, _ = read_checkpoint(out / "checkpoints" / f"iter-{step:06d}")
    final, _ = read_checkpoint(out / "checkpoints" / "iter-000020")
    for name, value in saved.items():
        assert torch.equal(value, at_step["policy"][name]), name
    assert any(not torch.equal(v, final["policy"][k]) for k, v in saved.items())  # not the last step's weights
    # on exact the final evaluation is the same exact expectation as the snapshot's score
    assert summary["proxy_reward"] == pytest.approx(summary["checkpoint_selection"]["selected_proxy_reward"], abs=1e-6)


def test_recorded_score_is_the_reward_of_that_snapshot(selected_run, exact_task):
    summary, out = selected_run
    snap = summary["checkpoint_selection"]["snapshots"][0]
    state, _ = read_checkpoint(out / "checkpoints" / f"iter-{snap['step']:06d}")
    model = exact_task.load_pretrained("cpu")
    model.load_state_dict(state["policy"])
    figures = evaluate(ModelPolicy(model.eval()), exact_task, reference=exact_task.load_reference("cpu"),
                       reward_fn=exact_task.reward_function(device="cpu"), prompts=exact_task.prompts("eval"),
                       samples_per_prompt=1, max_new_tokens=exact_task.max_new_tokens, temperature=1.0, seed=0,
                       beta=exact_task.beta, missing_eos_penalty=exact_task.missing_eos_penalty,
                       device=torch.device("cpu"))
    assert figures["proxy_reward"] == pytest.approx(snap["proxy_reward"], abs=1e-6)


# --- resume -------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


class CrashAt:
    """Fails the run when iteration ``at`` is logged (sft logs every 10 steps)."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics) -> None:
        if iteration == self.at:
            raise Crash(iteration)


def test_resume_selects_the_same_snapshot(tmp_path):
    options = {**OPTIONS, "steps": 22}  # snapshots after 6, 11, 16, 22
    kw = dict(task="exact", seed=2, device="cpu", progress=False, options=options, checkpoint_every=3)
    full = run("sft", out=tmp_path / "full", **kw)
    with pytest.raises(Crash):
        run("sft", out=tmp_path / "resumed", registry=build_registry({"crash": CrashAt(20)}), **kw)
    resumed = run("sft", out=tmp_path / "resumed", resume=True, **kw)  # continues after iteration 18
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["resumed_from"] == "iter-000018"
    assert resumed["checkpoint_selection"] == full["checkpoint_selection"]
    a = load_file(str(tmp_path / "full" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("gold_reward", "proxy_reward", "kl_to_ref", "generated_tokens", "trained_tokens"):
        assert resumed[key] == full[key], key
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "resumed" / "metrics.jsonl").read_text()


# --- a user's own model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    from rlhf_zoo.fixtures import build_policy, write_datasets

    root = tmp_path_factory.mktemp("sft-select-user")
    build_policy("gpt2", root / "gpt2", pretrain_steps=20)
    write_datasets(root)
    return root


def test_user_model_without_a_reward_is_a_one_line_error(gpt2, monkeypatch, capsys):
    monkeypatch.chdir(gpt2)
    rc = main(["run", "sft", "--model", "gpt2", "--dataset", "demos.jsonl", "--prompts", "prompts.jsonl",
               "--preset", "smoke", "--select-checkpoints", "2", "--quiet", "--device", "cpu", "--out", "runs/no-rm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == ["zoo: error: --select-checkpoints scores snapshots with the world's reward and 'user' has none: "
                   "give --reward SPEC, or --select-checkpoints 0"]


def test_user_model_with_a_reward_selects_by_it(gpt2, monkeypatch, capsys):
    monkeypatch.chdir(gpt2)
    rc = main(["run", "sft", "--model", "gpt2", "--dataset", "demos.jsonl", "--prompts", "prompts.jsonl",
               "--reward", "keyword_reward:reward", "--preset", "smoke", "--select-checkpoints", "2", "--quiet",
               "--device", "cpu", "--out", "runs/rm"])
    assert rc == 0, capsys.readouterr().err
    sel = json.loads((gpt2 / "runs" / "rm" / "summary.json").read_text())["checkpoint_selection"]
    assert [s["step"] for s in sel["snapshots"]] == [1, 2]
    assert all("gold_reward" not in s for s in sel["snapshots"])  # this world has no gold evaluator
    assert sel["selected_step"] in (1, 2) and sel["seed"] == 20_000
