"""Issue 13: every user mistake is one line, nothing is deleted before everything is validated, one writer
per run directory, broken plugins hide nothing, prompts of unknown words are bad rows, Ctrl-C says how to
resume, and a damaged checkpoint falls back to the one before it (ending as the uninterrupted run).

Runs are the ``smoke`` preset of ppo on ``exact`` (about a second each, in-process through `main`)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _plain_registry, one_line_error  # noqa: F401 - the autouse fixture: a fresh registry, a scratch cwd

from rlhf_zoo import AlgoConfig, Algorithm, ModelPolicy, hookimpl, option
from rlhf_zoo.checkpoint import complete_checkpoints, latest_checkpoint, write_checkpoint
from rlhf_zoo.cli import main
from rlhf_zoo.conformance import check_algorithm, invalid_value_problems
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.registry import build_registry, get_registry
from rlhf_zoo.rundir import ASIDE, LOCK_FILE, holds
from rlhf_zoo.runner import run

FIXTURES = Path(__file__).parent / "fixtures"
SMOKE = ["--task", "exact", "--preset", "smoke", "--device", "cpu", "--quiet"]
FIGURES = ("gold_reward", "proxy_reward", "kl_to_ref", "kl_to_optimum", "frontier_efficiency", "generated_tokens",
           "trained_tokens")


def interrupted_line(capsys) -> str:
    """The single stderr line of a run stopped by Ctrl-C."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def zoo(*args: str) -> int:
    return main(["run", "ppo", *SMOKE, *args])


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file's bytes (the lock file aside: it names the process that last held the directory)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (2 iterations, a checkpoint after each), kept pristine: tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    get_registry(refresh=True)
    assert main(["run", "ppo", *SMOKE, "--checkpoint-every", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture
def existing(finished, tmp_path) -> Path:
    out = tmp_path / "existing"
    shutil.copytree(finished, out)
    return out


def same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "policy" / "model.safetensors")), load_file(str(b / "policy" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert {k: sa[k] for k in FIGURES} == {k: sb[k] for k in FIGURES}
    strip = [{k: v for k, v in json.loads(line).items() if "time" not in k}
             for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(line).items() if "time" not in k}
                     for line in (b / "metrics.jsonl").read_text().splitlines()]


# --- seeds ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", "1180591620717411303424"])
def test_seed_out_of_range_is_one_line(capsys, seed):
    assert main(["run", "ppo", "--seed", seed]) == 2
    assert one_line_error(capsys) == (f"zoo: error: Invalid value for '--seed': {seed} is not in the range "
                                      "0<=x<=4294967295.")


def test_task_seed_out_of_range_is_one_line(capsys):
    assert main(["run", "ppo", "--task-seed", "-2"]) == 2
    assert "'--task-seed': -2 is not in the range 0<=x<=4294967295" in one_line_error(capsys)


def test_seed_range_is_stated_in_help(capsys):
    main(["run", "ppo", "--help"])
    assert "Run seed, 0 to 4294967295 (2**32 - 1)." in " ".join(capsys.readouterr().out.split())


def test_api_seed_out_of_range_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^seed must be an integer from 0 to 4294967295 \(2\*\*32 - 1\), got -1$"):
        run("ppo", task="exact", preset="smoke", seed=-1, out=tmp_path / "r", device="cpu", progress=False)
    assert not (tmp_path / "r").exists()


# --- a plugin's __post_init__ raising ValueError / TypeError --------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--beta", "-1"], "beta must be >= 0, got -1.0"),
    (["--minibatches", "99"], "minibatches (99) must be <= batch_prompts (8)"),
])
def test_plugin_config_value_error_is_one_line(capsys, tmp_path, args, message):
    assert zoo(*args, "--out", str(tmp_path / "r")) == 1
    assert one_line_error(capsys) == f"zoo: error: {message}"
    assert not (tmp_path / "r").exists()


@dataclass(frozen=True)
class _TypeErrorConfig(AlgoConfig):
    presets = {"smoke": {}}
    knob: int = option(3, "A knob.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knob == 7:
            raise TypeError("knob 7 is not a knob")


@dataclass(frozen=True)
class _CrashingConfig(AlgoConfig):
    presets = {"smoke": {}}
    knob: int = option(3, "A knob.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if 12 // (self.knob + 1) > 100:  # a bug for knob = -1, not a validation
            raise ValueError("knob too small")


def test_plugin_config_type_error_is_a_config_error():
    with pytest.raises(ConfigError, match="^knob 7 is not a knob$"):
        _TypeErrorConfig.from_dict({"knob": 7})
    with pytest.raises(ConfigError, match="^knob must be of type int, got 'x'$"):  # before __post_init__ runs
        _TypeErrorConfig.from_dict({"knob": "x"})


def test_zoo_check_config_check_catches_a_post_init_that_is_not_one_line(tmp_path):
    assert invalid_value_problems(_TypeErrorConfig) == []

    class Plugin:
        @hookimpl
        def register_algorithms(self, register):
            register(Algorithm("toy-crash", _CrashingConfig, lambda ctx, cfg: ModelPolicy(ctx.policy), "crashes"))

    results = {r.name: r for r in check_algorithm("toy-crash", tmp_path, registry_factory=lambda extra: build_registry(
        {"toy": Plugin(), **extra}))}
    assert results["config"].passed is False
    assert results["config"].detail == ("knob=-1 raised ZeroDivisionError: integer division or modulo by zero "
                                        "(raise ValueError or ConfigError in __post_init__ for a value out of "
                                        "range, not another exception)")
    assert all(r.passed is None for name, r in results.items() if name != "config")


# --- --out ----------------------------------------------------------------------------------------------
def test_out_is_a_file(capsys, tmp_path):
    (tmp_path / "FILE").write_text("mine")
    assert zoo("--out", "FILE") == 1
    assert one_line_error(capsys) == "zoo: error: --out FILE exists and is a file, not a directory; give a directory path"
    assert (tmp_path / "FILE").read_text() == "mine"


def test_out_not_writable(capsys, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    access = os.access  # (root may write anywhere: the permission check is what is tested)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "ro" and access(p, mode))
    try:
        assert zoo("--out", "ro/run") == 1
    finally:
        ro.chmod(0o700)
    assert not (ro / "run").exists()
    assert one_line_error(capsys) == "zoo: error: --out ro/run: ro is not writable; choose a directory you can write to"


def test_out_not_empty_without_resume_says_what_is_there_and_deletes_nothing(capsys, existing):
    before = snapshot(existing)
    assert zoo("--out", str(existing)) == 1
    assert one_line_error(capsys) == (
        f"zoo: error: --out {existing} is not empty: it holds a run of ppo on exact (seed 0), metrics.jsonl (2 rows), "
        "2 checkpoints (last iter-000002), summary.json, policy/; add --resume to continue it, --overwrite to "
        "replace it, or give another --out")
    assert snapshot(existing) == before


def test_out_with_files_that_are_not_a_run_is_refused(capsys, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert zoo("--out", "home", *extra) == 1
        assert one_line_error(capsys) == ("zoo: error: --out home is not a run directory (it holds thesis.tex); "
                                          "give a new or empty directory")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--beta", "-1"], ["--task", "nosuch"], ["--device", "tpu"]])
def test_a_rejected_run_on_an_existing_run_deletes_nothing(capsys, existing, args):
    before = snapshot(existing)
    assert zoo(*args, "--out", str(existing), "--overwrite") != 0
    one_line_error(capsys)
    assert snapshot(existing) == before


def test_api_rejected_seed_on_an_existing_run_deletes_nothing(existing):
    before = snapshot(existing)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        run("ppo", task="exact", preset="smoke", seed=-1, out=existing, device="cpu", progress=False)
    assert snapshot(existing) == before


def test_resume_and_overwrite_together_are_refused(capsys, existing):
    assert zoo("--out", str(existing), "--resume", "--overwrite") == 1
    assert one_line_error(capsys) == ("zoo: error: --resume continues the run in --out and --overwrite replaces "
                                      "it: give one")


def test_overwrite_replaces_the_run(capsys, existing):
    assert zoo("--out", str(existing), "--overwrite", "--seed", "5", "--checkpoint-every", "0") == 0
    assert json.loads((existing / "summary.json").read_text())["seed"] == 5
    assert not (existing / "checkpoints").exists()  # the old run's checkpoints went with it
    assert len((existing / "metrics.jsonl").read_text().splitlines()) == 2


# --- one writer per run directory ------------------------------------------------------------------------
HOLD = ("import sys, time; from pathlib import Path; from rlhf_zoo.rundir import lock_run_dir; "
        "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_one_leaves_no_lock(capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "R")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path / "R")
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert zoo("--out", "R", *extra) == 1
            assert one_line_error(capsys) == (f"zoo: error: --out R is in use by another zoo run (pid {holder.pid} on "
                                              f"{socket.gethostname()}); wait for it to finish, or give another --out")
        assert snapshot(tmp_path / "R") == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    assert zoo("--out", "R") == 0
    assert (tmp_path / "R" / LOCK_FILE).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    assert not holds(tmp_path / "R")  # released when the run ended



def test_a_context_made_without_run_lets_go_of_its_directory_when_dropped_or_when_it_fails(tmp_path):
    import gc

    from rlhf_zoo.runner import make_context

    ctx = make_context("ppo", task="exact", out=tmp_path / "C", device="cpu", preset="smoke", progress=False)
    assert holds(tmp_path / "C")
    del ctx
    gc.collect()
    assert not holds(tmp_path / "C")
    (tmp_path / "C" / "checkpoints" / "iter-000001").mkdir(parents=True)  # a resume that fails once locked
    (tmp_path / "C" / "checkpoints" / "iter-000001" / "checkpoint.json").write_text("{}")
    (tmp_path / "C" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        make_context("ppo", task="exact", out=tmp_path / "C", device="cpu", preset="smoke", progress=False,
                     resume=True)
    assert not holds(tmp_path / "C")

# --- plugins --------------------------------------------------------------------------------------------
@pytest.fixture
def site(monkeypatch):
    """Put a fake site-packages on sys.path (as tests/test_registry.py's third_party_site)."""
    def add(name: str):
        monkeypatch.syspath_prepend(str(FIXTURES / name))
        return get_registry(refresh=True)

    yield add
    monkeypatch.undo()
    for module in ("zoo_shadow_plugin", "zoo_example_plugin", "zoo_broken_plugin"):
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    get_registry(refresh=True)


def test_a_broken_plugin_named_like_a_builtin_does_not_hide_it(site, capsys, tmp_path):
    reg = site("shadow_site")
    assert "ppo" in reg.algorithms and reg.provided_by[("algorithm", "ppo")].distribution == "rlhf-zoo"
    assert [(e.plugin, e.distribution, e.error) for e in reg.load_errors] == [
        ("ppo", "zoo-shadow-plugin", "entry point name 'ppo' is already taken by rlhf-zoo; this one was not loaded")]
    assert zoo("--out", "r") == 0


def test_run_of_a_plugin_that_failed_to_load_says_so(site, capsys):
    site("plugin_site")
    assert main(["run", "broken"]) == 2
    assert one_line_error(capsys) == (
        "zoo: error: algorithm 'broken' is not available: plugin 'broken' (zoo-broken-plugin) failed to load: "
        "ImportError: zoo_broken_plugin needs a dependency that is not installed (deliberate, for tests)")
    assert main(["run", "nosuch"]) == 2
    assert one_line_error(capsys).endswith("(plugins that failed to load: 'broken'; see zoo list)")


# --- data -----------------------------------------------------------------------------------------------
def test_prompts_of_unknown_words_are_bad_rows(capsys, tmp_path):
    rows = [{"prompt": "bonjour le monde", "chosen": "x", "rejected": "y"}] * 3
    (tmp_path / "fr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["run", "dpo", *SMOKE, "--dataset", "fr.jsonl", "--out", "r"]) == 1
    assert one_line_error(capsys) == (
        "zoo: error: fr.jsonl row 1: key 'prompt' has words the tokenizer does not know ('bonjour', 'le', 'monde'); "
        "the model would read them all as one unknown token")
    assert main(["run", "dpo", *SMOKE, "--dataset", "fr.jsonl", "--bad-rows", "drop", "--out", "r2"]) == 1
    assert one_line_error(capsys) == (
        "zoo: error: fr.jsonl: 3 of 3 rows dropped (unknown_prompt_token 3), none left; first: row 1: key 'prompt' "
        "has words the tokenizer does not know ('bonjour', 'le', 'monde'); the model would read them all as one "
        "unknown token")


# --- Ctrl-C ---------------------------------------------------------------------------------------------
class CtrlCAfter:
    """Ctrl-C during iteration ``at + 1`` (after iteration ``at`` was checkpointed)."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics) -> None:
        if iteration == self.at + 1:
            raise KeyboardInterrupt


def test_ctrl_c_prints_how_to_resume_and_the_command_resumes(capsys, monkeypatch, finished, tmp_path):
    import rlhf_zoo.registry

    monkeypatch.setattr(rlhf_zoo.registry, "_REGISTRY", build_registry({"ctrl-c": CtrlCAfter(1)}))
    args = ["run", "ppo", *SMOKE, "--checkpoint-every", "1", "--out", "R"]
    assert main(args) == 130
    assert interrupted_line(capsys) == ("zoo: interrupted: the run in R stopped; the last checkpoint is "
                                      "R/checkpoints/iter-000001; resume with: zoo " + " ".join(args) + " --resume")
    assert not holds(tmp_path / "R")
    get_registry(refresh=True)
    assert main([*args, "--resume"]) == 0
    same_run(finished, tmp_path / "R")


def test_ctrl_c_before_any_checkpoint_names_the_default_out(capsys, monkeypatch):
    import rlhf_zoo.registry

    monkeypatch.setattr(rlhf_zoo.registry, "_REGISTRY", build_registry({"ctrl-c": CtrlCAfter(0)}))
    assert main(["run", "ppo", *SMOKE]) == 130
    assert interrupted_line(capsys) == (
        "zoo: interrupted: the run in runs/ppo-exact-s0 stopped; no checkpoint was written yet; resume with: "
        "zoo run ppo " + " ".join(SMOKE) + " --out runs/ppo-exact-s0 --resume")


@pytest.mark.slow
def test_sigint_of_a_zoo_run_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_zoo", "run", "ppo", "--task", "exact", "--preset", "quick",
                             "--iterations", "1000", "--checkpoint-every", "2",  # (long enough to interrupt)
                             "--device", "cpu", "--quiet", "--out", "R"], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while latest_checkpoint(tmp_path / "R" / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    last = latest_checkpoint(tmp_path / "R" / "checkpoints")
    assert err.strip().splitlines()[-1] == (
        f"zoo: interrupted: the run in R stopped; the last checkpoint is R/checkpoints/{last.name}; resume with: "
        "zoo run ppo --task exact --preset quick --iterations 1000 --checkpoint-every 2 --device cpu --quiet --out R "
        "--resume")


# --- damaged checkpoints: fall back to the one before --------------------------------------------------
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "truncated": lambda d: _truncate(d / "state.safetensors"),
    "pickle": lambda d: torch.save({"t0": torch.zeros(3)}, d / "state.safetensors"),
    "state.json": lambda d: (d / "state.json").write_text('{"__dict__": [['),
    "no_iteration": lambda d: (d / "checkpoint.json").write_text('{"complete": true}'),
}
REASON = {
    "truncated": "state.safetensors: Error while deserializing header: incomplete metadata, file not fully covered",
    "pickle": "state.safetensors: Error while deserializing header: header too large",
    "state.json": "state.json: invalid JSON (Expecting value: line 1 column 16 (char 15))",
    "no_iteration": "checkpoint.json: no iteration number",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(capsys, finished, existing, damage):
    """The latest checkpoint (iteration 2) damaged: the resume warns naming it, continues from iteration 1,
    and ends exactly as the uninterrupted run."""
    bad = existing / "checkpoints" / "iter-000002"
    DAMAGE[damage](bad)
    assert zoo("--checkpoint-every", "1", "--out", str(existing), "--resume") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"zoo: warning: checkpoint {bad} cannot be loaded ({REASON[damage]}); resuming from the one "
                   f"before it, {existing / 'checkpoints' / 'iter-000001'}"]
    assert json.loads((existing / "config.json").read_text())["resumed_from"] == "iter-000001"
    same_run(finished, existing)
    assert [p.name for p in complete_checkpoints(existing / "checkpoints")] == ["iter-000001", "iter-000002"]


def test_no_checkpoint_that_loads_stops_with_one_line(capsys, existing):
    for d in complete_checkpoints(existing / "checkpoints"):
        _truncate(d / "state.safetensors")
    before = snapshot(existing)
    assert zoo("--checkpoint-every", "1", "--out", str(existing), "--resume") == 1
    reason = "state.safetensors: Error while deserializing header: incomplete metadata, file not fully covered"
    assert one_line_error(capsys) == (f"zoo: error: --resume: no checkpoint in {existing / 'checkpoints'} can be "
                                      f"loaded (iter-000001: {reason}; iter-000002: {reason}); drop --resume to "
                                      "start over")
    assert snapshot(existing) == before


def test_a_new_checkpoint_is_verified_before_older_ones_are_deleted(capsys, tmp_path, monkeypatch):
    import rlhf_zoo.checkpoint as ckpt

    root = tmp_path / "checkpoints"
    state = {"w": torch.ones(2)}
    for it in (1, 2):
        write_checkpoint(root, it, state, {}, keep=2)
    real = ckpt.checkpoint_problem
    monkeypatch.setattr(ckpt, "checkpoint_problem", lambda p: "disk full" if p.name == "iter-000003" else real(p))
    write_checkpoint(root, 3, state, {}, keep=2)
    assert [p.name for p in complete_checkpoints(root)] == ["iter-000001", "iter-000002", "iter-000003"]
    assert capsys.readouterr().err == (f"zoo: warning: checkpoint {root / 'iter-000003'} cannot be read back "
                                       "(disk full); older checkpoints kept\n")
    monkeypatch.setattr(ckpt, "checkpoint_problem", real)
    _truncate(root / "iter-000002" / "state.safetensors")
    write_checkpoint(root, 4, state, {}, keep=2)  # the two newest that load are kept; the damaged one goes
    assert [p.name for p in complete_checkpoints(root)] == ["iter-000003", "iter-000004"]


# --- damaged task cache ---------------------------------------------------------------------------------
@pytest.fixture
def own_cache(exact_task, tmp_path, monkeypatch) -> Path:
    """A copy of the built ``exact`` task in a cache of this test's own (the shared one stays intact)."""
    cache = tmp_path / "cache"
    shutil.copytree(exact_task.path, cache / "tasks" / exact_task.path.name)
    monkeypatch.setenv("RLHF_ZOO_CACHE", str(cache))
    return cache / "tasks" / exact_task.path.name


@pytest.mark.parametrize(("file", "damage", "why"), [
    ("sft/model.safetensors", "pickle", "is not a readable safetensors file (Error while deserializing header: "
                                        "header too large)"),
    ("reward/model.safetensors", "truncate", "is not a readable safetensors file (Error while deserializing "
                                             "header: incomplete metadata, file not fully covered)"),
    ("manifest.json", "truncate", "is not readable JSON ("),
    ("tokenizer/tokenizer.json", "delete", "is missing"),
])
def test_a_damaged_task_cache_names_the_file_and_the_rebuild(capsys, own_cache, existing, file, damage, why):
    path = own_cache / file
    if damage == "pickle":
        torch.save({"weight": torch.zeros(3)}, path)
    elif damage == "truncate":
        _truncate(path)
    else:
        path.unlink()
    before = snapshot(existing)
    assert zoo("--out", str(existing), "--overwrite") == 1
    line = one_line_error(capsys)
    assert line.startswith(f"zoo: error: task 'exact': cached file {path} {why}")
    assert line.endswith("; rebuild the task with: zoo prepare exact --rebuild")
    assert snapshot(existing) == before  # checked before the old run was replaced


def test_prepare_has_rebuild(capsys):
    main(["prepare", "--help"])
    assert "--rebuild" in capsys.readouterr().out


def test_a_nan_option_is_refused_naming_it():
    from rlhf_zoo_plugins.ppo import PPOPtxConfig

    for key in ("ptx_coef", "beta", "learning_rate"):
        with pytest.raises(ConfigError, match=f"^{key} must be a number, got nan$"):
            PPOPtxConfig.from_dict({key: float("nan")})


def test_a_damaged_arrow_file_in_the_task_cache_is_one_line_naming_it(tmp_path):
    import shutil

    from rlhf_zoo.errors import ZooError
    from rlhf_zoo_envs.tasks.base import Task

    exact = get_registry().task("exact").load(seed=0, progress=False)
    copy = tmp_path / "exact"
    shutil.copytree(exact.path, copy)
    arrow = next((copy / "data" / "pairs").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:1000])  # truncated
    task = Task.from_dir(copy, exact.language, name="exact", seed=0, max_new_tokens=exact.max_new_tokens,
                         beta=exact.beta, missing_eos_penalty=exact.missing_eos_penalty)
    with pytest.raises(ZooError, match=r"^task 'exact': cached dataset .*pairs cannot be read \(.*\); rebuild "
                                       r"the task with: zoo prepare exact --rebuild$"):
        task.dataset("pairs")
    assert len(task.dataset("sft")) > 0  # the undamaged ones still load


# --- --overwrite loses nothing to a run that fails or stops before its first iteration ---------------------
DPO_SMOKE = ["run", "dpo", "--task", "exact", "--preset", "smoke", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"),
    ('{"prompt": "a b", "chosen": "c d", "rejected": "b a"}\n[not json\n', "row 2: invalid JSON"),
    ('{"prompt": "a b", "chosen": "c d"}\n', "rejected"),
])
def test_overwrite_with_a_bad_dataset_keeps_the_earlier_run(capsys, existing, tmp_path, content, expected):
    """The --dataset file is read when training starts, after the run directory was prepared: the earlier
    run is set aside then, and put back when the new run stops before its first iteration."""
    data = tmp_path / "prefs.jsonl"
    if content is not None:
        data.write_text(content)
    before = snapshot(existing)
    assert main([*DPO_SMOKE, "--dataset", str(data), "--out", str(existing), "--overwrite"]) == 1
    assert expected in one_line_error(capsys)
    assert snapshot(existing) == before
    assert not (existing / ASIDE).exists()


def test_a_failed_start_in_a_new_directory_leaves_it_empty_for_the_retry(capsys, tmp_path):
    assert main([*DPO_SMOKE, "--dataset", "missing.jsonl", "--out", "R"]) == 1
    one_line_error(capsys)
    assert sorted(p.name for p in (tmp_path / "R").iterdir()) == [LOCK_FILE]
    assert main([*DPO_SMOKE, "--out", "R"]) == 0  # the same --out, without --overwrite


class CtrlCAtStart:
    @hookimpl
    def on_run_start(self, run) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_before_the_first_iteration_of_an_overwrite_keeps_the_earlier_run(capsys, monkeypatch, existing):
    import rlhf_zoo.registry

    monkeypatch.setattr(rlhf_zoo.registry, "_REGISTRY", build_registry({"ctrl-c": CtrlCAtStart()}))
    before = snapshot(existing)
    args = ["run", "ppo", *SMOKE, "--out", str(existing), "--overwrite", "--seed", "3"]
    assert main(args) == 130
    assert interrupted_line(capsys) == (f"zoo: interrupted: the run in {existing} stopped before its first iteration "
                                      f"and wrote nothing ({existing} holds what it held before); start it again "
                                      "with: zoo " + " ".join(args))
    assert snapshot(existing) == before and not (existing / ASIDE).exists()


def test_a_replacement_killed_before_its_first_iteration_leaves_a_directory_a_new_run_takes(capsys, existing):
    """A run killed (SIGKILL) between setting the earlier run aside and its first iteration leaves
    ``.replaced/``: the directory is still a run directory, refused without --overwrite, taken with it."""
    (existing / ASIDE).mkdir()
    for name in ("checkpoints", "summary.json", "policy"):
        (existing / name).rename(existing / ASIDE / name)
    assert zoo("--out", str(existing)) == 1
    assert "is not empty: it holds a run of ppo on exact (seed 0)" in one_line_error(capsys)
    assert zoo("--out", str(existing), "--overwrite", "--seed", "4") == 0
    assert json.loads((existing / "summary.json").read_text())["seed"] == 4
    assert not (existing / ASIDE).exists()
