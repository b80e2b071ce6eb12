"""Reward-model ranking loss.

InstructGPT (Ouyang et al. 2022, Eq. 1): a labeler ranks K responses to one prompt, giving C(K,2)
pairs; all pairs of one prompt form ONE batch element, so a prompt counts once however many pairs it has:

    loss(x) = -1/C(K,2) * sum_{i<j} log sigmoid(r(x, y_i) - r(x, y_j) - m_ij)   (y_i ranked above y_j)

Llama 2 (Touvron et al. 2023, Eq. 2) subtracts a margin m_ij that grows with the strength of
preference; m = 0 gives the plain Bradley-Terry loss.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def pair_indices(k: int) -> tuple[list[int], list[int]]:
    """(better, worse) indices of the C(k,2) pairs of a best-first ranking, in order (0,1), (0,2), ..."""
    pairs = list(itertools.combinations(range(k), 2))
    return [i for i, _ in pairs], [j for _, j in pairs]


def ranking_loss(scores: torch.Tensor, margins: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over prompts of the mean pairwise loss of each prompt's ranking.

    Args:
        scores: (B, K) reward of each response, columns ordered best first.
        margins: (B, C(K,2)) margin of each pair in `pair_indices` order, or None for no margin.
    """
    better, worse = pair_indices(scores.shape[1])
    diff = scores[:, better] - scores[:, worse]  # (B, C(K,2))
    if margins is not None:
        diff = diff - margins
    return -F.logsigmoid(diff).mean(-1).mean()


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores strictly higher."""
    return float((chosen_scores > rejected_scores).float().mean())
