"""``reinforce``: REINFORCE with a KL-shaped reward and a leave-one-out baseline (RLOO).

Papers: Williams 1992 (REINFORCE); Kool et al. 2019 (the leave-one-out baseline: "Buy 4 REINFORCE
samples, get a baseline for free!"); Ahmadian et al. 2024 ("Back to Basics": RLOO for RLHF).

Each iteration samples k responses y_1..y_k from the current policy for each of n prompts x. A response's
return is the KL-shaped reward of RLHF summed over its tokens (`rlhf_zoo.ops.per_token_rewards`):

    R_i = r(x, y_i) - beta * sum_t [log pi(y_i,t | x, y_i,<t) - log pi_ref(y_i,t | x, y_i,<t)]

Its baseline is the mean return of the other k - 1 responses to the same prompt (``baseline="loo"``,
RLOO), or the mean over the whole batch (``baseline="mean"``). With A_i = R_i - b_i the loss is

    L = -1/(n k) sum_i A_i log pi(y_i | x)

one AdamW step per batch: REINFORCE is on-policy, so every batch is sampled from the policy it updates.
The leave-one-out baseline does not depend on y_i, so the gradient stays unbiased, and it needs no critic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from rlhf_zoo import AlgoConfig, Algorithm, ConfigError, ModelPolicy, check_positive, hookimpl, option
from rlhf_zoo.ops import masked_sum, per_token_rewards, response_logprobs
from rlhf_zoo.rollout import collect, draw_prompts
from rlhf_zoo.training import optimizer_step

if TYPE_CHECKING:
    from rlhf_zoo import RunContext

__version__ = "0.1.0"


@dataclass(frozen=True)
class ReinforceConfig(AlgoConfig):
    presets = {
        "quick": {"iterations": 400, "learning_rate": 2e-3, "eval_prompts": 64, "eval_samples": 2},
        "smoke": {"iterations": 2, "prompts_per_iteration": 2, "k": 2, "eval_prompts": 2, "eval_samples": 1},
    }
    kl_coefficient = "beta"  # ctx.beta and the evaluation's pi*_beta read this field

    iterations: int = option(1500, "Sample-and-update iterations (one gradient step each).")
    prompts_per_iteration: int = option(16, "Prompts per iteration; each gets k responses.")
    k: int = option(4, "Responses sampled per prompt (the leave-one-out baseline needs k >= 2).")
    baseline: Literal["loo", "mean"] = option(
        "loo", "loo: a response's baseline is the mean return of the other k - 1 responses to its prompt "
               "(RLOO); mean: the mean return of the batch.")
    learning_rate: float = option(1e-3, "AdamW learning rate (constant).")
    beta: float | None = option(None, "KL coefficient of the reward; default: the task's.")
    max_grad_norm: float = option(1.0, "Gradient-norm clip.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "iterations", "prompts_per_iteration", "k", "learning_rate", "max_grad_norm")
        if self.baseline == "loo" and self.k < 2:
            raise ConfigError(f"baseline 'loo' needs k >= 2 responses per prompt, got k={self.k}")
        if self.beta is not None and self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")


def leave_one_out_baseline(returns: torch.Tensor, k: int) -> torch.Tensor:
    """The mean return of the other k - 1 responses to the same prompt.
    returns (n * k,), the k rows of a prompt adjacent -> (n * k,)"""
    grouped = returns.view(-1, k)
    return ((grouped.sum(-1, keepdim=True) - grouped) / (k - 1)).view(-1)


def train(ctx: RunContext, cfg: ReinforceConfig) -> ModelPolicy:
    task, policy = ctx.task, ctx.policy
    n, k = cfg.prompts_per_iteration, cfg.k
    env = ctx.make_env(n * k)  # ResponseGen vector env: reference log-probs and reward in one call
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    # everything the loop carries is tracked, so checkpoints and --resume restore it exactly
    ctx.track("optimizer", opt)
    rng = ctx.track("prompt_rng", np.random.default_rng(ctx.seed))
    n_prompts = len(task.prompts("train"))
    policy.train()
    for it in ctx.iterations(cfg.iterations):
        # 1) k responses per prompt from the current policy, scored by the environment
        r = collect(ctx, env, policy, draw_prompts(rng, n_prompts, n, k))
        # 2) KL-shaped returns and the baseline
        returns = per_token_rewards(r.logprobs, r.ref_logprobs, r.scores, r.response_mask, ctx.beta).sum(-1)
        if cfg.baseline == "loo":
            baseline = leave_one_out_baseline(returns, k)
        else:
            baseline = returns.mean().expand_as(returns)
        advantages = returns - baseline
        # 3) one policy-gradient step
        with ctx.phase("train"):
            logprobs = response_logprobs(policy, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                                         cfg.temperature, task.suppress_ids)
            loss = -(advantages * masked_sum(logprobs, r.response_mask, dim=-1)).mean()
            grad_norm = optimizer_step(loss, opt, cfg.max_grad_norm, "reinforce loss")
        ctx.counters["trained_tokens"] += int(r.attention_mask.sum())
        kl = masked_sum(r.logprobs - r.ref_logprobs, r.response_mask, dim=-1)
        ctx.log(it, {"score": r.scores.mean(), "kl": kl.mean(), "return": returns.mean(),
                     "advantage_std": advantages.square().mean().sqrt(), "loss": loss.detach(),
                     "grad_norm": grad_norm, "response_length": r.response_mask.sum(-1).float().mean()})
    env.close()
    return ModelPolicy(policy)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("reinforce", ReinforceConfig, train,
                       "REINFORCE with a KL-shaped reward and a leave-one-out baseline (RLOO)."))
