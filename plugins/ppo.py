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
  2. The critic is a separate model initialised from the reward model (InstructGPT sec. 3.5); its
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
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.models import load_reward_model, token_values
from rlhf_zoo.ops import masked_mean, masked_sum, per_token_rewards, response_logprobs
from rlhf_zoo.ops.advantages import gae, whiten
from rlhf_zoo.ops.kl_control import AdaptiveKLController, FixedKLController
from rlhf_zoo.ops.policy_losses import clipped_policy_loss, clipped_value_loss
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.rollout import Rollout, collect, draw_prompts
from rlhf_zoo.training import collate_lm, lm_loss, lm_row, optimizer_step

PTX_STREAM = 7919  # offset of the pretraining-batch random stream from the run seed


@dataclass(frozen=True)
class PPOConfig(AlgoConfig):
    presets = {"quick": {"iterations": 40, "eval_prompts": 64},
               "smoke": {"iterations": 2, "batch_prompts": 8, "minibatches": 2, "epochs": 1, "eval_prompts": 2,
                         "eval_samples": 1}}

    iterations: int = option(300, "Rollout-and-update iterations.")
    batch_prompts: int = option(64, "Prompts (episodes) per rollout.")
    epochs: int = option(4, "Passes over each rollout.")
    minibatches: int = option(4, "Minibatches per epoch.")
    learning_rate: float = option(5e-4, "Policy learning rate (AdamW).")
    critic_learning_rate: float = option(1e-3, "Critic learning rate (AdamW).")
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
    """Random batches of the task's pretraining corpus (loss on every token after BOS)."""

    def __init__(self, task, batch_size: int, seed: int, device: torch.device) -> None:
        tok = task.tokenizer
        self.rows = [lm_row([tok.bos_token_id], [*tok.encode(t, add_special_tokens=False), tok.eos_token_id])
                     for t in task.dataset("pretrain")["text"]]
        self.pad, self.batch_size, self.device = tok.pad_token_id, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.rows), (self.batch_size,), generator=self.generator)
        return collate_lm([self.rows[i] for i in idx.tolist()], self.pad, self.device)


def policy_step(ctx, cfg: PPOConfig, policy, mb: Rollout, mb_adv: torch.Tensor, ptx: PretrainBatches | None):
    """Clipped surrogate (+ ptx term) on one minibatch.  -> (total loss, PolicyLoss, ptx loss or None)"""
    lp = response_logprobs(policy, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask,
                           cfg.temperature, ctx.task.suppress_ids)  # (b, T)
    pl = clipped_policy_loss(lp, mb.logprobs, mb_adv, mb.response_mask, cfg.clip)
    loss, ptx_loss = pl.loss, None
    if ptx is not None:
        ptx_loss = lm_loss(policy, ptx.next(), ctx.task.suppress_ids)
        loss = loss + cfg.ptx_coef * ptx_loss
    return loss, pl, ptx_loss


def train(ctx, cfg: PPOConfig) -> ModelPolicy:
    task, policy = ctx.task, ctx.policy
    critic = load_reward_model(task.path / task.reward_models[0], ctx.device)
    env = ctx.make_env(cfg.batch_prompts, kl_estimator=cfg.kl_estimator)
    kl_ctl = (AdaptiveKLController(ctx.beta, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(ctx.beta))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate, weight_decay=0.0)
    ptx_coef = getattr(cfg, "ptx_coef", 0.0)
    ptx = PretrainBatches(task, cfg.ptx_batch_size, ctx.seed + PTX_STREAM, ctx.device) if ptx_coef > 0 else None
    rng = np.random.default_rng(ctx.seed)
    for name, obj in (("optimizer", opt), ("critic", critic), ("critic_optimizer", critic_opt),
                      ("kl_controller", kl_ctl), ("prompt_rng", rng), ("ptx_generator", ptx and ptx.generator)):
        if obj is not None:
            ctx.track(name, obj)
    n_prompts = len(task.prompts("train"))
    policy.train()
    critic.train()
    for it in ctx.iterations(cfg.iterations):
        # 1) rollout through the environment; rewards with the current KL coefficient
        r = collect(ctx, env, policy, draw_prompts(rng, n_prompts, cfg.batch_prompts))
        mask = r.response_mask
        rewards = per_token_rewards(r.logprobs, r.ref_logprobs, r.scores, mask, kl_ctl.value, cfg.kl_estimator)
        # 2) values, GAE, whitening
        with torch.no_grad(), ctx.phase("train"):
            old_values = token_values(critic, r.input_ids, r.attention_mask, r.prompt_width)  # (B, T)
            adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, mask)
        # 3) epochs of minibatches: clipped policy loss (+ ptx), clipped value loss
        stats: dict[str, list[float]] = {}
        B = mask.shape[0]
        with ctx.phase("train"):
            for _ in range(cfg.epochs):
                perm = torch.randperm(B, generator=ctx.generator, device=ctx.device)
                for rows in perm.chunk(cfg.minibatches):
                    mb = r.select(rows)
                    loss, pl, ptx_loss = policy_step(ctx, cfg, policy, mb, adv[rows], ptx)
                    optimizer_step(loss, opt, cfg.max_grad_norm, "policy loss" + (" (with ptx)" if ptx else ""))
                    values = token_values(critic, mb.input_ids, mb.attention_mask, mb.prompt_width)
                    vf_loss, vf_clipfrac = clipped_value_loss(values, old_values[rows], returns[rows],
                                                              mb.response_mask, cfg.value_clip)
                    optimizer_step(vf_loss, critic_opt, cfg.max_grad_norm, "value loss")
                    for k, v in (("policy_loss", pl.loss), ("clipfrac", pl.clipfrac), ("approx_kl", pl.approx_kl),
                                 ("ratio", pl.ratio_mean), ("value_loss", vf_loss), ("value_clipfrac", vf_clipfrac),
                                 ("ptx_loss", ptx_loss)):
                        if v is not None:
                            stats.setdefault(k, []).append(float(v.detach()))
                    ctx.counters["trained_tokens"] += int(mb.attention_mask.sum())
        # 4) KL controller and logging
        seq_kl = float(masked_sum(r.logprobs - r.ref_logprobs, mask, dim=-1).mean())
        beta = kl_ctl.value
        kl_ctl.update(seq_kl, B)
        ctx.log(it, {"score": float(r.scores.mean()), "kl": seq_kl, "beta": beta,
                     "return": float(rewards.sum(-1).mean()), "response_length": float(mask.sum(-1).float().mean()),
                     "advantage_std": float(masked_mean(adv.square(), mask).sqrt()),
                     **{k: sum(v) / len(v) for k, v in stats.items()}})
    return ModelPolicy(policy)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("ppo", PPOConfig, train, "PPO with a KL penalty to the SFT policy (InstructGPT, Ziegler et al.)."))
    register(Algorithm("ppo-ptx", PPOPtxConfig, train, "PPO plus gamma-weighted pretraining log-likelihood (InstructGPT)."))
