"""``zoo bench``: the statistics (hand-computed values), suites, the harness end to end on ``exact``
(results, report, resume), and the known results on ``exact`` (best-of-N KL and win-rate bounds, the
exact frontier above best-of-N)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhf_zoo.bench import exact_checks, plots, stats
from rlhf_zoo.bench.execute import check_resumable
from rlhf_zoo.bench.suite import Suite, expand, load_suite
from rlhf_zoo.cli import main
from rlhf_zoo.errors import ZooError
from rlhf_zoo.registry import get_registry
from rlhf_zoo_envs.tasks import exact as E


# --- stats: IQM -----------------------------------------------------------------------------------
def test_iqm_of_one_to_eight_is_mean_of_middle_four():
    x = np.arange(1, 9)  # middle 50%: 3, 4, 5, 6
    assert stats.iqm(x) == pytest.approx(4.5)
    assert stats.iqm(x, "trim") == pytest.approx(4.5)


def test_iqm_of_five_values_weights_quartile_straddlers_fractionally():
    x = np.array([16.0, 1.0, 8.0, 2.0, 4.0])  # sorted 1, 2, 4, 8, 16; each holds 1/5 of the mass
    # middle 50% = 0.15 of 2, 0.2 of 4, 0.15 of 8, over 0.5
    assert stats.iqm(x) == pytest.approx((0.15 * 2 + 0.2 * 4 + 0.15 * 8) / 0.5)  # 4.6
    assert stats.iqm(x, "trim") == pytest.approx((2 + 4 + 8) / 3)  # scipy trim_mean(x, 0.25): drop 1 per end


def test_iqm_weights_hand_values_and_sum_to_one():
    np.testing.assert_allclose(stats.iqm_weights(3), [1 / 6, 2 / 3, 1 / 6])
    np.testing.assert_allclose(stats.iqm_weights(5), [0, 0.3, 0.4, 0.3, 0])
    np.testing.assert_allclose(stats.iqm_weights(3, "trim"), [1 / 3] * 3)  # int(0.75) = 0 trimmed
    np.testing.assert_allclose(stats.iqm_weights(7, "trim"), [0] + [0.2] * 5 + [0])
    for n in range(1, 13):
        assert stats.iqm_weights(n).sum() == pytest.approx(1.0)
        assert stats.iqm_weights(n, "trim").sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        stats.iqm_weights(0)


def test_iqm_of_one_value_is_that_value_and_is_vectorised():
    assert stats.iqm([3.25]) == pytest.approx(3.25)
    batch = np.array([[1.0, 2.0, 3.0, 4.0, 100.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(stats.iqm(batch), [(0.3 * 2 + 0.4 * 3 + 0.3 * 4), 0.0])


# --- stats: bootstrap -----------------------------------------------------------------------------
def test_percentile_interval_of_uniform_grid():
    assert stats.percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


def test_stratified_bootstrap_ci_contains_point_estimate_and_is_deterministic():
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.8])
    for stat in (stats.iqm, stats.mean):
        lo, hi = stats.stratified_bootstrap_ci(x, stat, seed=3)
        assert lo <= float(stat(x)) <= hi and lo < hi
        assert stats.stratified_bootstrap_ci(x, stat, seed=3) == (lo, hi)
    assert stats.stratified_bootstrap_ci(x, seed=4) != stats.stratified_bootstrap_ci(x, seed=3)


def test_stratified_bootstrap_resamples_within_each_stratum():
    # stratum A = three 0s, stratum B = two 10s: every resample keeps 3 + 2 runs, so its mean is exactly 4
    strata = [np.zeros(3), np.full(2, 10.0)]
    resamples = stats.stratified_resamples(strata, stats.BOOTSTRAP_RESAMPLES, np.random.default_rng(0))
    assert resamples.shape == (stats.BOOTSTRAP_RESAMPLES, 5)
    assert stats.stratified_bootstrap_ci(strata, stats.mean) == pytest.approx((4.0, 4.0))
    matrix = np.array([[0.0, 10.0], [0.0, 10.0]])  # rliable's (runs, tasks) form: a stratum per column
    assert stats.stratified_bootstrap_ci(matrix, stats.mean) == pytest.approx((5.0, 5.0))
    # unstratified, the same 5 runs would give means from 0 to 10
    lo, hi = stats.stratified_bootstrap_ci(np.concatenate(strata), stats.mean)
    assert lo < 4.0 < hi


def test_stratified_bootstrap_ci_of_one_run_collapses_to_it():
    assert stats.stratified_bootstrap_ci(np.array([0.7])) == pytest.approx((0.7, 0.7))
    assert stats.probability_of_improvement_ci([1.0], [0.0]) == pytest.approx((1.0, 1.0))


# --- stats: probability of improvement ------------------------------------------------------------
@pytest.mark.parametrize(("x", "y", "p"), [
    ([2, 3], [1], 1.0),
    ([1], [2, 3], 0.0),
    ([2], [2], 0.5),  # a tie counts 1/2
    ([1, 3], [2], 0.5),
    ([1, 2, 3], [2, 2], 0.5),  # (0 + 0) + (1/2 + 1/2) + (1 + 1) over 6
    ([3, 4], [1, 3], 0.875),  # (1 + 1/2 + 1 + 1) over 4
])
def test_probability_of_improvement_hand_cases(x, y, p):
    assert stats.probability_of_improvement(np.array(x), np.array(y)) == pytest.approx(p)


def test_probability_of_improvement_is_complementary_and_ci_contains_it():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, 6).astype(float), rng.integers(0, 4, 5).astype(float)  # with ties
    p = float(stats.probability_of_improvement(x, y))
    assert p + float(stats.probability_of_improvement(y, x)) == pytest.approx(1.0)
    lo, hi = stats.probability_of_improvement_ci(x, y, seed=1)
    assert 0.0 <= lo <= p <= hi <= 1.0
    assert stats.probability_of_improvement_ci(x, y, seed=1) == (lo, hi)


def test_stratified_probability_of_improvement_averages_tasks():
    assert stats.stratified_probability_of_improvement([[2.0], [0.0, 1.0]], [[1.0], [1.0, 1.0]]) == pytest.approx(
        (1.0 + 0.25) / 2)


# --- suites ---------------------------------------------------------------------------------------
def test_suite_expand_is_seed_major_and_drops_a_sweep_value_equal_to_the_default():
    suite = Suite("t", ("best-of-n", "dpo"), ("exact",), (0, 1), sweeps={"best-of-n": {"n": [16, 2]}})
    specs = expand(suite, get_registry())  # n = 16 is best-of-n's default: that variant is the default run
    assert [(s.seed, s.algorithm, s.variant) for s in specs] == [
        (0, "best-of-n", "default"), (0, "best-of-n", "n=2"), (0, "dpo", "default"),
        (1, "best-of-n", "default"), (1, "best-of-n", "n=2"), (1, "dpo", "default")]
    assert specs[1].config["n"] == 2 and specs[0].config["n"] == 16


def test_suite_files_quick_and_full_expand_with_valid_knobs():
    quick, full = load_suite("quick"), load_suite("full")
    assert len(expand(quick, get_registry())) == 8 * 2 * 3
    specs = expand(full, get_registry())  # every sweep knob is a config field (else ConfigError)
    variants = {(s.algorithm, s.variant) for s in specs}
    assert {("ppo", "beta=0.3"), ("dpo", "beta=0.3"), ("best-of-n", "n=4"), ("rejection-sampling", "k=4"),
            ("rejection-sampling", "rounds=4"), ("rrhf", "candidates=8")} <= variants
    assert {s.seed for s in specs} == {0, 1, 2, 3, 4} and {s.task for s in specs} == {"exact", "sentiment", "hh"}


def test_suite_evaluation_is_the_same_for_every_algorithm():
    suite = Suite("t", ("ppo", "best-of-n", "rrhf"), ("exact",), (0,), preset="quick",
                  options={"rrhf": {"candidates": 2}}, evaluation={"eval_prompts": 32, "eval_samples": 3})
    specs = expand(suite, get_registry())
    assert {(s.config["eval_prompts"], s.config["eval_samples"]) for s in specs} == {(32, 3)}  # over the presets
    assert next(s for s in specs if s.algorithm == "rrhf").config["candidates"] == 2
    for s in load_suite("quick").evaluation, load_suite("full").evaluation:
        assert s == {"eval_prompts": 64, "eval_samples": 4}
    with pytest.raises(ZooError, match="evaluation keys"):
        expand(Suite("t", ("ppo",), ("exact",), (0,), evaluation={"learning_rate": 1.0}), get_registry())


def test_suite_unknown_names_raise_before_running(tmp_path):
    with pytest.raises(ZooError, match="unknown suite 'nope'"):
        load_suite("nope")
    with pytest.raises(ZooError, match="unknown config key"):
        expand(Suite("t", ("dpo",), ("exact",), (0,), sweeps={"dpo": {"betta": [0.1]}}), get_registry())
    with pytest.raises(ZooError, match="unknown task"):
        expand(Suite("t", ("dpo",), ("nope",), (0,)), get_registry())


# --- harness end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--algos", "best-of-n", "--tasks", "exact", "--seeds", "2", "--preset", "smoke",
            "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    return out, argv


def test_bench_writes_results_with_statistics_budgets_and_provenance(bench_dir):
    out, _ = bench_dir
    results = json.loads((out / "results.json").read_text())
    assert {"suite", "command", "protocol", "machine", "versions", "git_commits", "records",
            "probability_of_improvement", "exact_checks"} <= set(results)
    assert results["command"].startswith("zoo bench --algos best-of-n --tasks exact --seeds 2 --preset smoke")
    assert {"platform", "cpu_count", "torch_threads"} <= set(results["machine"])
    assert results["protocol"]["n_resamples"] >= 2000
    (rec,) = results["records"]
    assert (rec["algorithm"], rec["task"], rec["variant"], rec["seeds"]) == ("best-of-n", "exact", "default", [0, 1])
    for key in ("gold_reward", "kl_to_ref", "kl_to_optimum", "frontier_efficiency"):
        m = rec["metrics"][key]
        assert len(m["per_seed"]) == 2 and m["iqm_ci"][0] <= m["iqm"] <= m["iqm_ci"][1]
    for seed, gold in zip(rec["seeds"], rec["metrics"]["gold_reward"]["per_seed"], strict=True):
        summary = json.loads((out / "runs" / "exact" / "best-of-n" / "default" / f"seed{seed}" / "summary.json")
                             .read_text())
        assert summary["gold_reward"] == gold
        assert summary["kl_to_ref"] <= E.best_of_n_kl_bound(2) + 1e-9  # smoke preset: n = 2, exact KL
    assert set(rec["budget"]) == {"generated_tokens", "trained_tokens"}
    assert rec["systems"]["wall_seconds"]["mean"] > 0


def test_bench_report_has_a_row_per_algorithm_and_the_known_results(bench_dir):
    out, _ = bench_dir
    report = (out / "report.md").read_text()
    assert "## Task `exact`" in report
    rows = [line for line in report.splitlines() if line.startswith("| best-of-n | default |")]
    assert len(rows) == 1
    assert "log N - (N-1)/N" in report and "**violated**" not in report
    assert "preset, not equalised" in report


def test_bench_rerun_skips_finished_runs(bench_dir, capsys):
    out, argv = bench_dir
    summaries = sorted((out / "runs").rglob("summary.json"))
    before = [p.stat().st_mtime_ns for p in summaries]
    assert len(summaries) == 2
    assert main(argv) == 0
    assert "2 runs (0 run now, 2 reused)" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in summaries] == before
    assert json.loads((out / "results.json").read_text())["execution"] == {"runs": 2, "executed": 0, "skipped": 2}


def test_bench_refuses_to_resume_a_run_made_with_another_config(bench_dir, tmp_path):
    out, _ = bench_dir
    spec = expand(Suite("t", ("best-of-n",), ("exact",), (0,), preset="smoke"), get_registry())[0]
    check_resumable(spec, spec.run_dir(out))  # the finished run matches
    other = expand(Suite("t", ("best-of-n",), ("exact",), (0,), preset="smoke",
                         options={"best-of-n": {"n": 3}}), get_registry())[0]
    with pytest.raises(ZooError, match="holds a different run"):
        check_resumable(other, spec.run_dir(out))


def test_bench_plots_are_written(bench_dir):
    pytest.importorskip("matplotlib")
    out, _ = bench_dir
    results = json.loads((out / "results.json").read_text())
    assert results["plots"] == ["plots/frontier_exact.png", "plots/overoptimisation_exact.png",
                                "plots/systems_exact.png"]
    for rel in results["plots"]:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.available()


def test_bench_cli_rejects_suite_combined_with_adhoc_options(tmp_path, capsys):
    assert main(["bench", "--suite", "quick", "--algos", "dpo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error: --suite takes") and "--algos" in err


# --- known results on exact -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def exact_space():
    task = get_registry().task("exact").load(seed=0, progress=False)
    return exact_checks.reference_logprobs(task), exact_checks.selection_scores(task), task.exact_rewards


@pytest.mark.parametrize("n", [2, 4, 8])
def test_best_of_n_exact_kl_is_within_log_n_minus_n_minus_one_over_n(exact_space, n):
    ref, scores, gold = exact_space
    check = exact_checks.best_of_n_check(ref, scores, gold, n)
    assert check["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert 0.0 < check["kl"] <= check["kl_bound"]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_best_of_n_exact_win_rate_against_reference_is_at_most_n_over_n_plus_one(exact_space, n):
    ref, scores, gold = exact_space
    win = exact_checks.best_of_n_check(ref, scores, gold, n)["win_rate"]
    # below N/(N+1) only through ties (the same response drawn twice), which are rare here
    assert n / (n + 1) - 0.02 < win <= n / (n + 1) + 1e-12


def test_exact_win_rate_of_a_policy_against_itself_is_one_half(exact_space):
    ref, scores, _ = exact_space
    assert exact_checks.exact_win_rate(ref, ref, scores) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_exact_frontier_dominates_best_of_n(exact_space, n):
    ref, scores, gold = exact_space
    check = exact_checks.best_of_n_check(ref, scores, gold, n)
    assert check["frontier_gold_reward"] >= check["gold_reward"]
    bon = E.best_of_n_logprobs(ref, scores, n)
    assert check["gold_reward"] == pytest.approx(float(E.expected(bon, gold).mean()))


def test_exact_frontier_curve_rises_with_kl_from_the_reference(exact_space):
    ref, _, gold = exact_space
    curve = exact_checks.frontier_curve(ref, gold)
    assert np.all(np.diff(curve["kl"]) > 0) and np.all(np.diff(curve["reward"]) > 0)
    assert (curve["beta"][0], curve["kl"][0]) == (None, 0.0)  # starts at pi_ref
    assert curve["reward"][0] == pytest.approx(float(E.expected(ref, gold).mean()))
    # near the reference the gain is about sqrt(2 Var(r) KL): steep, but small at the largest beta
    assert curve["kl"][1] < 1e-4 and 0 < curve["reward"][1] - curve["reward"][0] < 0.01
