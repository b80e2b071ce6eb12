"""Experiment trackers: ``zoo run ALGO --report-to NAME[,NAME ...]`` sends a run's config, metrics rows,
sample tables and summary to TensorBoard, Weights & Biases or any tracker a plugin provides.

A tracker is a *logger plugin*: a `rlhf_zoo.registry.LoggerSpec` registered through the
``register_loggers`` hook, the same path third-party plugins take. The built-ins (``rlhf_zoo_plugins.loggers``):

    none         nothing besides the run directory's own files (the default)
    jsonl        metrics.jsonl, which every run writes anyway: naming it changes nothing
    tensorboard  event files in RUN_DIR/tensorboard/ (torch.utils.tensorboard; pip install 'rlhf-zoo[tensorboard]')
    wandb        a Weights & Biases run in RUN_DIR/wandb/, offline unless $WANDB_MODE says otherwise
                 (pip install 'rlhf-zoo[wandb]')

The names are checked by `selected_loggers` when the run is set up (`rlhf_zoo.runner.make_context`): an
unknown name, or a logger whose library is not installed, is a one-line `ConfigError` before anything in the
run directory is written. Only rank 0 of a data-parallel run reports. What a `Logger` receives, in order:

    factory(run)                 once config.json is written (`TrackerRun`: the run directory, its name,
                                 config.json's content, the iteration a --resume run continues after)
    log_config(config)           config.json's content
    log_metrics(step, metrics)   every metrics.jsonl row: its numbers (bools and non-numbers left out) with
                                 step = the row's iteration; ``eval/*`` rows of --eval-every included
    log_samples(step, rows)      every samples/iter-N.jsonl file's rows (one per evaluated response; on
                                 ``exact`` one per prompt), step = N
    log_summary(summary)         summary.json's content, once the run has finished
    close(failed)                at the end, and when the run fails (failed=True)

This module imports nothing heavy: the trackers' libraries are imported by their factories.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_zoo.errors import ConfigError, UnknownNameError

NONE = "none"
JSONL = "jsonl"
OPTION = "--report-to"
TRACKERS_DIR = "trackers"  # RUN_DIR/trackers/NAME: a third-party logger's files (`TrackerRun.folder`)


@dataclass(frozen=True)
class TrackerRun:
    """What a logger's factory receives.

    Attributes:
        out: the run directory.
        name: the run's name (the run directory's name).
        config: config.json's content (resolved config, versions, plugins, ``report_to``).
        resumed_from: the iteration of the checkpoint a ``--resume`` run continues after (its next metrics
            row is iteration ``resumed_from + 1``; metrics.jsonl keeps the rows up to it), None for a fresh run.
        quiet: ``zoo run --quiet``: print as little as possible.
    """

    out: Path
    name: str
    config: dict[str, Any]
    resumed_from: int | None = None
    quiet: bool = False
    logger: str = ""  # the logger's name (set for each factory call)

    @property
    def folder(self) -> Path:
        """Where this logger writes its files: ``out/trackers/NAME`` (`TRACKERS_DIR` is a run entry: a fresh
        run replaces it, ``--resume`` keeps it). The built-ins keep their conventional places instead:
        ``out/tensorboard`` and ``out/wandb``."""
        return self.out / TRACKERS_DIR / self.logger


class Logger:
    """A tracker's side of a run. Every method is optional: this base class does nothing."""

    def log_config(self, config: dict[str, Any]) -> None:
        """config.json's content, once, before training."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One metrics.jsonl row's numbers (``iteration`` is ``step``)."""

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """One evaluation's samples (samples/iter-N.jsonl's rows, N = ``step``)."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """summary.json's content, once the run has finished."""

    def close(self, failed: bool = False) -> None:
        """The run has ended (``failed``: with an error or Ctrl-C); flush and release everything."""


def scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The numbers of a metrics row: ints and finite floats (bools, text and lists left out)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Sample rows as a table: (columns in order of first appearance, one list per row). Text, numbers, bools
    and None are kept; anything else (the ``top`` responses of ``exact``, reward terms) becomes JSON text."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v: Any) -> Any:
        return v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v)

    return columns, [[cell(row.get(c)) for c in columns] for row in rows]


def markdown_table(rows: Sequence[dict[str, Any]], max_rows: int = 20, max_chars: int = 300) -> str:
    """The first ``max_rows`` sample rows as a Markdown table (TensorBoard's text tab renders it)."""
    columns, data = table(rows[:max_rows])

    def cell(v: Any) -> str:
        text = "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
        text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_chars else text[: max_chars - 3] + "..."

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    if len(rows) > max_rows:
        lines.append(f"\n({max_rows} of {len(rows)} rows; all of them are in the run directory's samples/)")
    return "\n".join(lines)


def _names(report_to: str | Iterable[str] | None) -> list[str]:
    """``--report-to`` values as given: repeated options and comma-separated lists, blanks dropped."""
    if report_to is None:
        return []
    values = [report_to] if isinstance(report_to, str) else list(report_to)
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ConfigError(f"{OPTION}: expected logger names, got {value!r}")
        for name in value.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


def selected_loggers(report_to: str | Iterable[str] | None, registry: Any) -> tuple[str, ...]:
    """The loggers a run reports to, checked: ``jsonl`` first (metrics.jsonl is always written), then the
    others as given. An unknown name, ``none`` with another name, or a logger whose library is not installed
    raises `ConfigError` (one line naming the option, the name and the fix); nothing is imported."""
    names = _names(report_to)
    if NONE in names and len(names) > 1:
        others = ", ".join(n for n in names if n != NONE)
        raise ConfigError(f"{OPTION} none means no tracker besides metrics.jsonl; it cannot be combined with {others}")
    for name in names:
        try:
            spec = registry.logger(name)
        except UnknownNameError as e:
            raise ConfigError(f"{OPTION} {name}: {e}") from None
        for module in spec.requires:
            if not _installed(module):
                fix = f"; install it with: {spec.install}" if spec.install else ""
                raise ConfigError(f"{OPTION} {name}: the {name} logger needs the Python package {module!r}, "
                                  f"which is not installed{fix}")
    return (JSONL, *(n for n in names if n not in (NONE, JSONL)))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a broken module spec
        return False


class Trackers:
    """The loggers of one run: created by `start`, fed by the runner, closed exactly once."""

    def __init__(self, names: Sequence[str] = (JSONL,), registry: Any = None) -> None:
        self.names = tuple(names)
        self._specs = [registry.logger(n) for n in self.names] if registry is not None else []
        self._loggers: list[tuple[str, Logger]] = []

    def start(self, run: TrackerRun) -> None:
        """Create every logger and give it the config; one that fails closes those created before it."""
        for spec in self._specs:
            try:
                logger = spec.factory(dataclasses.replace(run, logger=spec.name))
            except BaseException:
                self.close(failed=True)
                raise
            self._loggers.append((spec.name, logger))
            logger.log_config(run.config)

    def log_metrics(self, step: int, row: dict[str, Any]) -> None:
        if self._loggers:
            numbers = scalars({k: v for k, v in row.items() if k != "iteration"})
            for _, logger in self._loggers:
                logger.log_metrics(step, numbers)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for _, logger in self._loggers:
            logger.log_samples(step, rows)

    def finish(self, summary: dict[str, Any]) -> None:
        """The run has finished: the summary to every logger, then close them."""
        for _, logger in self._loggers:
            logger.log_summary(summary)
        self.close(failed=False)

    def close(self, failed: bool = True) -> None:
        """Close every logger not closed yet. After a failure (``failed``) a logger that cannot close is
        reported on one stderr line and does not hide the run's own error."""
        loggers, self._loggers = self._loggers, []
        error: BaseException | None = None
        for name, logger in loggers:
            try:
                logger.close(failed=failed)
            except Exception as e:
                if failed:
                    print(f"zoo: warning: logger {name!r} did not close: {type(e).__name__}: {e}", file=sys.stderr)
                elif error is None:
                    error = e
        if error is not None:
            raise error
