"""Issue 14, items 2 and 3: experiment trackers (``zoo run ... --report-to``) and logged samples.

- TensorBoard event files, read back with the tensorboard library, hold the scalars of metrics.jsonl (names,
  steps and values), also across a crash and ``--resume``;
- a Weights & Biases offline run directory holds the metrics (read from wandb's own transaction log);
- an unknown or uninstalled logger is one line before anything in the run directory is written;
- a third-party logger plugin, registered through the ``register_loggers`` hook, is selected by name and
  receives the config, every row, the samples, the summary, and is closed (also when the run fails);
- every evaluation writes samples/iter-N.jsonl, whose per-response figures average to the evaluation's.

Runs are the ``smoke`` preset of ppo on ``exact`` or ``hh`` (a few seconds each, in-process through `main`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import _plain_registry, one_line_error  # noqa: F401 - the autouse fixture: a fresh registry, a scratch cwd

import rlhf_zoo.registry
from rlhf_zoo import LoggerSpec, hookimpl
from rlhf_zoo.cli import main
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.evaluation import EXACT_TOP
from rlhf_zoo.registry import build_registry, get_registry
from rlhf_zoo.rundir import LOCK_FILE
from rlhf_zoo.runner import run
from rlhf_zoo.tracking import Logger, markdown_table, selected_loggers

SMOKE = ["--preset", "smoke", "--device", "cpu", "--quiet"]
EXACT = ["--task", "exact", *SMOKE]
EXACT_PROMPTS = 9  # the exact task's evaluation prompts: one samples row each


def zoo(*args: str) -> int:
    return main(["run", "ppo", *args])


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def metric_series(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(step, value)], the numbers only (as a tracker receives them)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows_of(out / "metrics.jsonl"):
        for k, v in row.items():
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, []).append((row["iteration"], float(v)))
    return series


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


# --- TensorBoard ------------------------------------------------------------------------------------------
def tensorboard_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_same_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    acc = tensorboard_events(out)
    expected = metric_series(out)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got, points, strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7), tag  # TensorBoard keeps float32
    return expected


def text_steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Tensors(f"{tag}/text_summary")]


def text_at(acc, tag: str, step: int) -> str:
    event = next(e for e in acc.Tensors(f"{tag}/text_summary") if e.step == step)
    return event.tensor_proto.string_val[0].decode()


def test_tensorboard_event_files_hold_the_scalars_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert zoo(*EXACT, "--eval-every", "1", "--report-to", "tensorboard", "--out", str(out)) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    series = assert_same_scalars(out)
    assert {"score", "kl", "eval/gold_reward", "eval/kl_to_optimum"} <= set(series)
    assert [s for s, _ in series["eval/kl_to_ref"]] == [0, 1, 2] and [s for s, _ in series["score"]] == [1, 2]
    acc = tensorboard_events(out)
    config = json.loads((out / "config.json").read_text())
    assert config["report_to"] == ["jsonl", "tensorboard"]
    assert '"report_to": [' in text_at(acc, "config", 0)
    assert text_steps(acc, "samples") == [0, 1, 2]  # each evaluation once (the final one is iteration 2's)
    table = text_at(acc, "samples", 2)
    first = rows_of(out / "samples" / "iter-000002.jsonl")[0]
    assert table.splitlines()[0].startswith("| prompt | response | probability | proxy_score |")
    assert f"| {first['prompt']} |" in table and f"{first['proxy_score']:.4g}" in table
    summary = json.loads((out / "summary.json").read_text())
    assert f'"gold_reward": {summary["gold_reward"]}' in text_at(acc, "summary", 2)


class CrashAt:
    """A plugin that fails the run at the end of one iteration (after its row is logged)."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics) -> None:
        if iteration == self.at and not any(k.startswith("eval/") for k in metrics):
            raise RuntimeError("simulated crash")


def test_tensorboard_after_a_crash_and_resume_holds_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    kwargs = dict(task="exact", out=out, device="cpu", preset="smoke", progress=False, checkpoint_every=1,
                  options={"eval_every": 1}, report_to="tensorboard")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("ppo", registry=build_registry({"crash": CrashAt(2)}), **kwargs)
    assert tensorboard_events(out).Scalars("score")[-1].step == 2  # the crashed run had logged iteration 2
    summary = run("ppo", resume=True, **kwargs)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not replaced
    series = assert_same_scalars(out)  # iteration 2 once: the resumed run's file purges the crashed run's
    assert [s for s, _ in series["score"]] == [1, 2] and [s for s, _ in series["eval/gold_reward"]] == [0, 1, 2]
    assert series["eval/gold_reward"][-1][1] == pytest.approx(summary["gold_reward"], rel=1e-6)


# --- Weights & Biases -------------------------------------------------------------------------------------
def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (run-ID.wandb): a LevelDB-style log of 32 KiB blocks after a
    7-byte file header; each record has a 7-byte header (CRC-32, length, type: 1 whole, 2/3/4 first/middle/
    last part) and a serialized ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            parts = chunk
        elif kind in (3, 4):
            parts += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def test_wandb_offline_run_directory_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # unset: the logger runs offline
    monkeypatch.setenv("WANDB_PROJECT", "zoo-test")
    out = tmp_path / "run"
    assert zoo(*EXACT, "--eval-every", "1", "--report-to", "wandb", "--out", str(out)) == 0
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing was sent
    records = wandb_records(log)
    history: dict[int, dict[str, float]] = {}
    config, summary, run_info = {}, {}, None
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.setdefault(r.history.step.num, {}).update({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "run":
            run_info = r.run
    assert run_info.project == "zoo-test" and run_info.display_name == "run"
    assert run_info.run_id == (out / "wandb" / "zoo-run-id").read_text().strip()
    for tag, points in metric_series(out).items():
        for step, value in points:
            assert history[step][tag] == pytest.approx(value, rel=1e-12), (tag, step)
    assert sorted(history) == [0, 1, 2]
    for step in (0, 1, 2):  # a wandb.Table per evaluation, as many rows as samples/iter-N.jsonl
        assert history[step]["samples/_type"] == "table-file"
        assert history[step]["samples/nrows"] == len(rows_of(out / "samples" / f"iter-{step:06d}.jsonl"))
    assert config["report_to"] == ["jsonl", "wandb"] and config["algorithm"] == "ppo"
    final = json.loads((out / "summary.json").read_text())
    assert summary["gold_reward"] == pytest.approx(final["gold_reward"], rel=1e-12)
    tables = sorted((log.parent / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 3
    table = json.loads(tables[-1].read_text())
    assert table["columns"][:4] == ["prompt", "response", "probability", "proxy_score"] and len(table["data"]) == 9
    # --resume continues the same W&B run: the same id
    assert zoo(*EXACT, "--eval-every", "1", "--report-to", "wandb", "--out", str(out), "--resume") == 0
    logs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert {p.name for p in logs} == {f"run-{run_info.run_id}.wandb"}


# --- choosing loggers -------------------------------------------------------------------------------------
def test_an_unknown_logger_is_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "new"
    assert zoo(*EXACT, "--report-to", "tensorboard,nosuch", "--out", str(out)) == 1
    assert one_line_error(capsys) == ("zoo: error: --report-to nosuch: unknown logger 'nosuch'; known: jsonl, none, "
                                      "tensorboard, wandb")
    assert not out.exists()
    assert zoo(*EXACT, "--out", str(out)) == 0  # a finished run, then a bad --overwrite leaves it as it was
    before = snapshot(out)
    assert zoo(*EXACT, "--overwrite", "--report-to", "nosuch", "--out", str(out)) == 1
    assert "--report-to nosuch" in one_line_error(capsys)
    assert snapshot(out) == before
    assert zoo(*EXACT, "--report-to", "none", "--report-to", "wandb", "--out", str(out), "--overwrite") == 1
    assert one_line_error(capsys) == ("zoo: error: --report-to none means no tracker besides metrics.jsonl; it "
                                      "cannot be combined with wandb")
    assert snapshot(out) == before
    # with --nproc the launching process checks the names: one line, no ranks started
    assert main(["run", "dpo", *EXACT, "--nproc", "2", "--report-to", "nosuch", "--out", str(tmp_path / "dp")]) == 1
    assert "--report-to nosuch: unknown logger" in one_line_error(capsys)
    assert not (tmp_path / "dp").exists()


class MissingLibraryPlugin:
    @hookimpl
    def register_loggers(self, register) -> None:
        register(LoggerSpec("mlflow-ish", lambda run: Logger(), "Needs a library that is not installed.",
                            requires=("zoo_no_such_tracker_library",), install="pip install zoo-no-such-tracker"))


def test_a_logger_whose_library_is_missing_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rlhf_zoo.registry, "_REGISTRY", build_registry({"missing": MissingLibraryPlugin()}))
    out = tmp_path / "run"
    assert zoo(*EXACT, "--report-to", "mlflow-ish", "--out", str(out)) == 1
    assert one_line_error(capsys) == (
        "zoo: error: --report-to mlflow-ish: the mlflow-ish logger needs the Python package "
        "'zoo_no_such_tracker_library', which is not installed; install it with: pip install zoo-no-such-tracker")
    assert not out.exists()
    # the built-ins name their extra; faked here by checking a spec whose module is missing
    spec = get_registry().logger("tensorboard")
    assert spec.requires == ("tensorboard",) and spec.install == "pip install 'rlhf-zoo[tensorboard]'"
    assert get_registry().logger("wandb").install == "pip install 'rlhf-zoo[wandb]'"


def test_selected_loggers_parses_repeated_and_comma_separated_names():
    reg = get_registry()
    assert selected_loggers(None, reg) == ("jsonl",)
    assert selected_loggers(["none"], reg) == ("jsonl",)
    assert selected_loggers(["wandb, tensorboard", "jsonl", "wandb"], reg) == ("jsonl", "wandb", "tensorboard")
    with pytest.raises(ConfigError, match="--report-to nosuch: unknown logger 'nosuch'"):
        selected_loggers("nosuch", reg)


class Recorder(Logger):
    """A third-party tracker: keeps every call."""

    calls: list[tuple] = []

    def __init__(self, run) -> None:
        self.calls.append(("start", run.out, run.name, run.resumed_from))
        run.folder.mkdir(parents=True, exist_ok=True)  # RUN_DIR/trackers/recorder: kept by --resume
        with open(run.folder / "starts.txt", "a") as f:
            f.write(f"{run.resumed_from}\n")

    def log_config(self, config):
        self.calls.append(("config", config))

    def log_metrics(self, step, metrics):
        self.calls.append(("metrics", step, metrics))

    def log_samples(self, step, rows):
        self.calls.append(("samples", step, rows))

    def log_summary(self, summary):
        self.calls.append(("summary", summary))

    def close(self, failed=False):
        self.calls.append(("close", failed))


class RecorderPlugin:
    @hookimpl
    def register_loggers(self, register) -> None:
        register(LoggerSpec("recorder", Recorder, "Records every call (a test tracker)."))


def test_a_third_party_logger_plugin_is_selected_by_name_and_receives_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rlhf_zoo.registry, "_REGISTRY", build_registry({"recorder-plugin": RecorderPlugin()}))
    Recorder.calls = []
    assert zoo(*EXACT, "--out", str(tmp_path / "plain")) == 0
    assert Recorder.calls == []  # not selected: never created
    assert main(["list"]) == 0 and "  recorder " in capsys.readouterr().out
    out = tmp_path / "run"
    assert zoo(*EXACT, "--eval-every", "1", "--report-to", "recorder", "--out", str(out)) == 0
    calls = Recorder.calls
    assert calls[0] == ("start", out, "run", None)
    assert calls[1] == ("config", json.loads((out / "config.json").read_text()))
    assert calls[1][1]["report_to"] == ["jsonl", "recorder"]
    metrics = [(c[1], c[2]) for c in calls if c[0] == "metrics"]
    expected = [(r.pop("iteration"), r) for r in rows_of(out / "metrics.jsonl")]
    assert metrics == expected  # every row, in order, the same numbers
    samples = [(c[1], c[2]) for c in calls if c[0] == "samples"]
    assert [s for s, _ in samples] == [0, 1, 2]
    for step, rows in samples:
        assert rows == rows_of(out / "samples" / f"iter-{step:06d}.jsonl")
    assert calls[-2] == ("summary", json.loads((out / "summary.json").read_text()))
    assert calls[-1] == ("close", False)
    # its own folder is a run entry: --resume keeps it (and is not refused for it), --overwrite replaces it
    Recorder.calls = []
    assert zoo(*EXACT, "--eval-every", "1", "--report-to", "recorder", "--out", str(out), "--resume") == 0
    assert Recorder.calls[0] == ("start", out, "run", 2)
    assert (out / "trackers" / "recorder" / "starts.txt").read_text() == "None\n2\n"
    assert zoo(*EXACT, "--out", str(out), "--overwrite") == 0
    assert not (out / "trackers").exists()
    # a run that fails closes its loggers too, as failed
    Recorder.calls = []
    monkeypatch.setattr(rlhf_zoo.registry, "_REGISTRY",
                        build_registry({"recorder-plugin": RecorderPlugin(), "crash": CrashAt(1)}))
    with pytest.raises(RuntimeError, match="simulated crash"):
        zoo(*EXACT, "--report-to", "recorder", "--out", str(tmp_path / "crash"))
    assert [c[0] for c in Recorder.calls] == ["start", "config", "metrics", "close"]
    assert Recorder.calls[-1] == ("close", True)
    capsys.readouterr()


# --- samples ----------------------------------------------------------------------------------------------
def test_exact_samples_per_evaluation_average_to_its_figures(tmp_path):
    out = tmp_path / "run"
    assert zoo(*EXACT, "--eval-every", "1", "--out", str(out)) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"iter-00000{i}.jsonl" for i in range(3)]
    curve = {r["iteration"]: r for r in rows_of(out / "metrics.jsonl") if "eval/kl_to_ref" in r}
    summary = json.loads((out / "summary.json").read_text())
    for step in (0, 1, 2):
        rows = rows_of(out / "samples" / f"iter-{step:06d}.jsonl")
        assert len(rows) == EXACT_PROMPTS and len({r["prompt"] for r in rows}) == EXACT_PROMPTS
        for key in ("proxy", "gold"):
            assert np.mean([r[f"{key}_score"] for r in rows]) == pytest.approx(curve[step][f"eval/{key}_reward"], rel=1e-9, abs=1e-12)
        assert np.mean([r["kl"] for r in rows]) == pytest.approx(curve[step]["eval/kl_to_ref"], rel=1e-9, abs=1e-12)
        for r in rows:
            probs = [t["probability"] for t in r["top"]]
            assert len(r["top"]) == EXACT_TOP and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
            assert (r["response"], r["probability"]) == (r["top"][0]["response"], probs[0])
            assert 1.0 <= r["response_length"] <= 4.0 and 0.0 <= r["eos"] <= 1.0
            assert r["kl"] >= -1e-12
    assert all(abs(r["kl"]) < 1e-12 for r in rows_of(out / "samples" / "iter-000000.jsonl"))  # the reference itself
    final = rows_of(out / "samples" / "iter-000002.jsonl")  # the final evaluation: summary.json's figures
    assert np.mean([r["proxy_score"] for r in final]) == pytest.approx(summary["proxy_reward"], rel=1e-9)
    assert np.mean([r["gold_score"] for r in final]) == pytest.approx(summary["gold_reward"], rel=1e-9)
    assert np.mean([r["kl"] for r in final]) == pytest.approx(summary["kl_to_ref"], rel=1e-9)


def test_sampled_task_rows_per_response_average_to_the_summary(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "ppo", "--task", "hh", *SMOKE, "--eval-prompts", "4", "--eval-samples", "3",
                 "--out", str(out)]) == 0
    assert [p.name for p in (out / "samples").iterdir()] == ["iter-000002.jsonl"]  # the final evaluation only
    rows = rows_of(out / "samples" / "iter-000002.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 4 * 3
    assert [r["sample"] for r in rows] == [0, 1, 2] * 4 and len({r["prompt"] for r in rows}) == 4
    assert set(rows[0]) == {"prompt", "sample", "response", "proxy_score", "gold_score", "gold_helpfulness",
                            "gold_harmlessness", "kl", "response_length", "eos"}
    pairs = [("proxy_score", "proxy_reward"), ("gold_score", "gold_reward"), ("gold_helpfulness", "gold_helpfulness"),
             ("gold_harmlessness", "gold_harmlessness"), ("kl", "kl_to_ref"), ("response_length", "response_length"),
             ("eos", "eos_rate")]
    for key, figure in pairs:
        assert np.mean([float(r[key]) for r in rows]) == pytest.approx(summary[figure], rel=1e-6, abs=1e-6), key
    assert len({r["kl"] for r in rows}) > 1 and all(isinstance(r["response_length"], int) for r in rows)
    assert summary["examples"] == [{"prompt": r["prompt"], "response": r["response"]} for r in rows[::3]]  # kept as is


def test_best_of_n_samples_leave_kl_empty(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "best-of-n", "--task", "hh", "--device", "cpu", "--quiet", "--n", "2", "--eval-prompts", "2",
                 "--eval-samples", "2", "--out", str(out)]) == 0
    rows = rows_of(out / "samples" / "iter-000000.jsonl")  # nothing trained: iteration 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 4 and all(r["kl"] is None for r in rows)  # best-of-n's KL is its analytic bound
    assert np.mean([r["proxy_score"] for r in rows]) == pytest.approx(summary["proxy_reward"], rel=1e-6)


@pytest.mark.slow
def test_a_data_parallel_run_reports_from_rank_zero_only(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["run", "dpo", *EXACT, "--nproc", "2", "--eval-every", "1", "--report-to", "tensorboard",
                 "--out", str(out)]) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_same_scalars(out)
    assert len(rows_of(out / "samples" / "iter-000002.jsonl")) == EXACT_PROMPTS


def test_a_fresh_run_replaces_the_trackers_and_samples_of_the_run_before(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert zoo(*EXACT, "--eval-every", "1", "--report-to", "tensorboard", "--out", str(out)) == 0
    assert zoo(*EXACT, "--overwrite", "--out", str(out)) == 0
    assert not (out / "tensorboard").exists()
    assert [p.name for p in (out / "samples").iterdir()] == ["iter-000002.jsonl"]


def test_markdown_table_escapes_and_cuts():
    rows = [{"prompt": "a | b", "response": "x\ny", "score": 1 / 3, "top": [{"r": 1}]} for _ in range(25)]
    text = markdown_table(rows, max_rows=20)
    lines = text.splitlines()
    assert lines[0] == "| prompt | response | score | top |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == '| a \\| b | x y | 0.3333 | [{"r": 1}] |'
    assert "(20 of 25 rows" in text and sum(line.startswith("| a") for line in lines) == 20
