"""``rloo`` and ``grpo``: critic-free online RL over K sampled responses per prompt.

Papers: Kool et al. 2019 and Ahmadian et al. 2024 ("Back to Basics", RLOO); Shao et al. 2024
(DeepSeekMath, GRPO); Liu et al. 2025 ("Understanding R1-Zero-Like Training", Dr. GRPO).

Both sample K responses to each of n prompts from the current policy through the ``ResponseGen``
environment and use the other responses to the same prompt as the baseline, so neither trains a critic.

RLOO. A response's return is the KL-shaped reward the environment pays, summed over its tokens
(`rlhf_zoo.ops.per_token_rewards`, k1 estimator):

    R_i = r(x, y_i) - beta sum_t [log pi(y_i,t) - log pi_ref(y_i,t)]
    A_i = R_i - 1/(K-1) sum_{j != i} R_j                                   `rloo_advantages`

optionally whitened over the whole batch (all prompts, all ranks; the groups' advantages already sum to
0, so this only rescales the step). The loss is REINFORCE on the whole sequence, averaged over the
batch's sequences: L = -1/(nK) sum_i A_i sum_t log pi(y_i,t). With the defaults (``epochs=1``,
``minibatches=1``) this is exactly the paper's on-policy REINFORCE step: the loss is computed as the
clipped surrogate (`clipped_policy_loss`) at ratio 1, whose gradient is that of -A_i log pi(y_i). More
epochs or minibatches turn it into the PPO-clipped variant (TRL's RLOOTrainer), reusing each rollout.
RLOO maximises the KL-regularised objective, so it aims at pi*_beta like PPO.

GRPO. The reward is the environment's score alone (no KL in the reward):

    A_i = (r_i - mean_group r) / (std_group r + eps)                    `group_advantages`

broadcast to every token of y_i; clipped surrogate over ``epochs`` x ``minibatches`` per rollout, plus
beta times the k3 estimate of KL(pi || pi_ref) per token as a LOSS term (its gradient pulls towards the
reference and is 0 where pi = pi_ref); each sequence's token terms are averaged, then the sequences
(``loss_type="grpo"``, DeepSeekMath Eq. 3). ``loss_type="dr_grpo"`` is Dr. GRPO: advantages not divided
by the group's std, and each sequence's token sum divided by the constant max_new_tokens instead of its
own length (`sequence_aggregation_weights`).

Implementation details:
  1. Old log-probs are the ones recorded while sampling, so the first minibatch of every rollout has
     ratio 1 and clipfrac 0; the reference log-probs come from the environment (same temperature).
  2. Minibatches are sets of whole prompt groups (a random permutation of the n prompts, chunked), so a
     group's K responses are always trained together.
  3. Data parallel (``zoo run --nproc N``): every rank draws the same prompts and owns a contiguous block
     of whole groups (`Dist.bounds` over the n prompts), so group statistics need no communication; RLOO's
     whitening all-reduces its moments, and each loss is this rank's share of the whole minibatch's mean
     over sequences (normalizer = sequences in the minibatch / world size), so N ranks take the steps one
     rank takes on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rlhf_zoo.config import AlgoConfig, check_positive, option
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.ops import kl_penalty, masked_sum, per_token_rewards, response_logprobs
from rlhf_zoo.ops.advantages import group_advantages, rloo_advantages, whiten
from rlhf_zoo.ops.policy_losses import SequenceAggregation, clipped_policy_loss, sequence_aggregation_weights
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.rollout import Rollout, collect, draw_prompts
from rlhf_zoo.training import adamw, backward, optimizer_step


@dataclass(frozen=True)
class GroupConfig(AlgoConfig):
    """Fields RLOO and GRPO share: K responses per prompt, epochs of minibatches of whole groups."""

    kl_coefficient = "beta"

    iterations: int = option(200, "Sample-and-update iterations.")
    prompts_per_iteration: int = option(16, "Prompts per iteration; each gets k responses.")
    k: int = option(4, "Responses sampled per prompt (the group; at least 2).")
    epochs: int = option(1, "Passes over each rollout.")
    minibatches: int = option(1, "Minibatches per epoch (each a set of whole prompt groups).")
    learning_rate: float = option(1e-3, "AdamW learning rate (constant).")
    clip: float = option(0.2, "Policy ratio clip epsilon (inactive on the first minibatch, where the ratio is 1).")
    beta: float | None = option(None, "KL coefficient; default: the task's.")
    max_grad_norm: float = option(1.0, "Gradient-norm clip.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "iterations", "prompts_per_iteration", "k", "epochs", "minibatches", "learning_rate",
                       "clip", "max_grad_norm")
        if self.k < 2:
            raise ConfigError(f"k must be >= 2 responses per prompt (the group is the baseline), got k={self.k}")
        if self.beta is not None and self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.minibatches > self.prompts_per_iteration:
            raise ConfigError(f"minibatches ({self.minibatches}) must be <= prompts_per_iteration "
                              f"({self.prompts_per_iteration})")


@dataclass(frozen=True)
class RLOOConfig(GroupConfig):
    presets = {"quick": {"iterations": 150, "prompts_per_iteration": 32, "eval_prompts": 64},
               "smoke": {"iterations": 2, "prompts_per_iteration": 2, "k": 2, "eval_prompts": 2,
                         "eval_samples": 1}}

    beta: float | None = option(None, "KL coefficient of the reward R = score - beta * KL; default: the task's.")
    normalize_advantages: bool = option(
        True, "Divide the advantages by their standard deviation over the whole batch (they already have "
              "mean 0 per prompt): a step size independent of the reward's scale.")


@dataclass(frozen=True)
class GRPOConfig(GroupConfig):
    presets = {"quick": {"iterations": 40, "prompts_per_iteration": 32, "eval_prompts": 64},
               "smoke": {"iterations": 2, "prompts_per_iteration": 2, "k": 2, "minibatches": 2, "epochs": 1,
                         "eval_prompts": 2, "eval_samples": 1}}

    epochs: int = option(2, "Passes over each rollout.")
    minibatches: int = option(2, "Minibatches per epoch (each a set of whole prompt groups).")
    beta: float | None = option(None, "Weight of the k3 KL(pi || pi_ref) loss term (not in the reward); "
                                      "default: the task's.")
    loss_type: Literal["grpo", "dr_grpo"] = option(
        "grpo", "grpo: advantages divided by the group's std, each sequence's token losses averaged, then the "
                "sequences; dr_grpo (Liu et al. 2025): no std division, each sequence's token sum divided by "
                "the constant max_new_tokens.")
    std_eps: float = option(1e-4, "eps of (r - mean) / (std + eps) (grpo loss type).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "std_eps")


# --- the per-algorithm parts: sequence advantages, loss aggregation, KL loss weight ---------------------
def rloo_sequence_advantages(ctx, cfg: RLOOConfig, r: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO: leave-one-out advantages of the KL-shaped returns, optionally whitened over the whole batch.
    -> (rows,) advantages and the batch sums to log"""
    returns = per_token_rewards(r.logprobs, r.ref_logprobs, r.scores, r.response_mask, ctx.beta).sum(-1)  # (rows,)
    adv = rloo_advantages(returns.view(-1, cfg.k)).view(-1)
    if cfg.normalize_advantages:
        adv = whiten(adv.view(-1, 1), torch.ones_like(adv.view(-1, 1)),
                     all_reduce=ctx.dist.sum if ctx.dist.active else None).view(-1)
    return adv, {"return": returns.sum()}


def grpo_sequence_advantages(ctx, cfg: GRPOConfig, r: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO: group-normalised scores (Dr. GRPO: only centred).  -> (rows,) advantages and batch sums"""
    scores = r.scores.view(-1, cfg.k)
    adv = group_advantages(scores, normalize_std=cfg.loss_type == "grpo", eps=cfg.std_eps).view(-1)
    tied = (scores.amax(-1) == scores.amin(-1)).float()
    return adv, {"tied_fraction": tied.sum() * cfg.k}  # responses in groups of equal scores (advantage 0)


def aggregation(cfg: GroupConfig) -> SequenceAggregation:
    if isinstance(cfg, GRPOConfig):
        return "constant" if cfg.loss_type == "dr_grpo" else "mean"
    return "sum"


def kl_loss_coef(ctx, cfg: GroupConfig) -> float:
    """GRPO's k3 KL term is a loss term weighted by beta; RLOO's KL is in the reward."""
    return ctx.beta if isinstance(cfg, GRPOConfig) else 0.0


# --- the shared loss and update ------------------------------------------------------------------------
def group_loss(ctx, cfg: GroupConfig, policy, mb: Rollout, mb_adv: torch.Tensor, normalizer: float):
    """This rank's share of a minibatch's loss: the clipped surrogate with the sequence advantages
    broadcast to every token, aggregated per sequence (`sequence_aggregation_weights`), plus GRPO's
    beta * k3 KL to the reference, aggregated the same way; both divided by ``normalizer`` (the
    minibatch's sequences on all ranks / world size).  -> (loss, PolicyLoss, kl loss (detached))"""
    mask = mb.response_mask
    lp = response_logprobs(policy, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mask, cfg.temperature,
                           ctx.task.suppress_ids)  # (b, T), 0 off the mask
    weights = sequence_aggregation_weights(mask, aggregation(cfg), ctx.max_new_tokens)
    pl = clipped_policy_loss(lp, mb.logprobs, mb_adv[:, None].expand_as(lp), mask, cfg.clip,
                             normalizer=normalizer, weights=weights)
    ref = torch.where(mask.bool(), mb.ref_logprobs, torch.zeros_like(lp))  # off the mask: lp = ref = 0
    kl_loss = masked_sum(kl_penalty(lp, ref, "k3") * weights, mask) / normalizer
    coef = kl_loss_coef(ctx, cfg)
    loss = pl.loss + coef * kl_loss if coef else pl.loss
    return loss, pl, kl_loss.detach()


def update(ctx, cfg: GroupConfig, policy, opt, r: Rollout, adv: torch.Tensor) -> dict[str, list[float]]:
    """Epochs of minibatches of whole prompt groups. ``r`` holds this rank's groups (prompts [lo, hi) of
    `Dist.bounds` over the batch's n prompts); every minibatch is a set of global prompts, each rank
    training on those it holds, so N ranks take the steps one rank takes on the whole batch."""
    n, K = cfg.prompts_per_iteration, cfg.k
    offsets = torch.arange(K, device=ctx.device)
    stats: dict[str, list[float]] = {}
    term = f"{type(cfg).__name__.removesuffix('Config').lower()} loss"
    with ctx.phase("train"):
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=ctx.generator, device=ctx.device)
            for groups in perm.chunk(cfg.minibatches):
                local = ctx.dist.owned(groups, n)  # this rank's groups, local numbers
                rows = (local[:, None] * K + offsets).reshape(-1)
                normalizer = len(groups) * K / ctx.dist.world_size
                if len(rows):
                    mb = r.select(rows)
                    loss, pl, kl_loss = group_loss(ctx, cfg, policy, mb, adv[rows], normalizer)
                    backward(loss, term)
                optimizer_step(None, opt, cfg.max_grad_norm, term)
                if len(rows):
                    for key, v in (("policy_loss", pl.loss), ("clipfrac", pl.clipfrac), ("approx_kl", pl.approx_kl),
                                   ("ratio", pl.ratio_mean), ("kl_loss", kl_loss)):
                        stats.setdefault(key, []).append(float(v.detach()))
                    ctx.counters["trained_tokens"] += int(mb.attention_mask.sum())
    return stats


def train(ctx, cfg: GroupConfig) -> ModelPolicy:
    task, policy = ctx.task, ctx.policy
    n, K = cfg.prompts_per_iteration, cfg.k
    lo, hi = ctx.dist.bounds(n)  # this rank's prompt groups
    if hi == lo:
        raise ConfigError(f"prompts_per_iteration ({n}) must be >= the number of processes ({ctx.dist.world_size})")
    env = ctx.make_env((hi - lo) * K)
    opt = ctx.track("optimizer", adamw(policy.parameters(), lr=cfg.learning_rate))
    rng = ctx.track("prompt_rng", np.random.default_rng(ctx.seed))
    sequence_advantages = grpo_sequence_advantages if isinstance(cfg, GRPOConfig) else rloo_sequence_advantages
    n_available = len(task.prompts("train"))
    policy.train()
    for it in ctx.iterations(cfg.iterations):
        # 1) K responses to each of this rank's prompts (every rank draws the same n prompts)
        r = collect(ctx, env, policy, draw_prompts(rng, n_available, n, K)[lo * K : hi * K])
        # 2) one advantage per response from its group; 3) epochs of minibatches of whole groups
        with ctx.phase("train"):
            adv, sums = sequence_advantages(ctx, cfg, r)
        stats = update(ctx, cfg, policy, opt, r, adv)
        # 4) logging, over the whole batch
        mask = r.response_mask
        keys = ["score", "kl", "response_length", "advantage_rms", *sums]
        totals = ctx.dist.sum(torch.stack([r.scores.sum(), masked_sum(r.logprobs - r.ref_logprobs, mask),
                                           mask.sum().float(), adv.square().sum(), *sums.values()]))
        metrics = {k: float(v) / (n * K) for k, v in zip(keys, totals, strict=True)}
        metrics["advantage_rms"] **= 0.5
        ctx.log(it, {**metrics, **{k: sum(v) / len(v) for k, v in stats.items()}})
    env.close()
    return ModelPolicy(policy)


class AlgorithmPlugin:
    """A plugin object that registers one algorithm. ``rloo`` and ``grpo`` are two entry points into this
    module (``rlhf_zoo_plugins.critic_free:RLOO_PLUGIN`` and ``:GRPO_PLUGIN``), each named after its
    algorithm, so ``RLHF_ZOO_BLOCK_PLUGINS`` and the run's recorded plugin name each one separately."""

    def __init__(self, algorithm: Algorithm) -> None:
        self.algorithm = algorithm

    @hookimpl
    def register_algorithms(self, register) -> None:
        register(self.algorithm)


RLOO_PLUGIN = AlgorithmPlugin(Algorithm(
    "rloo", RLOOConfig, train, "RLOO: REINFORCE with a leave-one-out baseline over k samples per prompt, KL in the "
    "reward (Ahmadian et al.).", data_parallel=True))
GRPO_PLUGIN = AlgorithmPlugin(Algorithm(
    "grpo", GRPOConfig, train, "GRPO: group-normalised advantages, clipped surrogate, k3 KL loss term "
    "(DeepSeekMath); --loss-type dr_grpo for Dr. GRPO.", data_parallel=True))
