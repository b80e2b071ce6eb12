"""The KL-shaped per-token reward of RLHF (Ziegler et al. 2019; InstructGPT Eq. 2).

    r_t = -beta * kl(logprob_t, ref_logprob_t)            for every response token t
    r_T += score(x, y) - missing_eos_penalty * [no EOS]   on the last real token T

Both environments and every algorithm compute rewards with this one function.
"""

from __future__ import annotations

import torch

from rlhf_zoo.ops.kl import KLEstimator, kl_penalty
from rlhf_zoo.ops.masking import last_true_index


def per_token_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """Per-token rewards.  logprobs, ref_logprobs, response_mask (B, T); scores (B,) -> (B, T).

    ``scores`` already include any missing-EOS penalty. A row with an empty response has no token to
    carry its score; its rewards are all 0 (the score is reported separately).
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, -beta * kl_penalty(logprobs.float(), ref_logprobs.float(), estimator), 0.0)
    last = last_true_index(mask)  # (B,)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] += scores.float()[rows]
    return rewards


LLAMA2_SAFETY_THRESHOLD = 0.15  # Llama 2, sec. 3.2.2


def llama2_combine(
    helpful: torch.Tensor, safety: torch.Tensor, is_safety_prompt: torch.Tensor,
    threshold: float = LLAMA2_SAFETY_THRESHOLD,
) -> torch.Tensor:
    """Llama 2's combination of a helpfulness and a safety reward model (Touvron et al. 2023, sec. 3.2.2):

        R_c = R_s  if IS_SAFETY(prompt) or R_s < threshold  else R_h,      then  logit(R_c)

    where R = sigmoid(score). Since logit(sigmoid(s)) = s, this returns the chosen raw score; whitening
    the result is left to the caller.  helpful, safety (B,) raw scores; is_safety_prompt (B,) bool -> (B,)
    """
    use_safety = is_safety_prompt.bool() | (torch.sigmoid(safety) < threshold)
    return torch.where(use_safety, safety, helpful)
