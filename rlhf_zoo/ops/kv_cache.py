"""Forwards with a KV cache, written once for every transformers version the project supports.

transformers 5.24 renamed the cache argument of the models' ``forward`` from ``past_key_values`` to
``cache`` (the old name warns that it goes away in 5.40) and the output field with it. The decode loop
(`rlhf_zoo.generation.sample`) and the environment's incremental reference forward call `cached_forward`,
which passes the cache under the name the model's ``forward`` declares; the cache object itself is a
`transformers.DynamicCache` that the forward fills in place, so callers keep their own handle to it.

`IncrementalDecoder` is the decode loop's cache, attention mask and positions for left-padded prompt rows,
one token per step, under one of three `KV_CACHES` (`kv_cache_mode`, ``$RLHF_ZOO_KV_CACHE``):

  dynamic   (the default) a `transformers.DynamicCache` that grows by one position per step; the 2-D
            attention mask grows with it (``torch.cat``). Every step's shapes differ.
  static    a `transformers.StaticCache` of P + T positions allocated once (T = max_new_tokens), and a
            full-length (B, P + T) attention mask allocated once: prompt columns hold the prompt mask, the
            column of response token t is written when that token is fed (1, or 0 for a finished row), the
            columns after it are 0. transformers 5.24's static layers write each forward's keys at their
            own ``cumulative_length`` (no ``cache_position`` argument any more) and build the causal mask
            over all P + T columns with the query offset at that length, so the mask and the write
            position agree for every row, padded or not; positions stay the per-row count of real tokens,
            as in the dynamic path. The prefill computes the last position's logits only
            (``logits_to_keep=1`` where the forward takes it), not (B, P, V).
  compiled  static, plus a ``torch.compile``'d decode step (mode ``reduce-overhead``, CUDA graphs, on
            CUDA; ``default`` elsewhere): every step has the same shapes, so it compiles once per
            (batch, cache length, model); the cache length is rounded up to `COMPILED_LENGTH_MULTIPLE` so
            that prompt batches of similar lengths share a graph. The prefill is not compiled.

Static and compiled give the dynamic path's tokens and log-probs up to float rounding (tests/
test_generation_static.py: identical tokens, log-probs within 1e-5, with left padding and rows that end
early), not bit for bit: the attention runs over P + T columns instead of the columns seen so far. A model
whose class does not declare ``_can_compile_fullgraph`` (transformers' flag for static-cache and compile
support) or whose cache would have sliding-window or linear-attention layers (their static layers are
ring buffers, which this mask layout does not describe) decodes with the dynamic cache whatever the mode;
`IncrementalDecoder.mode` says which ran.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from functools import lru_cache
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from rlhf_zoo.ops.masking import position_ids_from_mask

NEW_NAME, OLD_NAME = "cache", "past_key_values"


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under wrappers that take ``**kwargs`` (peft's PeftModel, DDP)."""
    for _ in range(4):
        inner = getattr(model, "get_base_model", None)
        if callable(inner):
            model = inner()
            continue
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
            continue
        break
    return model


@lru_cache(maxsize=64)
def _name_for(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return NEW_NAME if NEW_NAME in params else OLD_NAME


@lru_cache(maxsize=64)
def _keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``cache`` or ``past_key_values``."""
    return _name_for(type(_unwrapped(model)))


def cached_forward(model: torch.nn.Module, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward that reads and extends ``cache`` (filled in place).  -> logits (B, L, V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **{cache_argument(model): cache})
    return out.logits


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a forward was given, under either name (None without one): for forward hooks."""
    cache = kwargs.get(NEW_NAME)
    return kwargs.get(OLD_NAME) if cache is None else cache


# --- the decode loop's cache: dynamic, static, static + compiled ---------------------------------------------
KV_CACHE_ENV = "RLHF_ZOO_KV_CACHE"
KV_CACHES = ("dynamic", "static", "compiled")
DEFAULT_KV_CACHE = "dynamic"
#: the compiled mode's cache length is P + T rounded up to this, so that similar prompt lengths share a graph
COMPILED_LENGTH_MULTIPLE = 64


def kv_cache_mode(mode: str | None = None) -> str:
    """The decode loop's KV cache: ``mode`` if given, else ``$RLHF_ZOO_KV_CACHE``, else `DEFAULT_KV_CACHE`."""
    chosen = mode or os.environ.get(KV_CACHE_ENV) or DEFAULT_KV_CACHE
    if chosen not in KV_CACHES:
        where = "kv cache" if mode else f"${KV_CACHE_ENV}"
        raise ValueError(f"{where}={chosen!r}; known: {', '.join(KV_CACHES)}")
    return chosen


def static_cache_supported(model: torch.nn.Module) -> bool:
    """Whether the model (under peft / DDP wrappers) declares static-cache and compile support."""
    inner = _unwrapped(model)
    return bool(getattr(type(inner), "_can_compile_fullgraph", False)) and hasattr(inner, "config")


def _step(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
          cache: Any, name: str) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 **{name: cache}).logits


@lru_cache(maxsize=4)
def _compiled_step(compile_mode: str) -> Any:
    """One compiled decode step per torch.compile mode; the model is an argument, so dynamo keeps one graph
    per model (guarded on it) and no compiled function is attached to, or keeps alive, any model."""
    with warnings.catch_warnings():  # torch 2.13's inductor imports this on CPU, and its import warns
        warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
        import torch.utils.mkldnn  # noqa: F401
    return torch.compile(_step, mode=compile_mode)


class IncrementalDecoder:
    """Prefill and one-token steps for left-padded prompt rows (prompt_ids, prompt_mask: (B, P)), up to
    ``max_new_tokens`` response tokens, with the KV cache of ``mode`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 max_new_tokens: int, mode: str = DEFAULT_KV_CACHE):
        self.model, self.prompt_ids = model, prompt_ids
        self.name = cache_argument(model)
        B, P = prompt_ids.shape
        self.P = P
        attn = prompt_mask.long()
        self.next_pos = attn.sum(-1, keepdim=True)  # (B, 1): position of the first response token
        self.prefill_pos = position_ids_from_mask(attn)
        self.mode, self.cache, self.fed = mode, None, 0
        if mode != "dynamic" and static_cache_supported(model):
            length = P + max_new_tokens
            if mode == "compiled":
                length = math.ceil(length / COMPILED_LENGTH_MULTIPLE) * COMPILED_LENGTH_MULTIPLE
            config = _unwrapped(model).config
            cache = StaticCache(config=config, max_cache_len=length)
            if not (any(cache.is_sliding) or any(cache.is_linear)):
                self.cache = cache
                self.attn = attn.new_zeros(B, length)
                self.attn[:, :P] = attn
        if self.cache is None:
            self.mode, self.cache, self.attn = "dynamic", DynamicCache(), attn

    def prefill(self) -> torch.Tensor:
        """The prompts' forward, filling the cache.  -> logits (B, V) at each row's last prompt position."""
        extra = {}
        if self.mode != "dynamic" and _keeps_logits(type(_unwrapped(self.model))):
            extra["logits_to_keep"] = 1
        out = self.model(input_ids=self.prompt_ids, attention_mask=self.attn, position_ids=self.prefill_pos,
                         use_cache=True, **{self.name: self.cache}, **extra)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ((B,); ``alive`` (B,) is 1 where it counts, 0 for a finished row's pad).
        -> next logits (B, V)."""
        if self.mode == "dynamic":
            self.attn = torch.cat([self.attn, alive.long()[:, None]], dim=1)
        else:
            self.attn[:, self.P + self.fed] = alive.long()
        self.fed += 1
        ids = tokens[:, None]
        if self.mode == "compiled":
            compile_mode = "reduce-overhead" if ids.device.type == "cuda" else "default"
            # cloned: a CUDA-graph replay owns its output buffer and the next replay overwrites it
            logits = _compiled_step(compile_mode)(self.model, ids, self.attn, self.next_pos, self.cache,
                                                  self.name)[:, -1].clone()
        else:
            logits = _step(self.model, ids, self.attn, self.next_pos, self.cache, self.name)[:, -1]
        self.next_pos = self.next_pos + 1
        return logits
