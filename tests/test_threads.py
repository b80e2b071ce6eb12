"""``--threads`` (issue 15 item 6): parsing and one-line errors, the ``auto`` policy as a pure function on
hand-computed cases, ``zoo run --threads 1`` recording its count in config.json, ``--resume`` with another
count, and ``zoo bench --threads`` reaching every run's worker."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_zoo import threads as T
from rlhf_zoo.cli import build_cli, main
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, get_registry
from test_cli import one_line_error


@pytest.fixture(autouse=True)
def _plain(monkeypatch, tmp_path):
    """A fresh registry, a scratch cwd, and torch's thread count put back after each test."""
    monkeypatch.delenv(ENV_BLOCK, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    monkeypatch.undo()
    get_registry(refresh=True)


# --- parsing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("AUTO", "auto"), ("1", 1), (" 3 ", 3), (8, 8)])
def test_parse_threads_accepts_auto_and_whole_numbers(value, expected):
    assert T.parse_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "", 0, True])
def test_parse_threads_refuses_anything_else(value):
    with pytest.raises(ConfigError, match=r"^--threads .*expected auto or a whole number"):
        T.parse_threads(value)


@pytest.mark.parametrize("value", ["0", "-1", "x"])
@pytest.mark.parametrize("command", [["run", "grpo", "--task", "exact"], ["eval", "somewhere"],
                                     ["bench", "--algos", "best-of-n", "--out", "b"]])
def test_bad_threads_is_one_line_naming_the_option(capsys, command, value):
    assert main([*command, "--threads", value]) != 0
    line = one_line_error(capsys)
    assert "--threads" in line and repr(value) in line


def test_run_help_shows_the_option_with_its_default(capsys):
    rc = build_cli().commands["run"].main(["grpo", "--help"], prog_name="zoo run", standalone_mode=False)
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads auto|N torch threads of the process" in text
    assert "OMP_NUM_THREADS" in text and "[default: auto]" in text


# --- the auto policy, a pure function --------------------------------------------------------------------
@pytest.mark.parametrize("facts, threads", [
    (dict(cores=2, load=0.3), 2),  # idle 2-core machine, a model that is not a built-in task's: every core
    (dict(cores=2, load=1.0), 2),  # load 1.0 does not exceed cores - 1 = 1
    (dict(cores=2, load=1.01), 1),  # ... 1.01 does: one thread
    (dict(cores=16, load=14.9), 16),
    (dict(cores=16, load=15.5), 1),
    (dict(cores=8, load=None), 8),  # no load average on this OS: not busy
    (dict(cores=16, local_world_size=2, load=3.0), 8),  # --nproc 2: 16 // 2
    (dict(cores=16, local_world_size=3, load=0.0), 5),  # 16 // 3
    (dict(cores=2, local_world_size=4, load=0.0), 1),  # more ranks than cores: at least 1
    (dict(cores=64, load=0.0, tiny_task=True), 1),  # a built-in task: 1 even on an idle 64-core machine
    (dict(cores=64, load=0.0, tiny_task=True, env={"OMP_NUM_THREADS": "3"}), 3),  # the user's variable wins
    (dict(cores=2, load=5.0, env={"OMP_NUM_THREADS": "4"}), 4),
    (dict(cores=16, load=0.0, env={"MKL_NUM_THREADS": "6"}), 6),
    (dict(cores=16, load=0.0, env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "6"}), 2),  # OMP first, as torch
    (dict(cores=16, load=0.0, env={"OMP_NUM_THREADS": "x"}), 16),  # not a count: ignored
    (dict(cores=16, load=0.0, env={"OMP_NUM_THREADS": "0"}), 16),
    # zoo run --nproc's launcher set OMP_NUM_THREADS=1 (marked): not the user's, so 16 // 4
    (dict(cores=16, local_world_size=4, load=0.0, env={"OMP_NUM_THREADS": "1", T.LAUNCHER_MARK: "1"}), 4),
    # torchrun's own OMP_NUM_THREADS=1 (unmarked) is kept
    (dict(cores=16, local_world_size=4, load=0.0, env={"OMP_NUM_THREADS": "1"}), 1),
])
def test_auto_threads_hand_cases(facts, threads):
    assert T.auto_threads(**facts).threads == threads


def test_auto_threads_says_why():
    assert "OMP_NUM_THREADS=3 in the environment" in T.auto_threads(cores=4, env={"OMP_NUM_THREADS": "3"}).reason
    assert "built-in task" in T.auto_threads(cores=4, tiny_task=True).reason
    assert "load average 3.50 > 3" in T.auto_threads(cores=4, load=3.5).reason
    assert T.auto_threads(cores=16, local_world_size=2, load=0.0).reason == \
        "auto: 16 usable cores // 2 processes on this machine"


def test_choose_threads_gathers_this_machines_facts(monkeypatch):
    monkeypatch.setattr(T, "usable_cores", lambda: 12)
    monkeypatch.setattr(T, "load_average", lambda: 2.0)
    assert T.choose_threads("auto", task="exact", env={}).threads == 1  # a built-in task
    assert T.choose_threads("auto", task="exact", own_model=True, env={}).threads == 12  # own model: not tiny
    assert T.choose_threads("auto", task="someone-elses", env={"LOCAL_WORLD_SIZE": "3"}).threads == 4
    monkeypatch.setattr(T, "load_average", lambda: 11.5)
    assert T.choose_threads("auto", task="someone-elses", env={}).threads == 1  # 11.5 > 12 - 1
    given = T.choose_threads("5", task="exact", env={"OMP_NUM_THREADS": "2"})  # N wins over the environment
    assert given == T.ThreadChoice(5, "--threads 5 (over OMP_NUM_THREADS=2 in the environment)")
    torch.set_num_threads(3)
    assert T.choose_threads(None).threads == 3  # None: the process's setting, left alone


def test_launcher_env_marks_the_omp_it_sets_and_keeps_the_users():
    env = T.launcher_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", T.LAUNCHER_MARK: "1"}
    assert T.user_thread_env(env) is None
    assert T.launcher_env({"OMP_NUM_THREADS": "2"}) == {"OMP_NUM_THREADS": "2"}


def test_apply_threads_sets_torch():
    T.apply_threads(T.ThreadChoice(2, "test"))
    assert torch.get_num_threads() == 2
    T.apply_threads(T.ThreadChoice(1, "test"))
    assert torch.get_num_threads() == 1


# --- a real run --------------------------------------------------------------------------------------------
def test_zoo_run_records_its_threads_and_resume_accepts_another_count(tmp_path):
    out = tmp_path / "run"
    torch.set_num_threads(2)  # the run sets 1 whatever the process had
    args = ["run", "grpo", "--task", "exact", "--preset", "smoke", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main([*args, "--threads", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["torch_threads"] == 1 and torch.get_num_threads() == 1
    assert config["torch_threads_reason"].startswith("--threads 1")
    assert "threads" not in config["config"]  # a run option, not the algorithm's config
    first = json.loads((out / "summary.json").read_text())
    # not part of the run's identity: --resume with another count continues the run instead of refusing it
    assert main([*args, "--resume", "--threads", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["torch_threads"] == 2 and config["resumed_from"] is not None
    assert json.loads((out / "summary.json").read_text())["seed"] == first["seed"]


# --- zoo bench ---------------------------------------------------------------------------------------------
def test_bench_threads_reach_every_runs_worker(tmp_path, monkeypatch):
    import subprocess

    from rlhf_zoo.bench import execute, worker
    from rlhf_zoo.bench.suite import Suite, expand

    spec = expand(Suite("t", ("best-of-n",), ("exact",), (0,), preset="smoke"), get_registry())[0]
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(json.loads(argv[-1]))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(execute.subprocess, "run", fake_run)
    execute.execute(spec, tmp_path / "r", "cpu", threads=1)
    execute.execute(spec, tmp_path / "r", "cpu")
    assert [c["threads"] for c in calls] == [1, "auto"]
    got = {}
    monkeypatch.setattr("rlhf_zoo.runner.run", lambda name, **kw: got.update(kw))
    worker.main([json.dumps(calls[0])])
    assert got["threads"] == 1


# --- benchmarks/threads.py: its table from samples ---------------------------------------------------------
def test_threads_benchmark_medians_and_speedups():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "threads.py"
    spec = importlib.util.spec_from_file_location("zoo_threads_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def sample(threads, condition, run, rep):
        return {"case": "grpo-exact", "condition": condition, "threads": threads, "rep": rep, "run_seconds": run,
                "process_seconds": run + 4.0, "cpu_seconds": run, "load_before": 0.5}

    samples = [sample(1, "alone", r, i) for i, r in enumerate((10.0, 12.0, 11.0))]
    samples += [sample(2, "alone", r, i) for i, r in enumerate((6.0, 5.0, 40.0))]
    samples += [sample(1, "busy", r, i) for i, r in enumerate((12.0, 13.0, 14.0))]
    samples += [sample(2, "busy", r, i) for i, r in enumerate((52.0, 39.0, 65.0))]
    rows = {(r["condition"], r["threads"]): r for r in bench.summarise(samples)}
    assert rows[("alone", 1)]["median_run_seconds"] == 11.0 and rows[("alone", 2)]["median_run_seconds"] == 6.0
    assert rows[("alone", 2)]["median_process_seconds"] == 10.0
    assert rows[("alone", 2)]["run_speedup_vs_1"] == pytest.approx(11 / 6, abs=1e-3)
    assert rows[("busy", 2)]["run_speedup_vs_1"] == pytest.approx(13 / 52, abs=1e-3)  # oversubscribed: 0.25x
    assert rows[("busy", 1)]["run_speedup_vs_1"] == 1.0 and rows[("busy", 1)]["reps"] == 3
    result = {"quick": False, "command": "c", "git_commit": "g", "created": "now", "versions": {"torch": "x"},
              "machine": {"platform": "p", "processor": "x86", "cpu_count": 2, "usable_cores": 2},
              "load_before": 0.5, "load_after": 0.6, "summary": list(rows.values()),
              "settings": {"cases": ["grpo-exact"], "conditions": ["alone", "busy"], "threads": [1, 2], "reps": 3,
                           "busy": 1}}
    table = bench.render(result)
    assert "| grpo-exact | busy | 13.000 | 17.00 | 52.000 | 56.00 | 0.25x | 0.5 |" in table
    assert "| grpo-exact | alone | 11.000 | 15.00 | 6.000 | 10.00 | 1.83x | 0.5 |" in table
