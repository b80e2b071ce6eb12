"""``sft``: supervised fine-tuning on demonstrations (InstructGPT, sec. 3.5; Llama 2, sec. 3.1).

Loss = mean negative log-likelihood of the completion tokens; prompt tokens are context only. Starts
from the task's pretrained model (or its SFT policy) and trains on the task's demonstrations, or on a
user dataset of ``{"prompt", "completion"}`` rows (``--dataset``).

Checkpoint selection by reward (InstructGPT, sec. 3.5: "the SFT model among the 16 checkpoints with the
highest RM score"). With ``--select-checkpoints N`` the policy is snapshotted at N evenly spaced steps
(step round(k * steps / N), k = 1..N; the last is the final step) and each snapshot is scored, right
after its step, by the mean of the world's reward (``ctx.reward_fn``: the learned reward model on the
built-in tasks, a user's ``--reward`` terms; never the gold) over validation prompts: the LAST
``selection_prompts`` of the world's eval split (the final evaluation takes the FIRST ``eval_prompts``,
so the two are disjoint when the split holds both; the overlap is reported), ``eval_samples`` responses
each at ``temperature``, sampled with one fixed seed for every snapshot so all are compared on the same
prompts and random numbers. On ``exact`` the score is the exact expectation over the task's eval
prompts. The returned and saved policy is the highest-scoring snapshot (ties: the earlier one). Every
snapshot's step, reward, KL to the reference and gold reward (where the world has one; reported only)
and the choice go to summary.json under ``checkpoint_selection``.

Only the best snapshot so far is kept, as a copy of its state dict in CPU memory (one extra copy of the
model: fine for the task models and small user models; a large model needs host memory for it). It is
tracked with the scores (so every checkpoint also holds it), and a run resumed from any checkpoint
selects the same snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhf_zoo.config import DatasetConfig, check_positive, option
from rlhf_zoo.data import load_sft
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.evaluation import evaluate
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.rewards import MissingReward
from rlhf_zoo.training import lm_row, train_lm

SELECTION_SEED_OFFSET = 20_000  # the snapshots' sampling seed: run seed + this (the final evaluation uses + 10_000)


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
    select_checkpoints: int = option(
        0, "Checkpoint selection by reward (InstructGPT): snapshot the policy at N evenly spaced steps (the last is "
           "the final step), score each by the mean of the world's reward (never the gold) on validation prompts, "
           "and return the best one; every snapshot's score and the choice go to summary.json. Needs a reward "
           "(--reward on your own model). 0: off, the final step's policy.")
    selection_prompts: int = option(
        64, "Validation prompts of --select-checkpoints: the last N of the world's eval prompts (the final "
            "evaluation uses the first eval_prompts), eval_samples responses each, the same seed for every snapshot.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "steps", "batch_size", "learning_rate", "selection_prompts")
        if self.select_checkpoints < 0:
            raise ConfigError(f"select_checkpoints must be >= 0 (0: off), got {self.select_checkpoints}")
        if self.select_checkpoints > self.steps:
            raise ConfigError(f"select_checkpoints ({self.select_checkpoints}) must be <= steps ({self.steps}): "
                              "a snapshot is taken after an optimizer step")


def snapshot_steps(steps: int, n: int) -> list[int]:
    """The steps after which the policy is snapshotted: round(k * steps / n) for k = 1..n (distinct, the
    last is ``steps``)."""
    return [round(k * steps / n) for k in range(1, n + 1)]


@dataclass
class CheckpointSelection:
    """Scores snapshots of ``model`` after the steps in ``steps`` with ``score(model) -> figures`` and keeps
    the best so far (highest ``proxy_reward``; ties: the earlier). Checkpointable: the records, and the best
    snapshot's weights."""

    model: torch.nn.Module
    steps: list[int]
    score: Any  # (model) -> {"proxy_reward": float, "kl_to_ref": float, "gold_reward"?: float}
    records: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best: dict[str, torch.Tensor] = field(default_factory=dict)

    def observe(self, step: int) -> None:
        if step not in self.steps:
            return
        was_training = self.model.training
        self.model.eval()  # dropout off while the snapshot answers (the task models have none)
        figures = self.score(self.model)
        self.model.train(was_training)
        self.records.append({"step": step, **figures})
        if not self.best or figures["proxy_reward"] > self.best_record()["proxy_reward"]:
            self.best_step = step
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def best_record(self) -> dict[str, Any]:
        return next(r for r in self.records if r["step"] == self.best_step)

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "best_step": self.best_step, "best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.best_step = int(state["best_step"])
        self.best = dict(state["best"])


def _selection(ctx, cfg: SFTConfig, model: torch.nn.Module) -> tuple[CheckpointSelection, dict[str, Any]]:
    """The tracked `CheckpointSelection` of this run and the description of its validation set."""
    task = ctx.task
    if isinstance(ctx.reward_fn, MissingReward) or not task.has_reward:
        raise ConfigError(f"--select-checkpoints scores snapshots with the world's reward and {ctx.task_name!r} has "
                          "none: give --reward SPEC, or --select-checkpoints 0")
    eval_split = task.prompts("eval")
    if not eval_split:
        raise ConfigError("--select-checkpoints needs validation prompts and the world's eval split is empty")
    n = min(cfg.selection_prompts, len(eval_split))
    first = len(eval_split) - n
    prompts = eval_split[first:]
    seed = ctx.seed + SELECTION_SEED_OFFSET
    exact = hasattr(task, "space")

    def score(m: torch.nn.Module) -> dict[str, Any]:
        figures = evaluate(ModelPolicy(m), task, reference=ctx.reference, reward_fn=ctx.reward_fn, prompts=prompts,
                           samples_per_prompt=cfg.eval_samples, max_new_tokens=ctx.max_new_tokens,
                           temperature=cfg.temperature, seed=seed, beta=ctx.beta,
                           missing_eos_penalty=task.missing_eos_penalty, device=ctx.device)
        ctx.counters["generated_tokens"] += figures.get("generated_tokens", 0)
        return {k: figures[k] for k in ("proxy_reward", "kl_to_ref", "gold_reward") if k in figures}

    info = {"criterion": "highest mean proxy_reward (the world's reward, never the gold) on the validation prompts",
            "validation": ("exact expectation over the task's eval prompts" if exact else
                           f"eval prompts {first}..{len(eval_split) - 1} (the last {n} of {len(eval_split)})"),
            "validation_prompts": len(eval_split) if exact else n,
            "samples_per_prompt": None if exact else cfg.eval_samples,
            "overlap_with_final_evaluation": (len(eval_split) if exact else
                                              max(0, min(cfg.eval_prompts, len(eval_split)) - first)),
            "seed": None if exact else seed, "temperature": cfg.temperature}
    selection = CheckpointSelection(model, snapshot_steps(cfg.steps, cfg.select_checkpoints), score)
    return ctx.track("checkpoint_selection", selection), info


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
    ctx.policy = model
    # 3) snapshots scored by the world's reward during training (--select-checkpoints), tracked
    selection, selection_info = _selection(ctx, cfg, model) if cfg.select_checkpoints else (None, {})
    logger = ctx.step_logger()

    def on_step(step: int, loss: float, tokens: int) -> None:
        logger(step, loss, tokens)
        if selection is not None:
            selection.observe(step)  # inside the step's iteration: its checkpoint holds the score

    # 4) train, loss on completions only
    with ctx.phase("train"):
        train_lm(model, rows, pad_id=task.pad_token_id, steps=cfg.steps, batch_size=cfg.batch_size,
                 lr=cfg.learning_rate, seed=ctx.seed, desc="sft", suppress_ids=task.suppress_ids,
                 progress=ctx.show_progress, on_step=on_step, ctx=ctx)
    # 5) the selected snapshot is the result
    if selection is not None:
        model.load_state_dict(selection.best, strict=True)
        data_metrics["checkpoint_selection"] = {
            **selection_info, "snapshots": selection.records, "selected_step": selection.best_step,
            "selected_proxy_reward": selection.best_record()["proxy_reward"], "final_step": cfg.steps}
    return ModelPolicy(model, metrics=data_metrics)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("sft", SFTConfig, train, "Supervised fine-tuning on demonstrations (loss on completions); "
                                                "optionally the snapshot with the highest reward."))
