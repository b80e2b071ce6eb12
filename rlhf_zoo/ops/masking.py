"""Masks and padding. A mask is True (1) where the token counts; padding is never found by token id."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real tokens of its row: left- and right-padding give the same
    positions to the same tokens. Values at padding positions are never read."""
    pos = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return pos.clamp(min=0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum over counted tokens. Uncounted values are replaced, not multiplied by 0, so an inf or NaN
    there (the log-prob of a suppressed pad id) cannot leak in."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over counted tokens; 0 (not NaN) where nothing counts."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True along the last dim, per row; -1 for a row with none.  (B, T) -> (B,)"""
    T = mask.shape[-1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).amax(-1)
