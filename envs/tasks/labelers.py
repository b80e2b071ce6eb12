"""Simulated labelers: rankings, preference strengths and margins drawn from the gold reward.

A labeler ranks K responses by Plackett-Luce on utilities u = v / tau, where v is what the labeler
perceives: the gold reward, or a language's ``labeler_view`` where labelers are biased (`perceived`) (the K-way form of
Bradley-Terry; for two responses P(i above j) = sigmoid((g_i - g_j) / tau)). The temperature tau is
calibrated so that two independent labelers agree on about 70% of pairs, inside the 63-75% band that
InstructGPT and Llama 2 report. Each pair also gets a strength level (Llama 2: negligibly better /
slightly better / better / significantly better) from the labeler's noisy perceived gap, and the
margin of Llama 2's "small" variant, level / 3.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TARGET_AGREEMENT = 0.70
LEVEL_NAMES = ("negligibly better", "slightly better", "better", "significantly better")
LEVEL_THRESHOLDS = (0.5, 1.5, 3.0)  # perceived utility gap at which each level above "negligibly" starts


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def agreement(gold_groups: np.ndarray, tau: float) -> float:
    """Expected fraction of pairs on which two independent labelers agree, over the pairs whose gold
    rewards differ (on a gold tie any two labelers are coin flips).  gold_groups (N, K)."""
    i, j = np.triu_indices(gold_groups.shape[1], 1)
    gap = np.abs(gold_groups[:, i] - gold_groups[:, j])
    gap = gap[gap > 0]
    if gap.size == 0:
        return 0.5
    p = _sigmoid(gap / tau)
    return float(np.mean(p * p + (1 - p) * (1 - p)))


def calibrate_temperature(gold_groups: np.ndarray, target: float = TARGET_AGREEMENT) -> float:
    """tau such that `agreement` equals ``target`` (bisection on log tau; agreement falls as tau grows)."""
    lo, hi = np.log(1e-3), np.log(1e3)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if agreement(gold_groups, float(np.exp(mid))) > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def rank(gold: np.ndarray, tau: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One labeler's ranking of K responses.

    Returns:
        order: (K,) response indices best first.
        levels: (C(K,2),) strength level 0-3 of each pair (a, b), a < b, of the ranked list.
    """
    utility = gold / tau + rng.gumbel(size=gold.shape)  # Plackett-Luce via the Gumbel-max trick
    order = np.argsort(-utility, kind="stable")
    perceived = utility[order]
    a, b = np.triu_indices(len(gold), 1)
    levels = np.searchsorted(LEVEL_THRESHOLDS, perceived[a] - perceived[b], side="right")
    return order, levels


def perceived(language: Any, prompt: str, response: str) -> dict[str, float]:
    """What a labeler perceives of ``response``: the language's ``labeler_view`` where it has one (a
    systematic bias, e.g. sentiment's liking for length), else its gold reward. Every ranking the zoo
    simulates (the task build's, iterated RLHF's, the over-optimisation benchmark's) goes through here."""
    view = getattr(language, "labeler_view", None)
    return view(prompt, response) if view is not None else language.gold(prompt, response)


def margins_from_levels(levels: np.ndarray) -> np.ndarray:
    """Llama 2 margin ("small" variant): 0, 1/3, 2/3, 1 for the four levels."""
    return levels.astype(np.float64) / 3.0
