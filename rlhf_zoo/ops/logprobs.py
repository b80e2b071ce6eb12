"""Log-probabilities of tokens under a causal LM, with temperature and suppressed tokens.

Sampling and training must agree exactly: both go through `logprobs_from_logits`, so the log-prob
recorded while sampling equals the trainer's forward at the same temperature. Token ids that are never
valid actions (bos, unk, and pad when pad != eos) are suppressed (logit -inf) in both.

Chunked log-probs (issue 15). The naive computation materialises the (B, L, V) logits, their fp32 copy,
the temperature-scaled copy and the log-softmax: several times B x L x V x 4 bytes, which at a 150k
vocabulary is gigabytes for a batch that the model itself handles in megabytes. For the transformers
causal LMs whose head is a plain ``lm_head(last_hidden_state)`` (`lm_parts`), `response_logprobs`,
`sequence_logprobs` and `shifted_logprobs` instead run the decoder, gather the hidden states at the
positions whose log-probs are needed, and compute them with `chunked_token_logprobs`: a
``torch.autograd.Function`` over chunks of rows (tokens) that holds one (chunk, V) block of logits at a
time in the forward and recomputes it in the backward. The arithmetic is `adjust_logits`' (fp32 cast,
temperature, suppressed ids at -inf) then log-softmax, so both paths agree to float rounding. Which path
runs: `logprob_strategy` / ``$RLHF_ZOO_LOGPROBS`` (``auto``, the default: chunked when the naive logits
would exceed `CHUNK_BYTES`, the head on the needed positions in one plain forward when its work over all
positions passes `GATHER_MIN_FLOPS`, naive otherwise; ``naive``; ``chunked``); a model that `lm_parts` does
not recognise always takes the naive path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

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
        (B, T) log-probs of response tokens (values at padded positions are meaningless: mask them; the
        chunked path leaves them 0).
    """
    position_ids = position_ids_from_mask(attention_mask)
    parts = _plan(model, *input_ids.shape)
    if parts is not None:
        hidden = parts.hidden(input_ids, attention_mask, position_ids)  # (B, P + T, H)
        rows, j = attention_mask[:, response_start:].bool().nonzero(as_tuple=True)  # the real response tokens
        lp = _logprobs_at(parts, hidden, input_ids, rows, response_start - 1 + j, temperature, suppress_ids)
        return hidden.new_zeros(input_ids.shape[0], input_ids.shape[1] - response_start,
                                dtype=torch.float32).index_put((rows, j), lp)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
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
    token keeps its position id, so the log-probs are those of the padded layout. Above a size (see the
    module's docstring) the log-probs of the response tokens alone are computed, in chunks."""
    ids, mask, _ = pack_rows(torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1))
    parts = _plan(model, *ids.shape) if ids.shape[1] >= 2 else None
    if parts is not None:
        hidden = parts.hidden(ids, mask, position_ids_from_mask(mask))  # (B, L, H)
        # response token j of row b sits at packed column prompt_len[b] + j, predicted from the column before
        # (clamped as below, so that the two paths agree even on degenerate rows)
        rows, j = response_mask.bool().nonzero(as_tuple=True)
        cols = (prompt_mask.sum(-1)[rows] - 1 + j).clamp(0, ids.shape[1] - 2)
        lp = _logprobs_at(parts, hidden, ids, rows, cols, temperature, suppress_ids)
        return hidden.new_zeros(response_ids.shape, dtype=torch.float32).index_put((rows, j), lp)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    lp = logprobs_from_logits(out.logits[:, :-1], ids[:, 1:], temperature, suppress_ids)  # (B, L - 1)
    # response token j of row b sits at packed column prompt_len[b] + j; its log-prob is column - 1 of lp
    prompt_len = prompt_mask.sum(-1, keepdim=True)  # (B, 1)
    T = response_ids.shape[1]
    cols = (prompt_len - 1 + torch.arange(T, device=ids.device)).clamp(0, lp.shape[1] - 1)  # (B, T)
    return torch.where(response_mask.bool(), lp.gather(1, cols), torch.zeros((), device=lp.device))


def shifted_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     loss_mask: torch.Tensor | None = None, temperature: float = 1.0,
                     suppress_ids: Sequence[int] = ()) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1 .. L-1 of right-padded rows (language-model training).
    (B, L) -> (B, L - 1) fp32. ``loss_mask`` (B, L): the tokens whose log-probs are read (default: the
    attention mask); values elsewhere are meaningless (the chunked path leaves them 0)."""
    position_ids = position_ids_from_mask(attention_mask)
    parts = _plan(model, *input_ids.shape) if input_ids.shape[1] >= 2 else None
    if parts is not None:
        hidden = parts.hidden(input_ids, attention_mask, position_ids)  # (B, L, H)
        wanted = (attention_mask if loss_mask is None else loss_mask)[:, 1:].bool()
        rows, cols = wanted.nonzero(as_tuple=True)
        lp = _logprobs_at(parts, hidden, input_ids, rows, cols, temperature, suppress_ids)
        return hidden.new_zeros(wanted.shape, dtype=torch.float32).index_put((rows, cols), lp)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], temperature, suppress_ids)  # (B, L - 1)


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


# --- chunked log-probs -------------------------------------------------------------------------------------
#: bytes of fp32 logits one chunk may hold (rows per chunk = CHUNK_BYTES // (4 V), at least 1): 64 MiB is
#: 111 rows at V = 150k, 524 at V = 32k; enough rows per chunk that the head's matmuls stay efficient. In
#: ``auto`` mode the chunked path is taken when the naive (B, L, V) fp32 logits would exceed it.
CHUNK_BYTES = 64 * 2**20
#: in ``auto`` mode, a forward whose logits fit in `CHUNK_BYTES` still runs the head on the needed positions
#: only (the response tokens, not the prompt or the padding) once the head's work over every position
#: reaches this many FLOPs: at the realistic shape (32k vocabulary, width 512, 64 + 64 tokens) the head is
#: about 40% of a token's forward and half the positions are prompt, so PPO, DPO and SFT steps save about
#: a fifth of their compute; below it (the built-in tasks' tiny heads) the extra gather would cost more
#: than it saves.
GATHER_MIN_FLOPS = 2**28
MODE_ENV = "RLHF_ZOO_LOGPROBS"
MODES = ("auto", "naive", "chunked")
_override: dict[str, Any] = {}

#: ``config.model_type`` of the transformers causal LMs whose forward is ``logits = lm_head(hidden)`` on
#: the base model's ``last_hidden_state``, nothing after it (read in transformers 5's modeling files).
#: Not here on purpose: gemma2/gemma3 (final_logit_softcapping), cohere (logit_scale), granite
#: (logits_scaling), and anything loaded with remote code.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "gemma", "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "smollm3", "starcoder2",
})
#: config fields that rescale or cap logits after the head in some architectures: set (not None) -> naive
_LOGIT_CHANGING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


@contextlib.contextmanager
def logprob_strategy(mode: str = "auto", chunk_rows: int | None = None) -> Iterator[None]:
    """Choose how log-probs are computed inside the block: ``auto`` (chunked when the naive logits would
    exceed `CHUNK_BYTES`), ``naive`` (always the full logits) or ``chunked`` (always chunks, for every model
    `lm_parts` recognises; others stay naive). ``chunk_rows`` fixes the rows per chunk (tests)."""
    if mode not in MODES:
        raise ValueError(f"logprob strategy {mode!r}; known: {', '.join(MODES)}")
    saved = dict(_override)
    _override.update(mode=mode, chunk_rows=chunk_rows)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def _mode() -> str:
    mode = _override.get("mode") or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise ValueError(f"${MODE_ENV}={mode!r}; known: {', '.join(MODES)}")
    return mode


@dataclass
class LMParts:
    """A causal LM split into its decoder (``trunk``: ids -> last hidden states) and its ``head`` (a plain
    ``nn.Linear``), with the context its forward runs in (the adapter disabled for a LoRA reference)."""

    trunk: torch.nn.Module
    head: torch.nn.Linear
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> last hidden states (B, L, H), what the model's forward feeds its head."""
        with self.context():
            out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
        return out.last_hidden_state


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None))


def lm_parts(model: torch.nn.Module) -> LMParts | None:
    """The decoder and plain linear head of ``model`` when its logits are exactly ``head(decoder(...))``,
    else None (callers then take the naive path, which is always correct).

    Recognised: the transformers causal-LM class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) of a type in
    `PLAIN_HEAD_MODEL_TYPES`, defined in transformers itself (not remote code, not a subclass), with no
    logit-changing config field set, no hooks on it or its head, and a head that is exactly
    ``torch.nn.Linear`` (so not a LoRA-adapted or quantised head); optionally inside a peft LoRA model
    (adapters in the decoder are fine) or the zoo's `rlhf_zoo.adapters.AdapterDisabled` reference."""
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    inner = model
    if type(model).__name__ == "AdapterDisabled" and type(model).__module__ == "rlhf_zoo.adapters":
        peft_model = model._peft
        context = peft_model.disable_adapter
        inner = peft_model
    if type(inner).__module__.startswith("peft."):
        cfg = getattr(inner, "active_peft_config", None)
        if (cfg is None or getattr(cfg, "is_prompt_learning", True) or str(getattr(cfg, "peft_type", "")) not in
                ("LORA", "PeftType.LORA") or getattr(cfg, "alora_invocation_tokens", None) is not None
                or _has_hooks(inner) or _has_hooks(inner.base_model)):
            return None
        inner = inner.get_base_model()
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not isinstance(inner, PreTrainedModel) or _has_hooks(inner):
        return None
    config = inner.config
    model_type = getattr(config, "model_type", None)
    cls = type(inner)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if (model_type not in PLAIN_HEAD_MODEL_TYPES or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) != cls.__name__
            or cls.__module__ != f"transformers.models.{model_type}.modeling_{model_type}"):
        return None
    if any(getattr(config, f, None) is not None for f in _LOGIT_CHANGING_FIELDS):
        return None
    head, trunk = inner.get_output_embeddings(), inner.base_model
    if (type(head) is not torch.nn.Linear or _has_hooks(head) or trunk is inner
            or not isinstance(trunk, torch.nn.Module)):
        return None
    return LMParts(trunk, head, context)


def _plan(model: torch.nn.Module, rows: int, width: int) -> LMParts | None:
    """The parts to compute chunked log-probs with for a (rows, width) forward, or None for the naive path."""
    mode = _mode()
    if mode == "naive":
        return None
    parts = lm_parts(model)
    if parts is None:
        return None
    head_flops = 2 * rows * width * parts.head.weight.shape[1] * parts.vocab_size  # the naive path's head
    if mode == "auto" and rows * width * parts.vocab_size * 4 <= CHUNK_BYTES and head_flops < GATHER_MIN_FLOPS:
        return None
    return parts


def _chunk_rows(vocab_size: int) -> int:
    return _override.get("chunk_rows") or max(1, CHUNK_BYTES // (4 * vocab_size))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (as in the naive forward), else the
    weight's."""
    from rlhf_zoo.accel import autocast_dtype  # (lazy: accel imports rlhf_zoo.ops)

    return autocast_dtype(hidden.device.type) or weight.dtype


def _adjusted_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                    temperature: float, suppress: torch.Tensor | None) -> torch.Tensor:
    """`adjust_logits` of one chunk's logits: (C, H) -> (C, V) fp32, a tensor this function owns."""
    logits = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    z = logits.float() if logits.dtype != torch.float32 else logits
    z.div_(temperature)
    if suppress is not None:
        z.index_fill_(-1, suppress, float("-inf"))
    return z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(adjust_logits(h W^T + b))[target] per row, one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, suppress, chunk_rows, dtype):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, hidden.shape[0], chunk_rows):
                hi = lo + chunk_rows
                z = _adjusted_chunk(hidden[lo:hi], weight, bias, dtype, temperature, suppress)
                out[lo:hi] = torch.log_softmax(z, -1).gather(-1, targets[lo:hi, None]).squeeze(-1)
                del z
        ctx.save_for_backward(hidden, weight, bias, targets, suppress)
        ctx.temperature, ctx.chunk_rows, ctx.dtype = temperature, chunk_rows, dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, suppress = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtype, temperature = ctx.dtype, ctx.temperature
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, hidden.shape[0], ctx.chunk_rows):
                hi = lo + ctx.chunk_rows
                h, g = hidden[lo:hi], grad_out[lo:hi].float()
                z = _adjusted_chunk(h, weight, bias, dtype, temperature, suppress)
                # d logp[t] / dz = onehot(t) - softmax(z); then back through index_fill (suppressed columns
                # get no gradient), the division by the temperature and the fp32 cast
                dz = torch.softmax(z, -1)
                del z
                dz.mul_(-g[:, None]).scatter_add_(-1, targets[lo:hi, None], g[:, None])
                if suppress is not None:
                    dz.index_fill_(-1, suppress, 0.0)
                dz.div_(temperature)
                if want_b:
                    grad_b.add_(dz.sum(0))
                dl = dz.to(dtype)
                del dz
                if want_h:
                    grad_h[lo:hi] = (dl @ w).to(hidden.dtype)
                if want_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(dl.t(), h.to(dtype))
                    else:
                        grad_w.add_(dl.t() @ h.to(dtype))
                del dl
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, temperature: float = 1.0, suppress_ids: Sequence[int] = (),
                           chunk_rows: int | None = None) -> torch.Tensor:
    """``logprobs_from_logits(F.linear(hidden, weight, bias), targets, temperature, suppress_ids)`` without
    the (N, V) logits: at most ``chunk_rows`` rows of them exist at a time, in the forward and in the
    backward (which recomputes them). Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) -> (N,) fp32."""
    suppress = (torch.as_tensor(list(suppress_ids), dtype=torch.long, device=hidden.device)
                if len(suppress_ids) else None)
    rows = chunk_rows or _chunk_rows(weight.shape[0])
    dtype = _compute_dtype(hidden, weight)
    return _ChunkedTokenLogprobs.apply(hidden, weight, bias, targets, float(temperature), suppress, rows, dtype)


def _logprobs_at(parts: LMParts, hidden: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 temperature: float, suppress_ids: Sequence[int]) -> torch.Tensor:
    """log p(ids[rows, cols + 1] | hidden[rows, cols]) for each selected position.  -> (N,) fp32

    The head runs on the selected positions only: in chunks (`chunked_token_logprobs`) when their
    logits would exceed `CHUNK_BYTES` or the mode is ``chunked``, else in one plain differentiable
    forward (nothing recomputed in the backward)."""
    h, targets = hidden[rows, cols], ids[rows, cols + 1]
    if _mode() != "chunked" and h.shape[0] * parts.vocab_size * 4 <= CHUNK_BYTES:
        with parts.context():
            logits = parts.head(h)
        return logprobs_from_logits(logits, targets, temperature, suppress_ids)
    return chunked_token_logprobs(h, parts.head.weight, parts.head.bias, targets, temperature, suppress_ids)
