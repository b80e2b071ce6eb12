"""Execute a suite's runs: one `rlhf_zoo.runner.run` per (algorithm, task, variant, seed), each in a fresh
process (`rlhf_zoo.bench.worker`), skipping runs whose summary.json exists (the benchmark resumes).

A finished run is reused only if its config.json matches what the suite asks for (algorithm, task, seed,
preset, resolved config); otherwise the benchmark stops rather than mix two protocols in one table.

Each executed run's process time (start-up, task loading and evaluation included, which summary.json's
``wall_seconds`` leaves out), wall-clock and CPU (user + system, which a busy machine inflates less), is
kept in the run directory (``bench_time.json``), so a resumed benchmark still reports what its runs cost.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf_zoo.bench.suite import RunSpec
from rlhf_zoo.errors import ZooError

STDERR_LOG = "stderr.log"
BENCH_TIME = "bench_time.json"


class RunFailedError(ZooError):
    """A benchmark run exited with an error; its stderr is kept in the run directory."""


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    summary: dict[str, Any]
    run_config: dict[str, Any]  # the run's config.json (versions, git commit, device, argv)
    executed: bool  # False: reused from an earlier invocation
    #: seconds of the run's whole process (start-up and evaluation included); None when not recorded
    process_seconds: float | None = None
    #: CPU seconds (user + system) of that process; None when not recorded
    cpu_seconds: float | None = None


def check_resumable(spec: RunSpec, run_dir: Path) -> None:
    """Raise if the finished run in ``run_dir`` is not the run ``spec`` describes."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ZooError(f"{run_dir} has summary.json but no config.json; delete the directory to rerun it")
    got = json.loads(path.read_text())
    want = {"algorithm": spec.algorithm, "task": "user" if spec.setup else spec.task, "seed": spec.seed,
            "preset": spec.preset, "config": spec.config,
            **({"setup": json.loads(json.dumps({k: v for k, v in spec.setup.items() if v}))} if spec.setup else {})}
    diff = [k for k, v in want.items() if got.get(k) != v]
    if diff:
        details = "; ".join(f"{k}: found {got.get(k)!r}, expected {want[k]!r}" for k in diff)
        raise ZooError(f"{run_dir} holds a different run ({details}); use another --out or delete it")


def execute(spec: RunSpec, run_dir: Path, device: str, threads: int | str = "auto") -> None:
    """Run ``spec`` in a fresh Python process (torch ``threads``: N or ``"auto"``, `rlhf_zoo.threads`); on
    failure keep stderr in the run directory and raise."""
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"algorithm": spec.algorithm, "task": spec.task, "seed": spec.seed, "out": str(run_dir),
               "device": device, "preset": spec.preset, "options": spec.options, "setup": spec.setup,
               "threads": threads}
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-m", "rlhf_zoo.bench.worker", json.dumps(payload)],
                          capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if proc.returncode != 0:
        (run_dir / STDERR_LOG).write_text(proc.stderr)
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RunFailedError(f"{spec.algorithm} on {spec.task} ({spec.variant}, seed {spec.seed}) failed: {last} "
                             f"(full stderr: {run_dir / STDERR_LOG}); rerun the same command to resume")
    (run_dir / BENCH_TIME).write_text(json.dumps({"process_seconds": elapsed, "cpu_seconds": cpu}))


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_seconds(run_dir: Path, key: str = "process_seconds") -> float | None:
    """The run's recorded process time, or with ``key="cpu_seconds"`` its CPU time (see `execute`); None
    for a run made before they were recorded."""
    try:
        value = json.loads((run_dir / BENCH_TIME).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_all(specs: list[RunSpec], out: Path, *, device: str = "auto", progress: bool = True,
            threads: int | str = "auto") -> list[RunResult]:
    """Every run of ``specs`` under ``out/runs/``, with a progress bar over runs; ``threads``: every executed
    run's torch threads (not part of a run's identity: a finished run made with another count is reused)."""
    results = []
    bar = tqdm(specs, desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        run_dir = spec.run_dir(out)
        done = (run_dir / "summary.json").is_file()
        bar.set_postfix_str(f"{spec.task}/{spec.algorithm}/{spec.variant}/seed{spec.seed}"
                            + (" (done)" if done else ""), refresh=True)
        if done:
            check_resumable(spec, run_dir)
        else:
            execute(spec, run_dir, device, threads)
        results.append(RunResult(spec, json.loads((run_dir / "summary.json").read_text()),
                                 json.loads((run_dir / "config.json").read_text()), executed=not done,
                                 process_seconds=process_seconds(run_dir),
                                 cpu_seconds=process_seconds(run_dir, "cpu_seconds")))
    return results
