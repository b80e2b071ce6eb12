"""Built-in experiment trackers, selected per run with ``zoo run ALGO --report-to NAME`` (`rlhf_zoo.tracking`).

They are logger plugins registered through the ``register_loggers`` hook, as a third-party tracker would be:

  none         nothing besides the run directory's files (the default)
  jsonl        metrics.jsonl, which every run writes anyway
  tensorboard  torch.utils.tensorboard's SummaryWriter, event files in RUN_DIR/tensorboard/: every metrics row as
               scalars (tag = the metrics.jsonl key, step = the iteration), config.json and summary.json as
               text, each evaluation's samples as a Markdown table (text tag ``samples``, its first 20 rows). A
               ``--resume`` run appends a new event file that purges the steps after its checkpoint, so the
               curves continue from it as metrics.jsonl does.
  wandb        a Weights & Biases run in RUN_DIR/wandb/: offline unless $WANDB_MODE is set (``wandb sync
               RUN_DIR/wandb/offline-run-*`` uploads it later), project $WANDB_PROJECT or ``rlhf-zoo``, named
               after the run directory; config, metrics rows (``step`` = iteration), samples as a
               ``wandb.Table`` (key ``samples``), the summary. A ``--resume`` run continues the same run id.

The libraries are imported only when a run creates the logger, never when the plugin is loaded.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.registry import LoggerSpec
from rlhf_zoo.tracking import JSONL, NONE, Logger, TrackerRun, markdown_table, table

FLUSH_SECONDS = 30  # TensorBoard: events reach the file at least this often (and at the end)
WANDB_ID_FILE = "zoo-run-id"  # RUN_DIR/wandb/zoo-run-id: the W&B run id, reused by --resume


def _code_block(data: dict[str, Any]) -> str:
    """JSON as a Markdown code block (indented four spaces), for TensorBoard's text tab."""
    return "\n".join("    " + line for line in json.dumps(data, indent=2, default=str).splitlines())


class TensorBoardLogger(Logger):
    def __init__(self, run: TrackerRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run's new event file starts with a session-start event at its first step, which makes
        # the readers drop the older files' events from that step on (those of the run that crashed)
        first = 0 if run.resumed_from is None else run.resumed_from + 1
        self.writer = SummaryWriter(log_dir=str(run.out / "tensorboard"), flush_secs=FLUSH_SECONDS,
                                    purge_step=None if run.resumed_from is None else first)
        self.step = first

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", _code_block(config), global_step=self.step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.step = max(self.step, step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.step = max(self.step, step)
        self.writer.add_text("samples", markdown_table(rows), global_step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", _code_block(summary), global_step=self.step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger(Logger):
    def __init__(self, run: TrackerRun) -> None:
        import wandb

        root = run.out / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if run.resumed_from is not None and id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]  # (os entropy: the run's seeded generators are not touched)
            id_file.write_text(run_id + "\n")
        options: dict[str, Any] = {}
        if not os.environ.get("WANDB_MODE"):  # no network assumed: the user opts in to syncing
            options["mode"] = "offline"
        self.wandb = wandb
        self.run = wandb.init(dir=str(run.out), project=os.environ.get("WANDB_PROJECT") or "rlhf-zoo", name=run.name,
                              id=run_id, resume="allow", settings=wandb.Settings(silent=run.quiet), **options)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)  # (a resumed run's argv differs)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns, data = table(rows)
        self.run.log({"samples": self.wandb.Table(columns=columns, data=data)}, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if k != "examples"})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@hookimpl
def register_loggers(register) -> None:
    register(LoggerSpec(NONE, lambda run: Logger(), "No tracker besides the run directory's files (the default)."))
    register(LoggerSpec(JSONL, lambda run: Logger(), "metrics.jsonl in the run directory (always written)."))
    register(LoggerSpec("tensorboard", TensorBoardLogger,
                        "TensorBoard event files in RUN_DIR/tensorboard/: metrics, config, sample tables, summary.",
                        requires=("tensorboard",), install="pip install 'rlhf-zoo[tensorboard]'"))
    register(LoggerSpec("wandb", WandbLogger,
                        "A Weights & Biases run in RUN_DIR/wandb/, offline unless $WANDB_MODE is set.",
                        requires=("wandb",), install="pip install 'rlhf-zoo[wandb]'"))

