"""From run summaries to benchmark records: per (algorithm, task, variant) the mean, IQM and 95%
stratified-bootstrap intervals of each metric over seeds, budgets and timings; and the probability of
improvement (gold reward) for every ordered pair of algorithms on each task.

Within one record the only stratum is the task, so the stratified bootstrap resamples seeds; P(X > Y)
compares the ``default`` variants of two algorithms on one task.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_zoo.bench import stats
from rlhf_zoo.bench.execute import RunResult
from rlhf_zoo.bench.suite import DEFAULT_VARIANT

METRICS = ("gold_reward", "proxy_reward", "kl_to_ref", "baseline_gold_reward", "kl_to_optimum",
           "frontier_efficiency", "win_rate_vs_reference", "baseline_proxy_reward")
BUDGET = ("generated_tokens", "trained_tokens")
SYSTEMS = ("wall_seconds", "train_seconds", "tokens_per_second", "peak_memory_mb")


def metric_stats(values: list[float], *, n_resamples: int, seed: int) -> dict[str, Any]:
    """Point estimates and 95% percentile intervals (bootstrap over seeds) of one metric."""
    x = np.asarray(values, dtype=np.float64)
    ci = dict(n_resamples=n_resamples, seed=seed)
    return {"iqm": float(stats.iqm(x)), "iqm_ci": list(stats.stratified_bootstrap_ci(x, stats.iqm, **ci)),
            "mean": float(stats.mean(x)), "mean_ci": list(stats.stratified_bootstrap_ci(x, stats.mean, **ci)),
            "per_seed": [float(v) for v in x]}


def _group(runs: list[RunResult]) -> dict[tuple[str, str, str], list[RunResult]]:
    groups: dict[tuple[str, str, str], list[RunResult]] = defaultdict(list)
    for r in runs:
        groups[(r.spec.task, r.spec.algorithm, r.spec.variant)].append(r)
    return groups


def build_records(runs: list[RunResult], *, n_resamples: int = stats.BOOTSTRAP_RESAMPLES,
                  seed: int = 0) -> list[dict[str, Any]]:
    """One record per (task, algorithm, variant), in the order the runs were given."""
    records = []
    for (task, algorithm, variant), group in _group(runs).items():
        group = sorted(group, key=lambda r: r.spec.seed)
        summaries = [r.summary for r in group]
        extra = sorted({k for s in summaries for k in s if k.startswith("gold_") and k != "gold_reward"})
        metrics = {k: metric_stats([s[k] for s in summaries], n_resamples=n_resamples, seed=seed)
                   for k in (*METRICS, *extra) if all(isinstance(s.get(k), (int, float)) for s in summaries)}
        phases = sorted({p for s in summaries for p in s.get("phase_seconds", {})})
        records.append({
            "task": task, "algorithm": algorithm, "variant": variant, "preset": group[0].spec.preset,
            "options": group[0].spec.options, "config": group[0].spec.config,
            "seeds": [r.spec.seed for r in group], "metrics": metrics,
            "budget": {k: {"mean": float(np.mean([s.get(k, 0) for s in summaries])),
                           "per_seed": [int(s.get(k, 0)) for s in summaries]} for k in BUDGET},
            "systems": {k: {"mean": float(np.mean([s[k] for s in summaries])), "per_seed": [s[k] for s in summaries]}
                        for k in SYSTEMS if all(k in s for s in summaries)},
            "phase_seconds": {p: float(np.mean([s.get("phase_seconds", {}).get(p, 0.0) for s in summaries]))
                              for p in phases},
            "run_dirs": [str(r.spec.run_dir(Path())) for r in group],  # relative to the benchmark directory
        })
    return records


def improvement_pairs(records: list[dict[str, Any]], metric: str = "gold_reward", *,
                      n_resamples: int = stats.BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[dict[str, Any]]:
    """P(X > Y) of ``metric`` with its 95% interval for every ordered pair of algorithms (default variants)
    on each task."""
    out = []
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["variant"] == DEFAULT_VARIANT and metric in r["metrics"]:
            by_task[r["task"]].append(r)
    for task, recs in by_task.items():
        for a in recs:
            for b in recs:
                if a is b:
                    continue
                x, y = a["metrics"][metric]["per_seed"], b["metrics"][metric]["per_seed"]
                out.append({"task": task, "x": a["algorithm"], "y": b["algorithm"], "metric": metric,
                            "p": float(stats.probability_of_improvement(np.array(x), np.array(y))),
                            "ci": list(stats.probability_of_improvement_ci(np.array(x), np.array(y),
                                                                           n_resamples=n_resamples, seed=seed))})
    return out
