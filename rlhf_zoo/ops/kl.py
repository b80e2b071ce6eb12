"""Per-token KL estimators between the policy and the reference (Schulman, "Approximating KL", 2020).

With log-ratio d = logprob - ref_logprob on tokens sampled from the policy:
  k1 = d                    unbiased, can be negative per token
  k2 = d^2 / 2              biased, low variance, always >= 0
  k3 = (exp(-d) - 1) + d    unbiased, always >= 0
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    Args:
        logprobs: log pi(y_t | ...) of the POLICY that sampled the tokens (any shape).
        ref_logprobs: log pi_ref(y_t | ...) of the REFERENCE at the same tokens (same shape).
        estimator: ``k1`` (the log-ratio d), ``k2`` (d^2 / 2) or ``k3`` ((exp(-d) - 1) + d, unbiased and
            never negative); see the module docstring.

    Returns:
        the estimate per token, same shape (mask it: padded positions are not meaningful). The
        sequence KL is its sum over the response's tokens.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k2, k3")
