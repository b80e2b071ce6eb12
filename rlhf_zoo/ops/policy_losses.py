"""Clipped PPO losses (Schulman et al. 2017, Eq. 7) and their diagnostics. Mask: True = token counts."""

from __future__ import annotations

from dataclasses import dataclass

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
    normalizer: torch.Tensor | float | None = None,
) -> PolicyLoss:
    """L = -E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)],  rho = exp(logprobs - old_logprobs).  (B, T) inputs.

    E is the mean over counted tokens; with ``normalizer``, their sum divided by it (this shard's part of
    a larger batch's mean, `rlhf_zoo.distributed`). The statistics are always means over these tokens."""
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = _reduce(torch.maximum(unclipped, clipped), mask, normalizer)
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
