"""``sft``: supervised fine-tuning on demonstrations (InstructGPT, sec. 3.5; Llama 2, sec. 3.1).

Loss = mean negative log-likelihood of the completion tokens; prompt tokens are context only. Starts
from the task's pretrained model (or its SFT policy) and trains on the task's demonstrations, or on a
user dataset of ``{"prompt", "completion"}`` rows (``--dataset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_zoo.config import DatasetConfig, check_positive, option
from rlhf_zoo.data import load_sft
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.training import lm_row, train_lm


@dataclass(frozen=True)
class SFTConfig(DatasetConfig):
    presets = {"quick": {"steps": 100, "eval_prompts": 32},
               "smoke": {"steps": 2, "batch_size": 8, "start_from": "sft", "eval_prompts": 2, "eval_samples": 1}}

    steps: int = option(300, "Optimizer steps.")
    batch_size: int = option(64, "Sequences per step.")
    learning_rate: float = option(1e-3, "Peak learning rate (AdamW, warmup then cosine decay).")
    start_from: Literal["pretrained", "sft"] = option("pretrained", "Initial weights: the task's pretrained model or its SFT "
                                                                    "policy (on your own model both mean --model).")
    dataset: str = option("", "A prompt/completion or conversational messages dataset (.jsonl, .json, .parquet, saved "
                              "dir, or a Hub id org/name[@split]); empty: the task's demonstrations.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "steps", "batch_size", "learning_rate")


def train(ctx, cfg: SFTConfig) -> ModelPolicy:
    task = ctx.task
    # 1) data: demonstrations as (prompt, completion) text pairs
    data_metrics = {}
    if cfg.dataset:  # validated (rlhf_zoo.data); the report goes to summary.json
        pairs, report = load_sft(cfg.dataset, cfg, task, ctx.max_new_tokens)
        data_metrics = report.metrics()
    else:
        ds = task.dataset("sft")
        pairs = list(zip(ds["prompt"], ds["completion"], strict=True))
    prompt_ids = task.prompt_token_ids([p for p, _ in pairs])
    completion_ids = task.response_token_ids([c for _, c in pairs])
    rows = [lm_row(p, c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    # 2) model (a user's own --model is both: it is where SFT starts)
    model = task.load_pretrained(ctx.device) if cfg.start_from == "pretrained" and task.has_pretrained else ctx.policy
    # 3) train, loss on completions only
    ctx.policy = model
    with ctx.phase("train"):
        train_lm(model, rows, pad_id=task.pad_token_id, steps=cfg.steps, batch_size=cfg.batch_size,
                 lr=cfg.learning_rate, seed=ctx.seed, desc="sft", suppress_ids=task.suppress_ids,
                 progress=ctx.show_progress, on_step=ctx.step_logger(), ctx=ctx)
    return ModelPolicy(model, metrics=data_metrics)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("sft", SFTConfig, train, "Supervised fine-tuning on demonstrations (loss on completions)."))
