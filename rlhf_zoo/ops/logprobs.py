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
    prompt (B, P), response (B, T) -> (B, T). Sum them for log pi(y|x) (DPO), average for RRHF's score.

    The forward runs on packed rows: each row's prompt and response tokens moved to the front, so the
    width is the longest prompt + response of the batch, not the longest prompt plus the longest
    response (rows where both are long are rare: about a fifth fewer positions on ``sentiment``). Every
    token keeps its position id, so the log-probs are those of the padded layout."""
    ids, mask, _ = pack_rows(torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1))
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    lp = logprobs_from_logits(out.logits[:, :-1], ids[:, 1:], temperature, suppress_ids)  # (B, L - 1)
    # response token j of row b sits at packed column prompt_len[b] + j; its log-prob is column - 1 of lp
    prompt_len = prompt_mask.sum(-1, keepdim=True)  # (B, 1)
    T = response_ids.shape[1]
    cols = (prompt_len - 1 + torch.arange(T, device=ids.device)).clamp(0, lp.shape[1] - 1)  # (B, T)
    return torch.where(response_mask.bool(), lp.gather(1, cols), torch.zeros((), device=lp.device))


def pack_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a left-padded block followed by a right-padded block (``[prompt | response]``): move each
    row's real tokens, which are contiguous, to the front and trim the columns that are padding in every
    row.  (B, L) -> (B, L'), (B, L'), and the (B,) number of leading pads each row had."""
    L = ids.shape[1]
    start = (mask.long().cumsum(-1) == 0).sum(-1)  # leading padding of each row
    cols = (torch.arange(L, device=ids.device) + start[:, None]) % L  # (B, L): rotate each row left by start
    packed_mask = mask.gather(1, cols)
    if not torch.equal(packed_mask.long().cumprod(-1), packed_mask.long()):
        raise ValueError("pack_rows: each row's real tokens must be contiguous (left padding, then the "
                         "tokens, then right padding)")
    width = int(packed_mask.sum(-1).max()) if len(ids) else 0
    return ids.gather(1, cols)[:, :width], packed_mask[:, :width], start
