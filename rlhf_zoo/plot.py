"""``zoo plot RUN_DIR [RUN_DIR ...]``: one run's learning curves, or several runs overlaid, as PNGs.

Drawn from each run's metrics.jsonl alone (config.json names the run in the legend), so a run can be
plotted while it trains and any metric an algorithm logs is drawn without this module knowing it:

- ``training.png``: every numeric training metric (one panel each: score, return, KL, loss terms,
  learning rate, ...) against the iteration; the raw values faint, an exponential moving average on top
  (``--smooth``, TensorBoard's debiased EMA; 0 draws the raw values alone);
- ``evaluation.png`` (runs with ``--eval-every``): gold and proxy reward against the iteration on one
  panel (gold solid, proxy dashed: where they part, the policy is exploiting the proxy), KL to the
  reference, and gold and proxy against sqrt(KL) (the axis of Gao et al. 2022), plus on ``exact`` the
  KL to pi*_beta and the frontier efficiency.

A run's rows keep their order; a metric a run does not log is absent from that run's curves only.
matplotlib (the ``bench`` extra) is imported only here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlhf_zoo.errors import ConfigError

#: training metrics drawn first, in this order (the rest follow alphabetically)
FIRST = ("score", "reward", "return", "kl", "loss", "policy_loss", "value_loss", "entropy", "response_length")
#: not a curve: bookkeeping a row may carry
SKIP = ("iteration",)
EVAL_PREFIX = "eval/"
#: the evaluation panels: title -> [(metric, line style)] drawn against the iteration
EVAL_PANELS = {
    "gold and proxy reward": [("gold_reward", "-"), ("proxy_reward", "--")],
    "KL to the reference": [("kl_to_ref", "-")],
    "KL to pi*_beta (exact)": [("kl_to_optimum", "-")],
    "frontier efficiency (exact)": [("frontier_efficiency", "-")],
}
#: Series: metric -> run label -> (iterations, values)
Series = dict[str, dict[str, tuple[list[float], list[float]]]]


def read_run(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """(legend label, metrics rows) of a run directory; a one-line `ConfigError` naming what is wrong."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; give run directories (zoo run --out)")
    if not metrics.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; is it a run directory (zoo run --out)?")
    rows = []
    with open(metrics, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{metrics} line {n} is not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                raise ConfigError(f"{metrics} line {n} has no integer 'iteration'")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{metrics} has no rows yet (the run has not finished an iteration)")
    return _label(run_dir), rows


def _label(run_dir: Path) -> str:
    try:
        c = json.loads((run_dir / "config.json").read_text())
        return f"{c['algorithm']} {c['task']} s{c['seed']} ({run_dir.name})"
    except (OSError, ValueError, KeyError, TypeError):
        return run_dir.name


def series(runs: list[tuple[str, list[dict[str, Any]]]]) -> tuple[Series, Series]:
    """(training, evaluation) curves of every run: metric -> label -> (iterations, values). Evaluation
    metrics lose their ``eval/`` prefix; non-numeric and non-finite values are left out."""
    train: Series = {}
    evals: Series = {}
    for label, rows in runs:
        for row in rows:
            for key, value in row.items():
                if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value):
                    continue
                into, name = (evals, key[len(EVAL_PREFIX):]) if key.startswith(EVAL_PREFIX) else (train, key)
                xs, ys = into.setdefault(name, {}).setdefault(label, ([], []))
                xs.append(row["iteration"])
                ys.append(float(value))
    return train, evals


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: s_t = w s_{t-1} + (1 - w) v_t from s_0 = 0, divided by 1 - w^t (debiased,
    so the first point is the first value)."""
    out, s = [], 0.0
    for t, v in enumerate(values, 1):
        s = weight * s + (1 - weight) * v
        out.append(s / (1 - weight ** t) if weight > 0 else v)
    return out


def _order(names: list[str]) -> list[str]:
    first = [n for n in FIRST if n in names]
    return first + sorted(n for n in names if n not in first)


def _grid(plt: Any, n: int, width: float = 4.2, height: float = 3.0) -> tuple[Any, list[Any]]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def plot_runs(run_dirs: list[Path], out: Path, smooth: float = 0.6) -> dict[str, Any]:
    """Draw the runs' curves into ``out``; returns {"files": [...], "training": Series, "evaluation": Series}
    (the values drawn, unsmoothed)."""
    if not 0 <= smooth < 1:
        raise ConfigError(f"--smooth must be in [0, 1), got {smooth}")
    runs = [read_run(Path(d)) for d in run_dirs]
    labels = [label for label, _ in runs]
    if len(set(labels)) < len(labels):  # two runs of the same name: tell them apart by their paths
        runs = [(str(d), rows) for d, (_, rows) in zip(run_dirs, runs, strict=True)]
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("zoo plot needs matplotlib: pip install 'rlhf-zoo[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = series(runs)
    colours = {label: f"C{i % 10}" for i, (label, _) in enumerate(runs)}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if train:
        names = _order(list(train))
        fig, axes = _grid(plt, len(names))
        for ax, name in zip(axes, names, strict=True):
            for label, (xs, ys) in train[name].items():
                if smooth > 0 and len(ys) > 2:
                    ax.plot(xs, ys, color=colours[label], alpha=0.25, linewidth=0.8)
                    ax.plot(xs, ema(ys, smooth), color=colours[label], linewidth=1.5, label=label)
                else:
                    ax.plot(xs, ys, color=colours[label], linewidth=1.5, label=label, marker="." if len(ys) < 30 else None)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        _legend(fig, axes)
        files.append(_save(fig, out / "training.png", plt))
    if evals:
        panels = [(title, lines) for title, lines in EVAL_PANELS.items() if any(m in evals for m, _ in lines)]
        gao = "kl_to_ref" in evals and any(m in evals for m in ("gold_reward", "proxy_reward"))
        fig, axes = _grid(plt, len(panels) + gao)
        for ax, (title, lines) in zip(axes, panels, strict=False):
            for metric, style in lines:
                for label, (xs, ys) in evals.get(metric, {}).items():
                    ax.plot(xs, ys, style, color=colours[label], marker=".", linewidth=1.3,
                            label=f"{label} {metric}" if len(lines) > 1 else label)
            _finish(ax, title, "iteration")
        if gao:
            ax = axes[-1]
            for metric, style in (("gold_reward", "-"), ("proxy_reward", "--")):
                for label, (xs, ys) in evals.get(metric, {}).items():
                    kl = dict(zip(*evals["kl_to_ref"][label], strict=True)) if label in evals["kl_to_ref"] else {}
                    pts = [(math.sqrt(max(kl[x], 0.0)), y) for x, y in zip(xs, ys, strict=True) if x in kl]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, color=colours[label], marker=".", linewidth=1.3,
                                label=f"{label} {metric}")
            _finish(ax, "reward against sqrt(KL to the reference)", "sqrt(KL) (nats^0.5)")
        _legend(fig, axes)
        files.append(_save(fig, out / "evaluation.png", plt))
    return {"files": files, "training": train, "evaluation": evals}


def _finish(ax: Any, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _legend(fig: Any, axes: list[Any]) -> None:
    """One legend for the figure, under it: every label any panel drew, once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(3, len(seen)), fontsize=8,
                   frameon=False)
        inches = 0.15 + 0.22 * math.ceil(len(seen) / 3)  # the legend's height under the panels
        fig.tight_layout(rect=(0, min(0.5, inches / fig.get_figheight()), 1, 1))
    else:
        fig.tight_layout()


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
