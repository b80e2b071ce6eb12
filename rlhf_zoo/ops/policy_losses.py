"""Clipped PPO losses (Schulman et al. 2017, Eq. 7) and their diagnostics. Mask: True = token counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhf_zoo.ops.masking import masked_mean, masked_sum


@dataclass
class PolicyLoss:
    """What `clipped_policy_loss` returns: the loss (with grad) and detached diagnostics (scalars)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction of tokens where the clipped term was active
    approx_kl: torch.Tensor  # k3 estimate of KL(old || new) over the minibatch
    ratio_mean: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float,
    normalizer: torch.Tensor | float | None = None, weights: torch.Tensor | None = None,
) -> PolicyLoss:
    """L = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)],  rho = exp(logprobs - old_logprobs).  (B, T) inputs.

    E is the mean over counted tokens; with ``normalizer``, their sum divided by it (this shard's part of
    a larger batch's mean, `rlhf_zoo.distributed`). ``weights`` (B, T) multiply each token's term before
    that reduction (GRPO's 1/|y_i|: a mean per sequence). The statistics are always means over these tokens."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = _reduce(per_token if weights is None else per_token * weights, mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLoss(loss, clipfrac, approx_kl, ratio_mean)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 E[max((V - R)^2, (clip(V, V_old +- eps) - R)^2)] (the PPO2 value clip). -> (loss, clipfrac)
    ``normalizer``: as in `clipped_policy_loss`."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns).square()
    err_clipped = (v_clipped - returns).square()
    loss = 0.5 * _reduce(torch.maximum(err, err_clipped), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, clipfrac


def _reduce(x: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | float | None) -> torch.Tensor:
    return masked_mean(x, mask) if normalizer is None else masked_sum(x, mask) / normalizer


SequenceAggregation = Literal["sum", "mean", "constant"]


def sequence_aggregation_weights(mask: torch.Tensor, aggregation: SequenceAggregation,
                                 max_len: int | None = None) -> torch.Tensor:
    """Per-token weights w that turn a sum over tokens into a per-sequence aggregate; divided by the
    number of sequences N (``normalizer`` of `clipped_policy_loss`), the loss sum_i sum_t w_it l_it / N is

        sum       1/N sum_i sum_t l_it                 REINFORCE on the whole sequence (RLOO)
        mean      1/N sum_i 1/|y_i| sum_t l_it         GRPO (Shao et al. 2024, Eq. 3)
        constant  1/N sum_i 1/max_len sum_t l_it       Dr. GRPO (Liu et al. 2025): no length bias

    GRPO's 1/|y_i| lowers the per-token weight of long responses, so a long wrong answer is penalised
    less than a short one; Dr. GRPO divides by the same constant for every response.
    mask (B, T) -> (B, T), 0 off the mask; an empty response has no token and contributes nothing."""
    m = mask.float()
    if aggregation == "sum":
        return m
    if aggregation == "mean":
        return m / m.sum(-1, keepdim=True).clamp(min=1.0)
    if aggregation == "constant":
        if not max_len or max_len < 1:
            raise ValueError(f"the constant aggregation needs max_len >= 1, got {max_len!r}")
        return m / max_len
    raise ValueError(f"unknown sequence aggregation {aggregation!r}; known: sum, mean, constant")
