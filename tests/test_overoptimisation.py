"""The estimators and fits of benchmarks/overoptimisation.py (Gao et al. 2022 measurements) against
brute force and synthetic curves."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overoptimisation.py"


@pytest.fixture(scope="module")
def oo():
    spec = importlib.util.spec_from_file_location("overoptimisation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("m,n", [(6, 1), (6, 2), (6, 3), (7, 4), (5, 5)])
def test_best_of_n_estimator_is_the_mean_over_every_n_subset(oo, m, n):
    rng = np.random.default_rng(m * 10 + n)
    proxy, gold = rng.normal(size=(3, m)), rng.normal(size=(3, m))
    brute = np.mean([np.mean([gold[p, max(s, key=lambda i: proxy[p, i])] for s in itertools.combinations(range(m), n)])
                     for p in range(3)])
    assert oo.best_of_n(proxy, gold, n) == pytest.approx(brute, abs=1e-12)
    assert oo.bon_weights(m, n).sum() == pytest.approx(1.0, abs=1e-12)


def test_best_of_n_kl_is_the_exact_kl_of_the_best_of_n_distribution_for_distinct_scores(oo):
    m = 50  # pi_ref uniform over m distinct responses; best-of-n of the i-th lowest: (i^n - (i-1)^n) / m^n
    for n in (1, 2, 4, 16):
        q = np.array([(i**n - (i - 1) ** n) / m**n for i in range(1, m + 1)])
        exact = float(np.sum(q * np.log(q * m)))
        assert exact <= oo.bon_kl(n) + 1e-12  # the analytic form bounds it and is its large-m limit
        assert exact == pytest.approx(oo.bon_kl(n), abs=0.03 * n / 16 + 1e-9)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.2, 0.4), ("rl", 0.8, 0.3)])
def test_fit_recovers_the_coefficients_and_the_peak_of_a_synthetic_curve(oo, form, alpha, beta):
    d = np.linspace(0.0, 4.0, 30)
    f = d if form == "bon" else np.log(np.maximum(d, 1e-12))
    gain = d * (alpha - beta * f)
    rng = np.random.default_rng(0)
    fitted = oo.fit(d, gain + rng.normal(scale=1e-3, size=d.shape), form)
    assert fitted["alpha"] == pytest.approx(alpha, abs=5e-3)
    assert fitted["beta"] == pytest.approx(beta, abs=5e-3)
    assert fitted["r2"] > 0.999
    peak_d = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    assert fitted["peak_d"] == pytest.approx(peak_d, rel=0.02)
    assert fitted["peak_kl"] == pytest.approx(peak_d**2, rel=0.04)


def test_largest_fall_is_the_biggest_gold_drop_while_the_proxy_rose(oo):
    kl, gold, proxy = [0, 1, 2, 3, 4], [0.0, 1.0, 0.2, 0.9, 0.1], [0.0, 1.0, 2.0, 0.5, 3.0]
    fall = oo.largest_fall(kl, gold, proxy)
    assert (fall["from"], fall["to"]) == (1, 4) and fall["fall"] == pytest.approx(0.9)  # not 3 -> 4: proxy fell at 3
    assert fall["kl"] == [1, 4] and fall["proxy"] == [1.0, 3.0]
    assert oo.largest_fall([0, 1, 2], [0.0, 0.5, 1.0], [0.0, 1.0, 2.0]) is None  # gold never fell
    assert oo.largest_fall([0, 1], [1.0, 0.0], [1.0, 0.5]) is None  # it fell, but the proxy fell too


def test_pooled_curve_bins_every_seeds_points_relative_to_its_start(oo):
    """Two seeds with different starting gold: gains are pooled, bin means are hand-computed, the peak bin
    and the fall after it are found, and the fit runs on all points."""
    a = {"seed": 0, "beta": 0.01, "proxy_rm": "task", "d": [0.2, 1.4, 2.5, 2.9], "gold": [0.0, 0.5, 0.3, 0.1],
         "proxy": [0.0, 1.0, 2.0, 3.0]}
    b = {"seed": 1, "beta": 0.01, "proxy_rm": "task", "d": [0.2, 1.4, 2.5, 2.9], "gold": [0.2, 0.9, 0.3, 0.1],
         "proxy": [0.0, 1.2, 2.2, 3.2]}
    c = oo.pooled_curve([a, b], bins=3)  # bin edges 0, 0.967, 1.933, 2.9: d=0.2 | d=1.4 | d=2.5 and 2.9
    assert c["gold0"] == pytest.approx(0.1)
    assert c["bins"]["points"] == [2, 2, 4]
    assert c["bins"]["d"] == pytest.approx([0.2, 1.4, 2.7])
    assert c["bins"]["kl"] == pytest.approx([0.04, 1.96, (2.5**2 + 2.9**2) / 2])
    # gains: seed 0 (0, .5, .3, .1), seed 1 (0, .7, .1, -.1); bin means + mean start 0.1
    assert c["bins"]["gold"] == pytest.approx([0.1, 0.1 + 0.6, 0.1 + (0.3 + 0.1 + 0.1 - 0.1) / 4])
    assert c["bins"]["proxy"] == pytest.approx([0.0, 1.1, 2.6])
    p = c["observed_peak"]
    assert p["kl"] == pytest.approx(1.96) and p["gold"] == pytest.approx(0.7)
    assert p["gold_falls_after_peak"] and p["proxy_rises_after_peak"]
    assert c["fit"]["r2"] <= 1.0 and c["seeds"] == [0, 1]
