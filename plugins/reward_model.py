"""``reward-model``: reward-model training from ranked responses.

InstructGPT (sec. 3.5, Eq. 1): K ranked responses per prompt give C(K,2) pairs, all kept together as
one batch element; loss -log sigmoid(r(x, y_w) - r(x, y_l)). Llama 2 (sec. 3.2.2, Eq. 2) subtracts a
margin m(r) from the preference strength (``--use-margin``). The trunk starts from the SFT policy and
the scalar head from zero. On a task's data the held-out accuracy is measured against the GOLD
preference (not the noisy labels); on ``hh`` choose ``--reward-model helpful`` or ``safety``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_zoo.adapters import is_peft
from rlhf_zoo.config import DatasetConfig, check_positive, option
from rlhf_zoo.data import load_rankings
from rlhf_zoo.errors import ConfigError, DataError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.models import reward_model_from_policy
from rlhf_zoo.ops.ranking import pair_indices
from rlhf_zoo.policy import RewardModelResult
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.training import RankingRow, ranking_accuracy, train_reward_model


@dataclass(frozen=True)
class RewardModelConfig(DatasetConfig):
    presets = {"quick": {"steps": 100}, "smoke": {"steps": 2, "batch_size": 4}}

    steps: int = option(300, "Optimizer steps.")
    batch_size: int = option(32, "Prompts per step (each with its K ranked responses).")
    learning_rate: float = option(1e-3, "Peak learning rate.")
    use_margin: bool = option(False, "Subtract the Llama 2 margin of each pair's preference strength.")
    reward_model: str = option("", "Which of the task's reward models to train (hh: helpful or safety; empty: the first).")
    dataset: str = option("", "A ranking dataset (.jsonl, .json, .parquet, saved dir, or a Hub id org/name[@split]; rows "
                              "prompt/chosen/rejected, prompt/responses with the same K in every row, conversational "
                              "message lists, or Anthropic HH chosen/rejected text); empty: the task's rankings.")
    heldout_fraction: float = option(0.1, "Fraction of a user dataset held out for the accuracy figure.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "steps", "batch_size", "learning_rate")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


def _rows(task, prompts, responses, margins) -> list[RankingRow]:
    """Prompt ids (BOS by the world's convention) and each response's ids with EOS."""
    prompt_ids = task.prompt_token_ids(list(prompts))
    responses = [list(rs) for rs in responses]
    flat = iter(task.response_token_ids([r for rs in responses for r in rs]))  # one tokenizer call for all
    return [RankingRow(p, [next(flat) for _ in rs], list(m))
            for p, rs, m in zip(prompt_ids, responses, margins, strict=True)]


def train(ctx, cfg: RewardModelConfig) -> RewardModelResult:
    task, tok = ctx.task, ctx.task.tokenizer
    if is_peft(ctx.policy):
        raise ConfigError("reward-model trains the whole model from the policy's trunk; --lora-r does not apply to it")
    name = cfg.reward_model or task.reward_models[0]
    if name not in task.reward_models:
        raise ConfigError(f"reward_model {name!r} is not one of task {task.name!r}'s: {', '.join(task.reward_models)}")
    # 1) data: training rankings, and held-out rankings with their gold rewards when the task has them
    gold, data_metrics = None, {}
    if cfg.dataset:  # validated (rlhf_zoo.data); every ranking needs the same K to be batched whole
        rankings, report = load_rankings(cfg.dataset, cfg, task, ctx.max_new_tokens, same_k=True)
        if len(rankings) < 2:
            raise DataError(f"{report.source}: {len(rankings)} usable row(s); the reward model needs at least 2 "
                            "(one or more held out for the accuracy figure)")
        data_metrics = report.metrics()
        n_held = max(1, int(len(rankings) * cfg.heldout_fraction))
        rows = _rows(task, [r.prompt for r in rankings], [r.responses for r in rankings], [r.margins for r in rankings])
        train_rows, held_rows = rows[:-n_held], rows[-n_held:]
    else:
        tr, held = task.dataset(f"rankings_{name}"), task.dataset(f"heldout_{name}")
        train_rows = _rows(task, tr["prompt"], tr["responses"], tr["margins"])
        held_rows = _rows(task, held["prompt"], held["responses"], held["margins"])
        gold = held["gold"]
    # 2) model: SFT trunk (the policy's own modules: the run has no other use for them), zero head
    model = reward_model_from_policy(ctx.policy, take_trunk=True)
    # 3) train on whole rankings
    with ctx.phase("train"):
        losses = train_reward_model(model, train_rows, pad_id=tok.pad_token_id, steps=cfg.steps,
                                    batch_size=cfg.batch_size, lr=cfg.learning_rate, seed=ctx.seed,
                                    use_margin=cfg.use_margin, progress=ctx.show_progress, on_step=ctx.step_logger(), ctx=ctx)
    # 4) accuracy: against the labels' order (always) and the gold preference (task data)
    label_order = [list(range(len(r.response_ids), 0, -1)) for r in held_rows]  # best first = highest
    metrics = {"reward_model": name, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
               "heldout_label_accuracy": ranking_accuracy(model, held_rows, label_order, tok.pad_token_id),
               "heldout_pairs": sum(len(pair_indices(len(r.response_ids))[0]) for r in held_rows)}
    if gold is not None:
        metrics["heldout_gold_accuracy"] = ranking_accuracy(model, held_rows, gold, tok.pad_token_id)
        metrics["task_reward_model_heldout_gold_accuracy"] = task.manifest["reward_models"][name]["heldout_gold_accuracy"]
    return RewardModelResult(model, {**metrics, **data_metrics})


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("reward-model", RewardModelConfig, train,
                       "Reward model from K ranked responses per prompt (pairwise loss, optional Llama 2 margin).",
                       kind="reward_model"))
