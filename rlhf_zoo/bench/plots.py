"""Benchmark figures (PNG, matplotlib's Agg backend), drawn from results.json's content alone:

- ``frontier_TASK.png``: gold reward vs KL to the reference, one point per algorithm variant (IQM over
  seeds, 95% interval bars on both axes), variants of one algorithm joined by increasing KL, and the SFT
  policy at KL 0; on ``exact`` also the exact optimal frontier (pi*_beta over a beta sweep), drawn up to a
  little past the largest KL a run reached so that the runs are not squeezed into a corner; beside it a
  detail panel of the low-KL region when several variants crowd there;
- ``overoptimisation_TASK.png``: proxy vs gold reward per run, one colour per algorithm (Gao et al.
  2022: past some point the proxy keeps rising while the gold reward stalls or falls);
- ``systems_TASK.png``: time per phase (stacked, mean over seeds, the rest of the wall time as "other"),
  tokens/s and peak memory per algorithm (default variants).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_zoo.bench.suite import DEFAULT_VARIANT


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_algorithm(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["algorithm"], []).append(r)
    return out


def _err(m: dict[str, Any]) -> list[list[float]]:
    lo, hi = m["iqm_ci"]
    return [[max(m["iqm"] - lo, 0.0)], [max(hi - m["iqm"], 0.0)]]


#: the exact frontier is drawn up to this multiple of the largest KL (upper interval end) a run reached
CURVE_MARGIN = 1.3


def curve_extent(curve: dict[str, list[float]], records: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The exact frontier's (KL, reward) points up to ``CURVE_MARGIN`` x the largest KL of ``records`` (the
    first point past it included, so the curve reaches the edge); the whole curve when no record has a KL."""
    kls = [r["metrics"]["kl_to_ref"]["iqm_ci"][1] for r in records if "kl_to_ref" in r["metrics"]]
    xs, ys = list(curve["kl"]), list(curve["reward"])
    if not kls or max(kls) <= 0:
        return xs, ys
    limit = CURVE_MARGIN * max(kls)
    n = next((i + 1 for i, x in enumerate(xs) if x > limit), len(xs))
    return xs[:n], ys[:n]


def sft_gold(records: list[dict[str, Any]]) -> float | None:
    """The SFT policy's gold reward on the benchmark's evaluation (mean over runs), or None."""
    values = [r["metrics"]["baseline_gold_reward"]["mean"] for r in records if "baseline_gold_reward" in r["metrics"]]
    return sum(values) / len(values) if values else None


#: the detail panel shows KL up to this share of the largest KL reached, where the short runs crowd
DETAIL_SHARE = 0.3


def detail_limit(records: list[dict[str, Any]]) -> float | None:
    """The KL up to which the frontier plot's detail panel looks, or None when no detail is needed: fewer
    than 3 variants lie below ``DETAIL_SHARE`` x the largest KL, or none above it."""
    kls = [r["metrics"]["kl_to_ref"]["iqm"] for r in records if {"kl_to_ref", "gold_reward"} <= set(r["metrics"])]
    if not kls or max(kls) <= 0:
        return None
    limit = DETAIL_SHARE * max(kls)
    inside = sum(k <= limit for k in kls)
    return limit if inside >= 3 and inside < len(kls) else None


def _frontier_axes(ax: Any, records: list[dict[str, Any]], curve: tuple[list[float], list[float]] | None,
                   sft: float | None, fontsize: int) -> None:
    """The exact curve, the SFT point, and each algorithm's variants (joined by increasing KL, interval bars
    on both axes, the default variant a square, the others labelled) on one axes."""
    if curve:
        ax.plot(*curve, "k-", lw=1.5, label="optimal pi*_beta (exact)")
    if sft is not None:
        ax.plot([0.0], [sft], "k*", ms=10, label="SFT (reference)")
    for i, (algo, recs) in enumerate(_by_algorithm(records).items()):
        recs = sorted((r for r in recs if {"gold_reward", "kl_to_ref"} <= set(r["metrics"])),
                      key=lambda r: r["metrics"]["kl_to_ref"]["iqm"])
        xs = [r["metrics"]["kl_to_ref"]["iqm"] for r in recs]
        ys = [r["metrics"]["gold_reward"]["iqm"] for r in recs]
        color = f"C{i % 10}"
        ax.plot(xs, ys, "-", color=color, alpha=0.5)
        for r, x, y in zip(recs, xs, ys, strict=True):
            default = r["variant"] == DEFAULT_VARIANT
            ax.errorbar([x], [y], xerr=_err(r["metrics"]["kl_to_ref"]), yerr=_err(r["metrics"]["gold_reward"]),
                        fmt="s" if default else "o", ms=7 if default else 5, color=color, capsize=3,
                        label=algo if r is recs[0] else None)
            if not default:
                ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=fontsize)


def frontier(task: str, records: list[dict[str, Any]], exact: dict[str, Any] | None, path: Path) -> None:
    plt = _pyplot()
    limit = detail_limit(records)
    fig, axes = plt.subplots(1, 2 if limit else 1, figsize=(15, 6.5) if limit else (8, 6), squeeze=False)
    ax = axes[0][0]
    sft = exact["baseline_gold_reward"] if exact else sft_gold(records)
    curve = curve_extent(exact["frontier"], records) if exact else None
    _frontier_axes(ax, records, curve, sft, 7)
    xlabel, ylabel = "KL(pi || pi_ref)  (IQM over seeds, 95% CI)", "gold reward  (IQM over seeds, 95% CI)"
    if limit:
        detail = axes[0][1]
        _frontier_axes(detail, records, curve, sft, 8)
        shown = [r["metrics"] for r in records if {"kl_to_ref", "gold_reward"} <= set(r["metrics"])
                 and r["metrics"]["kl_to_ref"]["iqm"] <= limit]
        ys = [m["gold_reward"]["iqm_ci"][k] for m in shown for k in (0, 1)] + ([sft] if sft is not None else [])
        if curve:
            ys += [y for x, y in zip(*curve, strict=True) if x <= limit]
        pad = 0.05 * (max(ys) - min(ys) or 1.0)
        detail.set_xlim(-0.03 * limit, limit)
        detail.set_ylim(min(ys) - pad, max(ys) + pad)
        detail.set_xlabel(xlabel)
        detail.set_ylabel(ylabel)
        detail.set_title(f"detail: KL <= {limit:.2f}")
    _finish(plt, fig, ax, path, xlabel, ylabel,
            f"{task}: gold reward vs KL to the reference (squares: default variants)")


def overoptimisation(task: str, records: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, (algo, recs) in enumerate(_by_algorithm(records).items()):
        xs = [v for r in recs if "proxy_reward" in r["metrics"] for v in r["metrics"]["proxy_reward"]["per_seed"]]
        ys = [v for r in recs if "proxy_reward" in r["metrics"] for v in r["metrics"]["gold_reward"]["per_seed"]]
        ax.scatter(xs, ys, color=f"C{i % 10}", label=algo, alpha=0.8)
    _finish(plt, fig, ax, path, "proxy reward (what the algorithm optimised)", "gold reward",
            f"{task}: proxy vs gold, one point per run")


def _finish(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, legend, and the PNG written and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def systems(task: str, records: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    recs = [r for r in records if r["variant"] == DEFAULT_VARIANT]
    names = [r["algorithm"] for r in recs]
    phases = sorted({p for r in recs for p in r["phase_seconds"]})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    bottom = [0.0] * len(recs)
    for i, phase in enumerate(phases):
        values = [r["phase_seconds"].get(phase, 0.0) for r in recs]
        axes[0].bar(names, values, bottom=bottom, color=f"C{i % 10}", label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    other = [max(r["systems"].get("wall_seconds", {}).get("mean", 0.0) - b, 0.0) for r, b in zip(recs, bottom, strict=True)]
    axes[0].bar(names, other, bottom=bottom, color="0.8", label="other (load, save)")
    axes[0].set_ylabel("seconds per run (mean over seeds; total = wall time)")
    axes[0].set_title("time per phase")
    axes[0].legend(fontsize=8)
    for ax, key, label in ((axes[1], "tokens_per_second", "tokens / s (generated + trained)"),
                           (axes[2], "peak_memory_mb", "peak memory, MB")):
        ax.bar(names, [r["systems"].get(key, {}).get("mean", 0.0) for r in recs], color="C7")
        ax.set_title(label)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"{task}: systems")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_all(results: dict[str, Any], out: Path) -> list[str]:
    """Every figure for every task; returns the paths relative to ``out``."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    for task in dict.fromkeys(r["task"] for r in results["records"]):
        records = [r for r in results["records"] if r["task"] == task]
        exact = results.get("exact_checks", {}).get(task)
        paths = [f"plots/{name}_{task}.png" for name in ("frontier", "overoptimisation", "systems")]
        frontier(task, records, exact, out / paths[0])
        overoptimisation(task, records, out / paths[1])
        systems(task, records, out / paths[2])
        written += paths
    return written
