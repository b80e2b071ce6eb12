"""Advantages and returns for token-level RL, whitening, and the group baselines of the critic-free
methods (RLOO, GRPO) over K responses per prompt.

Time semantics: index t is the t-th response token; ``values[t]`` = V(s_t), the value of the state
before emitting token t; ``rewards[t]`` = r_t, the reward for emitting it. Positions where ``mask`` is 0
(after the end of the response) are outside the episode: V = 0 there and nothing is bootstrapped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_zoo.ops.masking import masked_mean, masked_sum


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16).

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = sum_l (gamma lam)^l delta_{t+l}

    V(s_{T}) = 0 after the last real token (episodes end at EOS or are cut at the cap; the cut is
    treated as terminal, as InstructGPT-style implementations do). lam = 0 gives the TD error;
    gamma = lam = 1 gives reward-to-go minus V(s_t).

    Args:
        rewards, values, mask: (B, T).
    Returns:
        advantages, returns = advantages + values; both (B, T), 0 where the mask is 0.
    """
    m = mask.to(rewards.dtype)
    values = values * m
    rewards = rewards * m
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise ``x`` to unit variance over the counted entries (and zero mean when ``shift_mean``);
    entries off the mask are returned as 0. With fewer than 2 counted entries, only centre.

    ``all_reduce`` (a sum over processes, e.g. ``ctx.dist.sum``) takes the mean and variance over the
    counted entries of every process's shard, so a sharded batch is whitened as the whole batch."""
    if all_reduce is None:
        mean, n = masked_mean(x, mask), mask.sum()
    else:
        total, n = all_reduce(torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)]))
        mean = total / n.clamp(min=1)
    centred = torch.where(mask.bool(), x - mean, torch.zeros_like(x))
    if n < 2:
        return centred if shift_mean else torch.where(mask.bool(), x, torch.zeros_like(x))
    squares = centred.square().sum()
    var = (squares if all_reduce is None else all_reduce(squares)) / (n - 1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = torch.where(mask.bool(), out + mean, out)
    return out


def rloo_advantages(returns: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, RLOO).

        A_i = R_i - 1/(K-1) sum_{j != i} R_j         (the baseline excludes the sample itself)

    so the baseline does not depend on y_i and the policy gradient stays unbiased. Equal to
    K/(K-1) (R_i - mean_j R_j).

    Args:
        returns: (B, K) the returns of K responses to each of B prompts (one prompt per row).
    Returns:
        (B, K) advantages; each row sums to 0.
    """
    K = returns.shape[-1]
    if K < 2:
        raise ValueError(f"the leave-one-out baseline needs K >= 2 responses per prompt, got K={K}")
    return returns - (returns.sum(-1, keepdim=True) - returns) / (K - 1)


def group_advantages(scores: torch.Tensor, normalize_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome-supervised advantages (Shao et al. 2024, DeepSeekMath sec. 4.1.2):

        A_i = (r_i - mean(r)) / (std(r) + eps)     over the K responses to the same prompt

    with the unbiased (K - 1) standard deviation, as TRL's GRPOTrainer; ``normalize_std=False`` gives
    Dr. GRPO's r_i - mean(r) (Liu et al. 2025: dividing by the group's std up-weights prompts that are
    too easy or too hard). A group of equal rewards gets exactly 0, and so does a group of one.

    Args:
        scores: (B, K) rewards of K responses to each of B prompts.
    Returns:
        (B, K) advantages (broadcast them to every token of the response).
    """
    # a group of equal rewards is exactly 0: (r - mean) can round to ~1e-8, which / (0 + eps) would inflate
    tied = scores.amax(-1, keepdim=True) == scores.amin(-1, keepdim=True)
    centred = torch.where(tied, torch.zeros_like(scores), scores - scores.mean(-1, keepdim=True))
    if not normalize_std or scores.shape[-1] < 2:
        return centred
    return centred / (scores.std(-1, keepdim=True) + eps)
