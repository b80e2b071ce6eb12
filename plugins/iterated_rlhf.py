"""``iterated-rlhf``: iterated online RLHF (Bai et al. 2022, Anthropic, sec. 4.5; seed 001 "模型迭代").

The reward model is only accurate on the distribution it was trained on, and RL moves the policy off it.
Iterated online RLHF keeps labelling the policy's own samples:

    for round r = 1..R:
      (a) sample K responses to each of ``prompts_per_round`` training prompts from the current policy
      (b) the labelers rank them (a built-in task's simulated labelers: Plackett-Luce on what they perceive of
          the gold reward, `labelers.perceived`, at the task's calibrated temperature, with Llama 2 margins; a user setup: ``--labeler SPEC``, the
          forms of ``--reward``, at ``--labeler-temperature``)
      (c) retrain the reward model from the SFT trunk on the old rankings (the world's own, when it has
          them) plus every ranking labelled so far (a fifth of each round's held out)
      (d) run an online algorithm (``--algorithm``, ppo by default; any registered algorithm of kind
          ``policy`` that trains on its own samples, i.e. has no ``dataset`` option) from the current
          policy against the new reward model, with its own preset and ``--algorithm-config`` overrides

Per round (metrics.jsonl and summary.json ``rounds``): gold and proxy reward and KL to the reference of
the current policy on the evaluation prompts, the new rankings' count, and the reward models' accuracy
against the GOLD preference on the current policy's held-out samples: ``rm_accuracy_before`` (the previous
round's reward model: how far the policy has moved off it, the distribution-shift gap) and
``rm_accuracy_after`` (the retrained one).

``--label-schedule upfront`` is the control: the same number of rankings, all labelled in round 1 from the
starting policy, the reward model trained once, and the same RL iterations over the rounds. From round 2
it still labels a held-out fifth of a round's samples of the moved policy, for ``rm_accuracy_before``
only (the fixed reward model's accuracy where the policy now is); nothing trains on those.

Each round's inner run writes its metrics to ``rounds/round-N/`` of the run directory; the checkpoint
after each round holds the policy, the reward model, every ranking and the RNGs, so ``--resume``
continues at the next round exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from rlhf_zoo.config import AlgoConfig, check_positive, option
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.evaluation import evaluate
from rlhf_zoo.generation import sample
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.models import reward_model_from_policy, reward_scores
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.training import RankingRow, ranking_accuracy, train_reward_model

HELDOUT_FRACTION = 0.2  # of each round's rankings: the accuracy figures (not trained on)
LABEL_STREAM = 104_729  # offset of the labelers' random stream from the run seed


@dataclass(frozen=True)
class IteratedRLHFConfig(AlgoConfig):
    presets = {
        "quick": {"rounds": 3, "prompts_per_round": 128, "rm_steps": 100, "algorithm_preset": "quick",
                  "algorithm_config": '{"iterations": 15}', "eval_prompts": 64},
        "smoke": {"rounds": 2, "prompts_per_round": 8, "rm_steps": 2, "algorithm_preset": "smoke",
                  "eval_prompts": 2, "eval_samples": 1},
    }
    kl_coefficient = None  # the inner algorithm has its own

    rounds: int = option(4, "Rounds of sample, label, retrain the reward model, RL.")
    prompts_per_round: int = option(256, "Training prompts whose K samples are labelled each round.")
    k: int = option(4, "Responses sampled per prompt and ranked together (K).")
    algorithm: str = option("ppo", "The online algorithm run each round (any registered one that trains on its own "
                                   "samples).")
    algorithm_preset: str = option("default", "Preset of the online algorithm in each round.")
    algorithm_config: str = option("", "JSON object of the online algorithm's config values in each round, e.g. "
                                       "'{\"iterations\": 20}'.")
    label_schedule: Literal["iterated", "upfront"] = option(
        "iterated", "iterated: label the current policy's samples every round; upfront (the control): label as "
                    "many, all from the starting policy in round 1, and train the reward model once.")
    use_task_rankings: bool = option(True, "Train the reward model on the world's own rankings too (the 'old' data).")
    rm_steps: int = option(300, "Reward-model training steps per retraining.")
    rm_batch_size: int = option(32, "Rankings per reward-model step.")
    rm_learning_rate: float = option(1e-3, "Peak reward-model learning rate.")
    use_margin: bool = option(False, "Llama 2 margin in the reward model's ranking loss.")
    labeler: str = option("", "A user setup's labeler, in the forms of --reward (default: the world's gold).")
    labeler_temperature: float = option(0.0, "A user setup's labeler noise: Plackett-Luce temperature on its scores "
                                             "(0: rank by the scores exactly).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "rounds", "prompts_per_round", "k", "rm_steps", "rm_batch_size", "rm_learning_rate")
        if self.k < 2:
            raise ConfigError(f"k must be >= 2 (a ranking needs two responses), got {self.k}")
        if self.labeler_temperature < 0:
            raise ConfigError(f"labeler_temperature must be >= 0, got {self.labeler_temperature}")
        inner_options(self)  # malformed JSON fails now


def inner_options(cfg: IteratedRLHFConfig) -> dict[str, Any]:
    if not cfg.algorithm_config:
        return {}
    try:
        value = json.loads(cfg.algorithm_config)
    except json.JSONDecodeError as e:
        raise ConfigError(f"algorithm_config must be a JSON object, e.g. '{{\"iterations\": 20}}' ({e.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"algorithm_config must be a JSON object, got {type(value).__name__}")
    return value


@dataclass
class Rankings:
    """Every ranking labelled so far (checkpointed as JSON lists): ids, margins, gold and the round."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[list[int]]] = field(default_factory=list)
    margins: list[list[float]] = field(default_factory=list)
    gold: list[list[float]] = field(default_factory=list)
    round: list[int] = field(default_factory=list)
    heldout: list[bool] = field(default_factory=list)

    def add(self, rows: list[RankingRow], gold: list[list[float]], round_: int, heldout: list[bool]) -> None:
        self.prompt_ids += [r.prompt_ids for r in rows]
        self.response_ids += [r.response_ids for r in rows]
        self.margins += [r.margins for r in rows]
        self.gold += gold
        self.round += [round_] * len(rows)
        self.heldout += heldout

    def rows(self, which: Any) -> list[RankingRow]:
        return [RankingRow(self.prompt_ids[i], self.response_ids[i], self.margins[i]) for i in which]

    def state_dict(self) -> dict[str, list]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, list]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, [*state[f.name]])


class Labeler:
    """Ranks K responses per prompt: by what a built-in task's labelers perceive (its gold reward, or its
    language's biased ``labeler_view``) at their calibrated temperature, or by a user's labeler spec."""

    def __init__(self, ctx: Any, cfg: IteratedRLHFConfig) -> None:
        from rlhf_zoo_envs.tasks import labelers

        self.labelers, self.task = labelers, ctx.task
        self.rng = np.random.default_rng(ctx.seed + LABEL_STREAM)
        if cfg.labeler:
            from rlhf_zoo.rewards import combine

            self.score = combine([cfg.labeler], None, "--labeler", ctx.task, ctx.device, ctx.registry).score_texts
            self.tau = cfg.labeler_temperature
        elif ctx.task.has_gold:
            objective = ctx.task.objectives[0]
            self.score = lambda p, r: torch.as_tensor(self.task.labeler_view(p, r)[objective])
            stats = getattr(ctx.task, "manifest", {}).get("labelers", {})
            self.tau = next((s["temperature"] for s in stats.values() if s.get("objective") == objective), 1.0)
        else:
            raise ConfigError("iterated-rlhf needs labelers: this world has no gold reward; give --labeler SPEC "
                              "(a reward model, registered function or module:function that scores responses)")

    def __call__(self, prompts: list[str], responses: list[list[str]]) -> tuple[list[list[int]], list[list[float]],
                                                                              list[list[float]]]:
        """-> order (best first), margins of the ranked pairs, gold/labeler scores in ranked order."""
        k = len(responses[0])
        flat = self.score([p for p in prompts for _ in range(k)], [r for rs in responses for r in rs])
        values = np.asarray(flat, dtype=np.float64).reshape(len(prompts), k)
        orders, margins, scores = [], [], []
        for v in values:
            if self.tau > 0:
                order, levels = self.labelers.rank(v, self.tau, self.rng)
                m = self.labelers.margins_from_levels(levels)
            else:
                order = np.argsort(-v, kind="stable")
                m = np.zeros(k * (k - 1) // 2)
            orders.append(order.tolist())
            margins.append(m.tolist())
            scores.append([float(v[i]) for i in order])
        return orders, margins, scores


class _RetrainedRM:
    """The world as the inner algorithm sees it: the same, but its critic starts from the current
    reward model (InstructGPT) rather than the world's original one."""

    def __init__(self, world: Any, rm: torch.nn.Module) -> None:
        self._world, self._rm = world, rm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._world, name)

    def load_critic(self, device: Any, policy: torch.nn.Module) -> tuple[torch.nn.Module, str]:
        import copy

        return copy.deepcopy(self._rm).to(device).requires_grad_(True), "the round's retrained reward model"


@dataclass
class _RMReward:
    model: torch.nn.Module
    name: str = "retrained reward model"

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        return reward_scores(self.model, input_ids, attention_mask)


def _online_algorithm(ctx: Any, cfg: IteratedRLHFConfig) -> tuple[Algorithm, AlgoConfig]:
    algo = ctx.registry.algorithm(cfg.algorithm)
    names = {f.name for f in dataclasses.fields(algo.config_cls)}
    if algo.kind != "policy" or "dataset" in names or algo.name == "iterated-rlhf":
        raise ConfigError(f"--algorithm {cfg.algorithm!r}: iterated-rlhf runs an online algorithm that trains the policy "
                          "on its own samples (ppo, ppo-ptx, rrhf, rejection-sampling, ...), not a dataset or "
                          "inference method")
    return algo, algo.config_cls.from_dict(inner_options(cfg), preset=cfg.algorithm_preset)


def _sample_round(ctx: Any, policy: torch.nn.Module, prompts: list[str], k: int) -> list[list[str]]:
    task = ctx.task
    flat = [p for p in prompts for _ in range(k)]
    was_training = policy.training
    policy.eval()
    out: list[str] = []
    with ctx.phase("generate"):
        for start in range(0, len(flat), 256):
            ids, mask = task.encode_prompts(flat[start : start + 256], ctx.device)
            s = sample(policy, ids, mask, ctx.max_new_tokens, eos_token_id=task.eos_token_id,
                       pad_token_id=task.pad_token_id, temperature=ctx.config.temperature,
                       suppress_ids=task.suppress_ids, generator=ctx.sample_generator)
            ctx.counters["generated_tokens"] += int(s.response_mask.sum())
            out += task.decode(s.response_ids, s.response_mask)
    policy.train(was_training)
    return [out[i * k : (i + 1) * k] for i in range(len(prompts))]


def _world_rankings(task: Any) -> list[RankingRow]:
    name = task.reward_models[0]
    try:
        ds = task.dataset(f"rankings_{name}")
    except ConfigError:  # a user setup without ranking data: only the new labels
        return []
    prompt_ids = task.prompt_token_ids(ds["prompt"])
    return [RankingRow(p, task.response_token_ids(list(rs)), list(m))
            for p, rs, m in zip(prompt_ids, ds["responses"], ds["margins"], strict=True)]


def train(ctx: Any, cfg: IteratedRLHFConfig) -> ModelPolicy:
    task, policy = ctx.task, ctx.policy
    algo, inner_cfg = _online_algorithm(ctx, cfg)
    labeler = Labeler(ctx, cfg)
    ctx.track("labeler_rng", labeler.rng)
    old = _world_rankings(task) if cfg.use_task_rankings else []
    if old and len(old[0].response_ids) != cfg.k:
        raise ConfigError(f"k = {cfg.k}, but the world's rankings rank {len(old[0].response_ids)} responses; give "
                          f"--k {len(old[0].response_ids)} or --no-use-task-rankings")
    rankings = ctx.track("rankings", Rankings())
    rm = ctx.track("reward_model", reward_model_from_policy(ctx.reference).to(ctx.device))
    prompt_rng = ctx.track("prompt_rng", np.random.default_rng(ctx.seed))
    history = ctx.track("history", _History())
    train_prompts, eval_prompts = task.prompts("train"), task.prompts("eval")[: cfg.eval_prompts]
    for r in ctx.iterations(cfg.rounds):
        figures: dict[str, Any] = {"round": r}
        # (a) + (b): sample K responses per prompt from the current policy; the labelers rank them
        n_label = cfg.prompts_per_round * (cfg.rounds if cfg.label_schedule == "upfront" else 1)
        if cfg.label_schedule == "iterated" or r == 1:
            idx = prompt_rng.choice(len(train_prompts), size=n_label, replace=n_label > len(train_prompts))
            prompts = [train_prompts[i] for i in idx]
            responses = _sample_round(ctx, policy, prompts, cfg.k)
            orders, margins, scores = labeler(prompts, responses)
            p_ids = task.prompt_token_ids(prompts)
            rows = [RankingRow(p, task.response_token_ids([rs[i] for i in o]), m)
                    for p, rs, o, m in zip(p_ids, responses, orders, margins, strict=True)]
            held = (np.arange(len(rows)) % round(1 / HELDOUT_FRACTION) == 0).tolist()
            new_held = [row for row, h in zip(rows, held, strict=True) if h]
            new_gold = [g for g, h in zip(scores, held, strict=True) if h]
            if r > 1:  # how well the previous round's reward model ranks the moved policy's samples
                figures["rm_accuracy_before"] = ranking_accuracy(rm, new_held, new_gold, task.pad_token_id)
            rankings.add(rows, scores, r, held)
            # (c) retrain the reward model from the SFT trunk on the old rankings and all new ones
            train_rows = old + rankings.rows(i for i, h in enumerate(rankings.heldout) if not h)
            fresh = reward_model_from_policy(ctx.reference).to(ctx.device)
            with ctx.phase("reward model"):
                train_reward_model(fresh, train_rows, pad_id=task.pad_token_id, steps=cfg.rm_steps,
                                   batch_size=cfg.rm_batch_size, lr=cfg.rm_learning_rate, seed=ctx.seed + 31 * r,
                                   use_margin=cfg.use_margin, desc=f"round {r} reward model", progress=False)
            rm.load_state_dict(fresh.state_dict())
            figures["rm_accuracy_after"] = ranking_accuracy(rm, new_held, new_gold, task.pad_token_id)
            figures["new_rankings"] = len(rows)
        else:  # upfront, later rounds: measure the fixed reward model on the moved policy's samples (these
            # labels are for the figure only; nothing trains on them, so both schedules train on as many)
            n_measure = max(1, round(cfg.prompts_per_round * HELDOUT_FRACTION))
            idx = prompt_rng.choice(len(train_prompts), size=n_measure, replace=n_measure > len(train_prompts))
            prompts = [train_prompts[i] for i in idx]
            responses = _sample_round(ctx, policy, prompts, cfg.k)
            orders, _, scores = labeler(prompts, responses)
            rows = [RankingRow(p, task.response_token_ids([rs[i] for i in o]), [])
                    for p, rs, o in zip(task.prompt_token_ids(prompts), responses, orders, strict=True)]
            figures["rm_accuracy_before"] = ranking_accuracy(rm, rows, scores, task.pad_token_id)
        figures["rankings_total"] = len(rankings.round) + len(old)
        # (d) the online algorithm, from the current policy, against the new reward model
        inner = _inner_context(ctx, algo, inner_cfg, rm, r)
        result = algo.train(inner, inner_cfg)
        if result.model is not policy:
            policy.load_state_dict(result.model.state_dict())
        figures.update(_evaluate_round(ctx, policy, rm, eval_prompts))
        history.rounds.append(figures)
        ctx.log(r, figures)
    ctx.reward_fn = _RMReward(rm)  # the final evaluation's proxy is the last round's reward model
    return ModelPolicy(policy, metrics={"rounds": list(history.rounds), "label_schedule": cfg.label_schedule,
                                        "inner_algorithm": algo.name})


@dataclass
class _History:
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": json.dumps(self.rounds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = json.loads(state["rounds"])


def _inner_context(ctx: Any, algo: Algorithm, cfg: AlgoConfig, rm: torch.nn.Module, r: int) -> Any:
    """A run context for round ``r``'s online algorithm: the same policy, reference, device, counters and
    phase timers; the round's reward model as the reward and the critic's start; its own seed (so its
    prompt draws differ between rounds), metrics under ``rounds/round-r/``, no checkpoints of its own."""
    out = ctx.out / "rounds" / f"round-{r}"
    if ctx.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    return dataclasses.replace(ctx, algorithm=algo, config=cfg, task=_RetrainedRM(ctx.task, rm), reward_fn=_RMReward(rm),
                               seed=ctx.seed * 1000 + r, out=out, checkpoint_every=0, resume=False,
                               show_progress=False, iteration=0, resumed_from=None, _tracked={}, _total=0, _every=0,
                               _bar=None)


def _evaluate_round(ctx: Any, policy: torch.nn.Module, rm: torch.nn.Module, prompts: list[str]) -> dict[str, float]:
    task = ctx.task
    with ctx.phase("evaluate"):
        out = evaluate(ModelPolicy(policy), task, reference=ctx.reference, reward_fn=_RMReward(rm), prompts=prompts,
                       samples_per_prompt=ctx.config.eval_samples, max_new_tokens=ctx.max_new_tokens,
                       temperature=ctx.config.temperature, seed=ctx.seed + 10_000, beta=ctx.beta,
                       missing_eos_penalty=task.missing_eos_penalty, device=ctx.device)
    return {k: out[k] for k in ("gold_reward", "proxy_reward", "kl_to_ref", "response_length") if k in out}


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("iterated-rlhf", IteratedRLHFConfig, train,
                       "Iterated online RLHF: label the policy's samples, retrain the reward model, RL again, each "
                       "round (Anthropic)."))
