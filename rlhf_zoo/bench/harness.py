"""``zoo bench``: run a suite and write DIR/results.json, DIR/report.md and DIR/plots/*.png.

    1) expand the suite into runs (configs resolved and validated before anything runs);
    2) run each one with `rlhf_zoo.runner.run` in a fresh process into DIR/runs/TASK/ALGO/VARIANT/seedS,
       skipping finished runs (resume);
    3) aggregate over seeds (IQM, mean, stratified-bootstrap intervals, probability of improvement);
    4) on enumerable tasks (``exact``), compute the exact frontier and the best-of-N known results;
    5) write results.json, the plots (when matplotlib is installed) and report.md.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from rlhf_zoo.bench import aggregate, exact_checks, plots, report, stats
from rlhf_zoo.bench.execute import RunResult, run_all
from rlhf_zoo.bench.suite import Suite, expand
from rlhf_zoo.registry import Registry, get_registry
from rlhf_zoo.runner import versions

KNOWN_BEST_OF_N = (2, 4, 8, 16)
IQM_NOTE = ("mean of the middle 50% of the empirical distribution, sorted scores straddling a quartile "
            "weighted fractionally (n = 3: (x1 + 4 x2 + x3) / 6; n = 5: (3 x2 + 4 x3 + 3 x4) / 10); equals "
            "rliable's scipy trim_mean(0.25) when n is a multiple of 4")


def machine_info(runs: list[RunResult]) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "devices": sorted({str(r.run_config.get("device", "unknown")) for r in runs}),
            # each run's own count (config.json; its process chose it: --threads), where recorded
            "run_torch_threads": sorted({int(r.run_config["torch_threads"]) for r in runs
                                         if isinstance(r.run_config.get("torch_threads"), int)})}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def provenance_warnings(runs: list[RunResult]) -> list[str]:
    """Resumed benchmarks can mix code or library versions: say so in the report."""
    out = []
    commits = {r.run_config.get("git_commit") for r in runs}
    if len(commits) > 1:
        out.append(f"runs come from {len(commits)} git commits: {sorted(c or 'unknown' for c in commits)}")
    if len({json.dumps(r.run_config.get("versions"), sort_keys=True) for r in runs}) > 1:
        out.append("runs were made with different library versions (see each run's config.json)")
    if len({r.run_config.get("device") for r in runs}) > 1:
        out.append("runs were made on different devices; wall times are not comparable across them")
    return out


def timing(runs: list[RunResult], elapsed: float) -> dict[str, Any]:
    """What the runs cost: the sum of their ``wall_seconds`` (summary.json: the run itself, without process
    start-up), the sums of their whole processes' wall-clock and CPU times where recorded (start-up, task
    loading and evaluation included; runs reused from before these were recorded are counted in
    ``runs_without_process_time``), and this invocation's time spent running and reusing runs."""
    timed = [r for r in runs if r.process_seconds is not None]
    return {"run_wall_seconds": float(sum(float(r.summary.get("wall_seconds", 0.0)) for r in runs)),
            "run_process_seconds": float(sum(r.process_seconds for r in timed)),
            "run_cpu_seconds": float(sum(r.cpu_seconds or 0.0 for r in timed)),
            "runs_without_process_time": len(runs) - len(timed), "elapsed_seconds": float(elapsed)}


def known_results(suite: Suite, registry: Registry, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact frontier and best-of-N checks for every enumerable task of the suite (e.g. ``exact``)."""
    out = {}
    for name in suite.tasks:
        if name in suite.setups:
            continue
        task = registry.task(name).load(seed=0, progress=False)  # the runner's default task_seed
        if not hasattr(task, "space"):
            continue
        ns = {int(r["config"]["n"]) for r in records if r["task"] == name and r["algorithm"] == "best-of-n"}
        out[name] = exact_checks.exact_checks(task, sorted(ns | set(KNOWN_BEST_OF_N)))
    return out


def run_bench(suite: Suite, out: str | Path, *, device: str = "auto", progress: bool = True,
              command: str | None = None, n_resamples: int = stats.BOOTSTRAP_RESAMPLES, bootstrap_seed: int = 0,
              draw_plots: bool = True, registry: Registry | None = None,
              threads: int | str = "auto") -> dict[str, Any]:
    """Run (or resume) ``suite`` into ``out``; returns results.json's content. ``threads``: torch threads of
    every run's process (`rlhf_zoo.threads`: N or ``"auto"``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars of the exact checks' model loads
    out, registry = Path(out), registry or get_registry()
    # 1-2) runs
    start = time.perf_counter()
    runs = run_all(expand(suite, registry), out, device=device, progress=progress, threads=threads)
    elapsed = time.perf_counter() - start
    # 3) aggregates
    ci = dict(n_resamples=n_resamples, seed=bootstrap_seed)
    records = aggregate.build_records(runs, **ci)
    results: dict[str, Any] = {
        "suite": suite.to_dict(), "command": command or shlex.join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protocol": {"checkpoint": "final", "seeds": "paired", "iqm": IQM_NOTE, "ci": "percentile",
                     "bootstrap": "stratified by task (seeds resampled within each task)",
                     "n_resamples": n_resamples, "confidence": stats.CONFIDENCE, "bootstrap_seed": bootstrap_seed,
                     "budget": f"each algorithm's {suite.preset!r} preset"
                               + (" with the suite's options" if suite.options else "") + " (not equalised)"},
        "machine": machine_info(runs), "versions": versions(),
        "git_commits": sorted({r.run_config.get("git_commit") for r in runs}, key=str),
        "warnings": provenance_warnings(runs),
        "execution": {"runs": len(runs), "executed": sum(r.executed for r in runs),
                      "skipped": sum(not r.executed for r in runs)},
        "timing": timing(runs, elapsed),
        "records": records,
        "probability_of_improvement": aggregate.improvement_pairs(records, **ci),
        # 4) known results
        "exact_checks": known_results(suite, registry, records),
        "plots": [],
    }
    # 5) outputs
    if draw_plots and plots.available():
        results["plots"] = plots.draw_all(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report.render(results))
    return results
