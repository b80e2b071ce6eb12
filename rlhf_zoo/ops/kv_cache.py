"""Forwards with a KV cache, written once for every transformers version the project supports.

transformers 5.24 renamed the cache argument of the models' ``forward`` from ``past_key_values`` to
``cache`` (the old name warns that it goes away in 5.40) and the output field with it. The decode loop
(`rlhf_zoo.generation.sample`) and the environment's incremental reference forward call `cached_forward`,
which passes the cache under the name the model's ``forward`` declares; the cache object itself is a
`transformers.DynamicCache` that the forward fills in place, so callers keep their own handle to it.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch

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
