"""Shared math, one topic per module. Mask convention everywhere: True (or 1) = the token counts."""

from rlhf_zoo.ops.kl import kl_penalty
from rlhf_zoo.ops.logprobs import logprobs_from_logits, response_logprobs, sequence_logprobs
from rlhf_zoo.ops.masking import last_true_index, masked_mean, masked_sum, position_ids_from_mask
from rlhf_zoo.ops.rewards import per_token_rewards

__all__ = [
    "kl_penalty",
    "last_true_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "per_token_rewards",
    "response_logprobs",
    "position_ids_from_mask",
    "sequence_logprobs",
]
