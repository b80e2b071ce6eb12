"""``ppo`` and ``ppo-ptx``: proximal policy optimisation against the reward model with a KL penalty.

Papers: Schulman et al. 2017 (PPO); Ziegler et al. 2019 (KL-shaped reward, adaptive KL controller);
Ouyang et al. 2022 (InstructGPT: PPO-ptx, Eq. 2).

    objective(phi) = E_(x,y)~pi_phi [ r(x, y) - beta log(pi_phi(y|x) / pi_ref(y|x)) ]
                     + gamma E_x~D_pretrain [ log pi_phi(x) ]                         (ptx term, ppo-ptx only)

Implementation details:
  1. Rollouts go through the ``ResponseGen`` vector environment: the policy samples (KV cache) at
     ``temperature``; the environment scores (RM, minus the missing-EOS penalty) and gives reference
     log-probs at the same temperature. Per-token rewards are `rlhf_zoo.ops.per_token_rewards` with the
     current KL coefficient: -beta * kl_t on every token, the score added on the last real token.
  2. The critic is a separate model initialised from the reward model (InstructGPT sec. 3.5; on a user's
     setup from the policy with a new head when no reward model reads the policy's tokens); its
     scalar head is read at every position (`rlhf_zoo.models.token_values`). A separate critic keeps
     value regression from disturbing the policy trunk, and a tiny model makes it cheap.
  3. GAE(gamma, lambda) over response tokens (the end of the response is terminal), advantages
     whitened over the batch, returns = advantages + values. lambda defaults to 1: responses are a few
     tokens long, so Monte-Carlo returns (with the critic only as a baseline) cost little variance and
     carry no critic bias; on ``exact`` lambda = 0.95 converged visibly further from pi*_beta.
  4. Several epochs of shuffled minibatches: clipped surrogate (Eq. 7 of Schulman et al.), PPO2-clipped
     value loss, gradient-norm clipping. Old log-probs are those recorded while sampling, so the first
     minibatch has ratio 1, clipfrac 0 and approx_kl 0.
  5. KL controller: fixed, or adaptive towards ``kl_target`` (per-sequence KL) after each rollout.
  6. ppo-ptx: each minibatch also takes a batch of the task's pretraining corpus and adds
     ptx_coef * mean token NLL to the policy loss, one backward for both. Pretraining batches come from
     their own random stream, so ptx_coef = 0 reproduces ``ppo`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rlhf_zoo.config import AlgoConfig, check_positive, check_range, option
from rlhf_zoo.distributed import SINGLE, Dist
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.models import token_values
from rlhf_zoo.ops import masked_mean, masked_sum, per_token_rewards, response_logprobs
from rlhf_zoo.ops.advantages import gae, whiten
from rlhf_zoo.ops.kl_control import AdaptiveKLController, FixedKLController
from rlhf_zoo.ops.policy_losses import clipped_policy_loss, clipped_value_loss
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.rollout import Rollout, collect, draw_prompts
from rlhf_zoo.training import adamw, backward, collate_lm, lm_loss, lm_row, optimizer_step

PTX_STREAM = 7919  # offset of the pretraining-batch random stream from the run seed


@dataclass(frozen=True)
class PPOConfig(AlgoConfig):
    presets = {"quick": {"iterations": 40, "batch_prompts": 64, "eval_prompts": 64, "lr_schedule": "constant"},
               "smoke": {"iterations": 2, "batch_prompts": 8, "minibatches": 2, "epochs": 1, "eval_prompts": 2,
                         "eval_samples": 1}}
    kl_coefficient = "beta"

    iterations: int = option(600, "Rollout-and-update iterations.")
    batch_prompts: int = option(128, "Prompts (episodes) per rollout.")
    epochs: int = option(4, "Passes over each rollout.")
    minibatches: int = option(4, "Minibatches per epoch.")
    learning_rate: float = option(5e-4, "Policy learning rate (AdamW).")
    critic_learning_rate: float = option(1e-3, "Critic learning rate (AdamW).")
    lr_schedule: Literal["constant", "linear"] = option(
        "linear", "Learning rates over the run: constant, or linear decay to 0 at the last iteration (policy and "
        "critic; the sampled gradient's noise then shrinks with the step, so the policy settles).")
    beta: float | None = option(None, "KL coefficient (initial value if adaptive); default: the task's.")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "Per-token KL estimator in the reward.")
    adaptive_kl: bool = option(False, "Adapt beta towards kl_target (Ziegler et al.).")
    kl_target: float = option(2.0, "Target per-sequence KL for the adaptive controller.")
    kl_horizon: int = option(10000, "Horizon (episodes) of the adaptive controller.")
    gamma: float = option(1.0, "Discount over response tokens.")
    lam: float = option(1.0, "GAE lambda (1: Monte-Carlo returns with the critic as baseline).")
    clip: float = option(0.2, "Policy ratio clip epsilon.")
    value_clip: float = option(0.2, "Value clip around the old values.")
    whiten_advantages: bool = option(True, "Normalise advantages over the rollout.")
    max_grad_norm: float = option(1.0, "Gradient-norm clip for policy and critic.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "iterations", "batch_prompts", "epochs", "minibatches", "learning_rate",
                       "critic_learning_rate", "kl_target", "kl_horizon", "clip", "value_clip", "max_grad_norm")
        check_range(self, "gamma", 0.0, 1.0)
        check_range(self, "lam", 0.0, 1.0)
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.minibatches > self.batch_prompts:
            raise ValueError(f"minibatches ({self.minibatches}) must be <= batch_prompts ({self.batch_prompts})")


@dataclass(frozen=True)
class PPOPtxConfig(PPOConfig):
    ptx_coef: float = option(1.0, "gamma: weight of the pretraining log-likelihood term (0 = plain PPO).")
    ptx_batch_size: int = option(32, "Pretraining sequences per minibatch.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "ptx_batch_size")
        if self.ptx_coef < 0:
            raise ValueError(f"ptx_coef must be >= 0, got {self.ptx_coef}")


class PretrainBatches:
    """Random batches of the task's pretraining corpus (loss on every token after BOS). Every rank draws
    the same batch (the same stream) and trains on its shard of the rows."""

    def __init__(self, task, batch_size: int, seed: int, device: torch.device) -> None:
        texts = task.dataset("pretrain")["text"]  # the task's corpus, or a user's --ptx-dataset
        start = task.prompt_token_ids([""])[0]  # BOS where the tokenizer adds one
        self.rows = [lm_row(start, ids) for ids in task.response_token_ids(texts)]
        self.pad, self.batch_size, self.device = task.pad_token_id, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, dist: Dist = SINGLE) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's rows of the next batch, and the whole batch's number of counted tokens."""
        idx = torch.randint(len(self.rows), (self.batch_size,), generator=self.generator)
        rows = [self.rows[i] for i in idx.tolist()]
        counted = sum(sum(r.loss_mask[1:]) for r in rows)  # lm_loss counts from the second token on
        return collate_lm([rows[i] for i in dist.shard(torch.arange(len(rows))).tolist()], self.pad, self.device), \
            torch.tensor(float(counted), device=self.device)


def policy_loss(ctx, cfg: PPOConfig, policy, mb: Rollout, mb_adv: torch.Tensor, n_tokens: torch.Tensor):
    """This rank's part of the minibatch's clipped surrogate (a mean over the minibatch's ``n_tokens``
    response tokens on all ranks).  -> (loss, PolicyLoss)"""
    lp = response_logprobs(policy, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask,
                           cfg.temperature, ctx.task.suppress_ids)  # (b, T)
    pl = clipped_policy_loss(lp, mb.logprobs, mb_adv, mb.response_mask, cfg.clip,
                             normalizer=n_tokens / ctx.dist.world_size)
    return pl.loss, pl


def update(ctx, cfg: PPOConfig, policy, critic, opt, critic_opt, r: Rollout, rewards: torch.Tensor,
           ptx: PretrainBatches | None, batch_rows: int) -> dict[str, list[float]]:
    """Values, GAE, whitening, then epochs of minibatches of the clipped policy loss (+ ptx) and the
    clipped value loss. ``r`` holds this rank's rows of a ``batch_rows``-row batch (rows [lo, hi) of
    `Dist.bounds`); every minibatch is a set of global rows, each rank training on those it holds, so
    N ranks take exactly the steps one rank takes on the whole batch."""
    mask = r.response_mask
    with torch.no_grad(), ctx.phase("train"):
        old_values = token_values(critic, r.input_ids, r.attention_mask, r.prompt_width)  # (B, T)
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask, all_reduce=ctx.dist.sum if ctx.dist.active else None)
    stats: dict[str, list[float]] = {}
    term = "policy loss" + (" (with ptx)" if ptx else "")
    with ctx.phase("train"):
        for _ in range(cfg.epochs):
            perm = torch.randperm(batch_rows, generator=ctx.generator, device=ctx.device)
            for rows in perm.chunk(cfg.minibatches):
                local = ctx.dist.owned(rows, batch_rows)
                n_tokens = ctx.dist.sum(mask[local].sum().float())  # the minibatch's tokens on all ranks
                mb = r.select(local)
                if len(local):
                    loss, pl = policy_loss(ctx, cfg, policy, mb, adv[local], n_tokens)
                    backward(loss, term)
                if ptx is not None:
                    batch, ptx_tokens = ptx.next(ctx.dist)
                    ptx_loss = lm_loss(policy, batch, ctx.task.suppress_ids, normalizer=ptx_tokens / ctx.dist.world_size)
                    backward(cfg.ptx_coef * ptx_loss, term)
                optimizer_step(None, opt, cfg.max_grad_norm, term)
                if len(local):
                    values = token_values(critic, mb.input_ids, mb.attention_mask, mb.prompt_width)
                    vf_loss, vf_clipfrac = clipped_value_loss(values, old_values[local], returns[local],
                                                              mb.response_mask, cfg.value_clip,
                                                              normalizer=n_tokens / ctx.dist.world_size)
                    backward(vf_loss, "value loss")
                optimizer_step(None, critic_opt, cfg.max_grad_norm, "value loss")
                if len(local):
                    for k, v in (("policy_loss", pl.loss), ("clipfrac", pl.clipfrac), ("approx_kl", pl.approx_kl),
                                 ("ratio", pl.ratio_mean), ("value_loss", vf_loss), ("value_clipfrac", vf_clipfrac)):
                        stats.setdefault(k, []).append(float(v.detach()))
                    ctx.counters["trained_tokens"] += int(mb.attention_mask.sum())
                if ptx is not None:
                    stats.setdefault("ptx_loss", []).append(float(ptx_loss.detach()) * ctx.dist.world_size)
    stats["advantage_std"] = [float(masked_mean(adv.square(), mask).sqrt())]
    return stats


def train(ctx, cfg: PPOConfig) -> ModelPolicy:
    task, policy = ctx.task, ctx.policy
    critic, _ = task.load_critic(ctx.device, policy)  # where it starts: the world's describe() in config.json
    lo, hi = ctx.dist.bounds(cfg.batch_prompts)  # this rank's rollout rows
    env = ctx.make_env(hi - lo, kl_estimator=cfg.kl_estimator)
    kl_ctl = (AdaptiveKLController(ctx.beta, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(ctx.beta))
    opt = adamw(policy.parameters(), lr=cfg.learning_rate)
    critic_opt = adamw(critic.parameters(), lr=cfg.critic_learning_rate)
    decay = (lambda k: 1.0 - k / cfg.iterations) if cfg.lr_schedule == "linear" else (lambda k: 1.0)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt, critic_opt)]
    ptx_coef = getattr(cfg, "ptx_coef", 0.0)
    ptx = PretrainBatches(task, cfg.ptx_batch_size, ctx.seed + PTX_STREAM, ctx.device) if ptx_coef > 0 else None
    rng = np.random.default_rng(ctx.seed)
    for name, obj in (("optimizer", opt), ("critic", critic), ("critic_optimizer", critic_opt),
                      ("kl_controller", kl_ctl), ("prompt_rng", rng), ("ptx_generator", ptx and ptx.generator),
                      ("lr_schedule", schedules[0]), ("critic_lr_schedule", schedules[1])):
        if obj is not None:
            ctx.track(name, obj)
    n_prompts = len(task.prompts("train"))
    policy.train()
    critic.train()
    B = cfg.batch_prompts
    for it in ctx.iterations(cfg.iterations):
        # 1) rollout of this rank's prompts through the environment; rewards with the current KL coefficient
        r = collect(ctx, env, policy, draw_prompts(rng, n_prompts, B)[lo:hi])
        mask = r.response_mask
        rewards = per_token_rewards(r.logprobs, r.ref_logprobs, r.scores, mask, kl_ctl.value, cfg.kl_estimator)
        # 2) values, GAE, whitening; 3) epochs of minibatches
        lr = opt.param_groups[0]["lr"]  # (this iteration's learning rate, logged)
        stats = update(ctx, cfg, policy, critic, opt, critic_opt, r, rewards, ptx, B)
        for schedule in schedules:
            schedule.step()
        # 4) KL controller and logging, over the whole batch
        sums = ctx.dist.sum(torch.stack([r.scores.sum(), masked_sum(r.logprobs - r.ref_logprobs, mask),
                                         rewards.sum(), mask.sum().float()]))
        score, seq_kl, ret, length = (float(v) / B for v in sums)
        beta = kl_ctl.value
        kl_ctl.update(seq_kl, B)
        ctx.log(it, {"score": score, "kl": seq_kl, "beta": beta, "return": ret, "response_length": length,
                     "learning_rate": lr, **{k: sum(v) / len(v) for k, v in stats.items()}})
    return ModelPolicy(policy)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("ppo", PPOConfig, train, "PPO with a KL penalty to the SFT policy (InstructGPT, Ziegler et al.).",
                       data_parallel=True))
    register(Algorithm("ppo-ptx", PPOPtxConfig, train,
                       "PPO plus gamma-weighted pretraining log-likelihood (InstructGPT).", data_parallel=True))
