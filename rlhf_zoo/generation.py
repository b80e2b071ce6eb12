"""Batched sampling with a KV cache: the agent's side of a rollout.

One forward over the (left-padded) prompts fills the cache, then one single-token forward per step.
Log-probs are recorded with `logprobs_from_logits`, the same function trainers use, so they match a
later forward at the same temperature. Rows that have produced EOS keep emitting pad with mask 0.

Under autocast (bf16 on CUDA, `rlhf_zoo.accel.autocast`) the loop casts the trainable weights once per
call (`rlhf_zoo.accel.cached_weight_casts`) instead of once per step; log-probs stay fp32.

KV cache (issue 15 item 4): ``cache=`` / ``$RLHF_ZOO_KV_CACHE`` chooses `rlhf_zoo.ops.kv_cache.KV_CACHES`:
``dynamic`` (the default: a `transformers.DynamicCache` and a growing mask), ``static`` (a
`transformers.StaticCache` of prompt + max_new_tokens positions with a full-length attention mask and
per-row positions for the left-padded prompts) or ``compiled`` (static, and the decode step
``torch.compile``'d: CUDA graphs on CUDA). Static and compiled sample the same tokens with the same
log-probs up to float rounding (tests/test_generation_static.py); the default stays dynamic until
`benchmarks/decode_speed.py` (CPU) and `benchmarks/gpu_bench.py` (CUDA) measure the static paths faster on
a quiet machine. The static paths are validated on CPU only: compiled-on-CUDA (CUDA graphs, under bf16
autocast) has not been run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from rlhf_zoo.accel import cached_weight_casts
from rlhf_zoo.ops.kv_cache import IncrementalDecoder, kv_cache_mode
from rlhf_zoo.ops.logprobs import adjust_logits


@dataclass
class Samples:
    """Responses for a batch of prompts.  All tensors (B, T) except ``finished`` (B,)."""

    response_ids: torch.Tensor
    response_mask: torch.Tensor  # 1 on real response tokens, EOS included
    logprobs: torch.Tensor  # 0 where the mask is 0
    finished: torch.Tensor  # True where the row produced EOS

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    suppress_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    cache: str | None = None,
) -> Samples:
    """Sample one response per (left-padded) prompt row.  prompt_ids, prompt_mask: (B, P).

    ``on_token(tokens, logprobs)`` is called after each step with the (B,) sampled tokens and their
    log-probs (rows already finished get pad and 0): this is how an agent drives the per-token
    environment, one ``env.step`` per decoding step.

    ``cache``: ``dynamic``, ``static`` or ``compiled`` (`rlhf_zoo.ops.kv_cache.kv_cache_mode`; default:
    ``$RLHF_ZOO_KV_CACHE``, else dynamic).
    """
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    mode = kv_cache_mode(cache)
    with cached_weight_casts(device.type):  # under autocast: cast the weights once, not every step
        decoder = IncrementalDecoder(model, prompt_ids, prompt_mask, max_new_tokens, mode)
        next_logits = decoder.prefill()  # (B, V)
        ids = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
        logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            logp = torch.log_softmax(adjust_logits(next_logits, temperature, suppress_ids), dim=-1)  # (B, V)
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # (B,)
            alive = ~finished
            ids[:, t] = torch.where(alive, token, pad_token_id)
            mask[:, t] = alive.long()
            logprobs[:, t] = torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0)
            if on_token is not None:
                on_token(ids[:, t], logprobs[:, t])
            finished = finished | (alive & (token == eos_token_id))
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            next_logits = decoder.step(ids[:, t], mask[:, t])
    return Samples(ids, mask, logprobs, finished)


def generation_config(world: Any, temperature: float, max_new_tokens: int) -> GenerationConfig:
    """The `GenerationConfig` under which a plain ``model.generate(**inputs)`` samples from the
    distribution `sample` draws from in ``world``: softmax(logits / temperature) with the world's
    ``suppress_ids`` at -inf (``suppress_tokens``, the same mask), no other processor or warper
    (``top_k=0``: transformers would otherwise keep the 50 likeliest tokens), up to ``max_new_tokens``,
    stopping at EOS and padding after it. `rlhf_zoo.runner.save_model` saves it with every policy, so
    whoever loads one samples as the zoo did (with the tokenizer of `World.tokenizer_for_saving`)."""
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=max_new_tokens, suppress_tokens=list(world.suppress_ids) or None,
                            eos_token_id=world.eos_token_id, pad_token_id=world.pad_token_id,
                            bos_token_id=world.tokenizer.bos_token_id)
