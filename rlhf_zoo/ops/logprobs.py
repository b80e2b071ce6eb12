"""Log-probabilities of tokens under a causal LM, with temperature and suppressed tokens.

Sampling and training must agree exactly: both go through `logprobs_from_logits`, so the log-prob
recorded while sampling equals the trainer's forward at the same temperature. Token ids that are never
valid actions (bos, unk, and pad when pad != eos) are suppressed (logit -inf) in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_zoo.ops.masking import position_ids_from_mask


def adjust_logits(logits: torch.Tensor, temperature: float = 1.0, suppress_ids: Sequence[int] = ()) -> torch.Tensor:
    """Temperature-scale logits (computed in fp32) and set suppressed ids to -inf.  (..., V) -> (..., V)

    The cast comes first: under bf16 autocast the logits arrive in bf16, and a log-softmax of bf16 input
    stays bf16 (autocast does not promote it on CPU), so without it log-probs, ratios and KL would carry
    bf16's 8-bit mantissa."""
    logits = logits.float() / temperature
    if len(suppress_ids):
        logits = logits.index_fill(-1, torch.as_tensor(list(suppress_ids), device=logits.device), float("-inf"))
    return logits


def logprobs_from_logits(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, suppress_ids: Sequence[int] = ()
) -> torch.Tensor:
    """log softmax(logits / temperature)[ids].  logits (B, T, V), ids (B, T) -> (B, T) in fp32."""
    logp = torch.log_softmax(adjust_logits(logits, temperature, suppress_ids), dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    suppress_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Per-token log-probs of the response part of ``[prompt | response]`` rows.

    Args:
        input_ids: (B, P + T) prompt left-padded to P, then the response right-padded to T.
        attention_mask: (B, P + T), 1 on real tokens.
        response_start: P, the column where responses begin.

    Returns:
        (B, T) log-probs of response tokens (values at padded positions are meaningless: mask them).
    """
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    )
    logits = out.logits[:, response_start - 1 : -1]  # (B, T, V): position t predicts token t + 1
    return logprobs_from_logits(logits, input_ids[:, response_start:], temperature, suppress_ids)


def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    suppress_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Per-token log-probs of right-padded responses after left-padded prompts, 0 off the mask.
    prompt (B, P), response (B, T) -> (B, T). Sum them for log pi(y|x) (DPO), average for RRHF's score."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    lp = sequence_logprobs(model, ids, mask, prompt_ids.shape[1], temperature, suppress_ids)
    return torch.where(response_mask.bool(), lp, torch.zeros_like(lp))
