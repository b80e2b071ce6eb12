"""Aggregate statistics over a few runs, as rliable recommends (Agarwal et al. 2021, "Deep Reinforcement
Learning at the Edge of the Statistical Precipice", NeurIPS): the interquartile mean, stratified-bootstrap
confidence intervals and the probability of improvement. Pure numpy.

Conventions: scores are 1-D arrays over runs (seeds); a *stratified* sample is a list of such arrays,
one per stratum (task), possibly of different lengths, or a 2-D (runs, tasks) array. Statistics take an array (..., n) and reduce the
last axis, so B bootstrap resamples are evaluated in one call on a (B, n) array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

Statistic = Callable[[np.ndarray], np.ndarray]
IQMMethod = Literal["fractional", "trim"]


def mean(x: np.ndarray) -> np.ndarray:
    """Arithmetic mean over the last axis.  (..., n) -> (...)"""
    return np.mean(np.asarray(x, dtype=np.float64), axis=-1)


def iqm_weights(n: int, method: IQMMethod = "fractional") -> np.ndarray:
    """Weights of the sorted scores x_(1) <= ... <= x_(n) in the IQM; they sum to 1.  -> (n,)

    ``fractional`` (default): the mean of the middle 50% of the empirical distribution, i.e.
    IQM = 2 * integral_{0.25}^{0.75} F^-1(u) du. The i-th sorted score (i = 0..n-1) holds the mass
    [i/n, (i+1)/n], and its weight is 2 * |[i/n, (i+1)/n] ∩ [0.25, 0.75]|. Scores that straddle a quartile
    count fractionally, so every n >= 1 gives a proper interquartile mean (n = 5: weights
    0, 0.3, 0.4, 0.3, 0; n = 3: 1/6, 2/3, 1/6).

    ``trim``: what rliable computes, ``scipy.stats.trim_mean(x, 0.25)``: drop floor(n / 4) scores at each
    end and average the rest with equal weights (n = 5: 0, 1/3, 1/3, 1/3, 0; n = 3: the plain mean).

    Both agree when n is divisible by 4 (n = 8: the mean of x_(3) .. x_(6)).
    """
    if n < 1:
        raise ValueError(f"the IQM needs at least one score, got n = {n}")
    if method == "fractional":
        lo, hi = np.arange(n) / n, np.arange(1, n + 1) / n
        return 2.0 * np.clip(np.minimum(hi, 0.75) - np.maximum(lo, 0.25), 0.0, None)
    if method == "trim":
        cut = int(0.25 * n)  # scipy.stats.trim_mean: int(proportiontocut * n) from each end
        w = np.zeros(n)
        w[cut:n - cut] = 1.0 / (n - 2 * cut)
        return w
    raise ValueError(f"method must be 'fractional' or 'trim', got {method!r}")


def iqm(x: np.ndarray, method: IQMMethod = "fractional") -> np.ndarray:
    """Interquartile mean over the last axis (see `iqm_weights`).  (..., n) -> (...)"""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    return x @ iqm_weights(x.shape[-1], method)


def _as_strata(scores: np.ndarray | Sequence[Any]) -> list[np.ndarray]:
    """One stratum from a 1-D array or a list of numbers; a stratum per column of a 2-D (runs, tasks)
    array (rliable's score matrix); a stratum per element of a list of arrays (lengths may differ)."""
    if isinstance(scores, np.ndarray):
        if scores.ndim not in (1, 2):
            raise ValueError(f"scores must be 1-D (runs) or 2-D (runs, tasks), got shape {scores.shape}")
        strata = [scores] if scores.ndim == 1 else list(scores.T)
    elif all(np.isscalar(s) for s in scores):
        strata = [np.asarray(scores)]
    else:
        strata = [np.asarray(s).ravel() for s in scores]
    if not strata or any(s.size == 0 for s in strata):
        raise ValueError("every stratum needs at least one score")
    return [s.astype(np.float64) for s in strata]


def stratified_resamples(scores: np.ndarray | Sequence[np.ndarray], n_resamples: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resamples that keep the strata: within each stratum of n_s runs, draw n_s runs with
    replacement; the resampled strata are concatenated (rliable's ``StratifiedBootstrap``, which
    resamples runs within each task).  -> (n_resamples, sum_s n_s)"""
    parts = [s[rng.integers(0, s.size, size=(n_resamples, s.size))] for s in _as_strata(scores)]
    return np.concatenate(parts, axis=-1)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile bootstrap interval: the (1 - c)/2 and (1 + c)/2 quantiles of the resampled
    statistic (linear interpolation between order statistics, numpy's default)."""
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def stratified_bootstrap_ci(scores: np.ndarray | Sequence[np.ndarray], statistic: Statistic = iqm, *,
                            n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile confidence interval of ``statistic`` (computed on the pooled runs of all strata) from
    ``n_resamples`` stratified bootstrap resamples drawn with ``np.random.default_rng(seed)``.

    With one run per stratum every resample equals the data, and the interval collapses to the point
    estimate: one seed carries no information about the spread.
    """
    rng = np.random.default_rng(seed)
    return percentile_interval(statistic(stratified_resamples(scores, n_resamples, rng)), confidence)


def _win_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """S(x_i, y_j) = 1 if x_i > y_j, 1/2 if equal, 0 otherwise.  (..., m), (..., n) -> (..., m, n)"""
    d = x[..., :, None] - y[..., None, :]
    return (d > 0) + 0.5 * (d == 0)


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) from the scores of X's runs and Y's runs (rliable's "probability of improvement": the
    Mann-Whitney U statistic over m * n):

        P(X > Y) = 1 / (m n) * sum_i sum_j S(x_i, y_j),  S = 1 if x_i > y_j, 1/2 if x_i = y_j, else 0.

    P(X > Y) + P(Y > X) = 1 exactly.  (..., m), (..., n) -> (...)"""
    return _win_matrix(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).mean(axis=(-2, -1))


def stratified_probability_of_improvement(x: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> float:
    """rliable's aggregate over tasks: the mean over strata of the per-stratum P(X > Y)."""
    if len(x) != len(y):
        raise ValueError(f"x and y need the same strata, got {len(x)} and {len(y)}")
    return float(np.mean([probability_of_improvement(a, b) for a, b in zip(x, y, strict=True)]))


def probability_of_improvement_ci(x: np.ndarray | Sequence[np.ndarray], y: np.ndarray | Sequence[np.ndarray], *,
                                  n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                                  seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the (stratified) P(X > Y): X's and Y's runs are resampled independently,
    each within its strata; each resample's P is the mean over strata of the per-stratum P."""
    xs, ys = _as_strata(x), _as_strata(y)
    if len(xs) != len(ys):
        raise ValueError(f"x and y need the same strata, got {len(xs)} and {len(ys)}")
    rng = np.random.default_rng(seed)
    per_stratum = [probability_of_improvement(a[rng.integers(0, a.size, size=(n_resamples, a.size))],
                                              b[rng.integers(0, b.size, size=(n_resamples, b.size))])
                   for a, b in zip(xs, ys, strict=True)]  # each (n_resamples,)
    return percentile_interval(np.mean(per_stratum, axis=0), confidence)
