"""Batched sampling with a KV cache: the agent's side of a rollout.

One forward over the (left-padded) prompts fills the cache, then one single-token forward per step.
Log-probs are recorded with `logprobs_from_logits`, the same function trainers use, so they match a
later forward at the same temperature. Rows that have produced EOS keep emitting pad with mask 0.

Under autocast (bf16 on CUDA, `rlhf_zoo.accel.autocast`) the loop casts the trainable weights once per
call (`rlhf_zoo.accel.cached_weight_casts`) instead of once per step; log-probs stay fp32.

Not done: a static KV cache with CUDA graphs (torch.compile "reduce-overhead"). It needs full-length
attention masks and explicit cache positions for left-padded prompts, one graph per (batch, length)
shape, and a GPU to validate; `benchmarks/gpu_bench.py` measures transformers' own static-cache
``generate`` on CUDA next to this loop, which tells whether it would pay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig

from rlhf_zoo.accel import cached_weight_casts
from rlhf_zoo.ops.kv_cache import cached_forward
from rlhf_zoo.ops.logprobs import adjust_logits
from rlhf_zoo.ops.masking import position_ids_from_mask


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
) -> Samples:
    """Sample one response per (left-padded) prompt row.  prompt_ids, prompt_mask: (B, P).

    ``on_token(tokens, logprobs)`` is called after each step with the (B,) sampled tokens and their
    log-probs (rows already finished get pad and 0): this is how an agent drives the per-token
    environment, one ``env.step`` per decoding step.
    """
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    with cached_weight_casts(device.type):  # under autocast: cast the weights once, not every step
        cache = DynamicCache()
        attn = prompt_mask.long()
        next_logits = cached_forward(model, input_ids=prompt_ids, attention_mask=attn,
                                     position_ids=position_ids_from_mask(attn), cache=cache)[:, -1]  # (B, V)
        next_pos = attn.sum(-1, keepdim=True)  # (B, 1): position of the first response token
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
            attn = torch.cat([attn, mask[:, t : t + 1]], dim=1)
            next_logits = cached_forward(model, input_ids=ids[:, t : t + 1], attention_mask=attn,
                                         position_ids=next_pos, cache=cache)[:, -1]
            next_pos = next_pos + 1
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
