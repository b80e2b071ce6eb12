"""The ``frontier`` suite (each algorithm's main knob swept on ``exact`` and ``sentiment``, seeds 0-2) and
what the benchmark writes for it: the frontier-efficiency tables of report.md, the exact curve's extent in
the frontier plot, and the runs' recorded cost. Fast: nothing here trains."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rlhf_zoo.bench import harness, plots, report
from rlhf_zoo.bench.execute import BENCH_TIME, RunResult, process_seconds
from rlhf_zoo.bench.suite import expand, load_suite
from rlhf_zoo.registry import get_registry

CLASSIC = ("ppo", "ppo-ptx", "dpo", "rrhf", "rejection-sampling", "best-of-n")
#: each algorithm's variants in the frontier suite: the default, then one per sweep value
FRONTIER_VARIANTS = {
    "ppo": ["default", "beta=0.05", "beta=0.2", "beta=1.0"],
    "ppo-ptx": ["default", "beta=0.05", "beta=1.0"],
    "dpo": ["default", "beta=0.05", "beta=0.2", "beta=1.0"],
    "rrhf": ["default", "rank_weight=0.0", "rank_weight=0.3", "rank_weight=3.0"],
    "rejection-sampling": ["default", "k=2", "k=4"],
    "best-of-n": ["default", "n=2", "n=4", "n=32"],
}


# --- the suite file -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frontier_specs():
    suite = load_suite("frontier")
    return suite, expand(suite, get_registry())


def test_frontier_suite_sweeps_the_six_classic_algorithms_on_exact_and_sentiment(frontier_specs):
    suite, specs = frontier_specs
    assert set(CLASSIC) <= set(suite.algorithms)
    assert suite.tasks == ("exact", "sentiment") and suite.seeds == (0, 1, 2) and suite.preset == "quick"
    assert suite.evaluation == {"eval_prompts": 64, "eval_samples": 4}
    assert len(specs) == 22 * 2 * 3  # 22 variants (no sweep value repeats a default), 2 tasks, 3 seeds
    got: dict[str, list[str]] = {}
    for s in specs:
        if s.task == "exact" and s.seed == 0:
            got.setdefault(s.algorithm, []).append(s.variant)
    assert got == FRONTIER_VARIANTS
    # paired seeds: every (task, algorithm, variant) runs on seeds 0, 1 and 2 exactly once
    assert set(Counter((s.task, s.algorithm, s.variant) for s in specs).values()) == {3}
    assert {s.seed for s in specs[: 22 * 2]} == {0}  # seed-major: an interrupted run has whole seeds
    # the description states the budget: the measured cost per run and in all
    assert "min" in suite.description and "per run" in suite.description


def _config(specs, algorithm, variant):
    (config,) = {json.dumps(s.config, sort_keys=True) for s in specs if (s.algorithm, s.variant) == (algorithm, variant)}
    return json.loads(config)


def test_frontier_suite_variants_change_only_their_knob(frontier_specs):
    _, specs = frontier_specs
    registry = get_registry()
    for algorithm, labels in FRONTIER_VARIANTS.items():
        default = _config(specs, algorithm, "default")
        quick = registry.algorithm(algorithm).config_cls.from_dict({}, preset="quick").to_dict()
        for key in ("iterations", "epochs", "rounds", "prompts_per_round", "prompts_per_iteration"):
            if key in quick:
                assert default[key] == quick[key], (algorithm, key)  # the quick preset's budget
        assert (default["eval_prompts"], default["eval_samples"]) == (64, 4)
        for label in labels[1:]:
            knob, value = label.split("=")
            config = _config(specs, algorithm, label)
            assert config[knob] == pytest.approx(float(value))
            assert {k for k in config if config[k] != default[k]} == {knob}
    assert _config(specs, "ppo", "default")["beta"] is None  # the task's beta: 0.5 on exact, 0.1 on sentiment
    assert _config(specs, "ppo", "default")["iterations"] == 40
    assert _config(specs, "best-of-n", "default")["n"] == 8
    assert _config(specs, "rejection-sampling", "default")["k"] == 8
    assert _config(specs, "rrhf", "default")["rank_weight"] == 1.0
    for label in FRONTIER_VARIANTS["ppo-ptx"]:
        assert _config(specs, "ppo-ptx", label)["ptx_batch_size"] == 16


def test_frontier_suite_runs_land_in_one_directory_per_variant_and_seed(frontier_specs, tmp_path):
    _, specs = frontier_specs
    dirs = [s.run_dir(tmp_path) for s in specs]
    assert len(set(dirs)) == len(dirs)
    assert tmp_path / "runs" / "exact" / "ppo" / "beta=0.05" / "seed2" in dirs


# --- report.md: frontier efficiency ---------------------------------------------------------------
def _metric(values: list[float], lo: float | None = None, hi: float | None = None) -> dict:
    iqm = sum(values) / len(values)
    return {"iqm": iqm, "iqm_ci": [min(values) if lo is None else lo, max(values) if hi is None else hi],
            "mean": iqm, "mean_ci": [min(values), max(values)], "per_seed": values}


def _record(algorithm: str, variant: str, kl: float, gold: float, eff: list[float] | None, task: str = "exact") -> dict:
    metrics = {"kl_to_ref": _metric([kl]), "gold_reward": _metric([gold]), "baseline_gold_reward": _metric([0.01])}
    if eff is not None:
        metrics["frontier_efficiency"] = _metric(eff)
    return {"task": task, "algorithm": algorithm, "variant": variant, "metrics": metrics, "seeds": [0],
            "budget": {"generated_tokens": {"mean": 0.0}, "trained_tokens": {"mean": 0.0}},
            "systems": {"wall_seconds": {"mean": 1.0}}, "phase_seconds": {}}


RECORDS = [
    _record("ppo", "default", 0.50, 0.40, [0.60, 0.70]),
    _record("ppo", "beta=0.05", 2.00, 0.70, [0.62, 0.66]),
    _record("ppo", "beta=1.0", 0.10, 0.20, [0.50, 0.58]),
    _record("dpo", "default", 0.20, 0.18, [0.45, 0.47]),
    _record("dpo", "beta=0.05", 2.20, 0.30, [0.25, 0.31]),
]


def test_frontier_efficiency_table_gives_each_algorithms_best_variant_and_its_sweep_by_kl():
    lines = report.frontier_efficiency("exact", RECORDS)
    rows = [line for line in lines if line.startswith(("| ppo |", "| dpo |"))]
    assert rows == [
        "| ppo | 0.650 [0.600, 0.700] | default | 0.500 | "
        "beta=1.0: 0.54 [0.50, 0.58]; default: 0.65 [0.60, 0.70]; beta=0.05: 0.64 [0.62, 0.66] |",
        "| dpo | 0.460 [0.450, 0.470] | default | 0.200 | default: 0.46 [0.45, 0.47]; beta=0.05: 0.28 [0.25, 0.31] |"]
    # the best is the highest IQM, wherever it lies on the sweep
    better = [*RECORDS[:2], _record("ppo", "beta=1.0", 0.10, 0.20, [0.80, 0.90])]
    assert report.frontier_efficiency("exact", better)[-1].startswith("| ppo | 0.850 [0.800, 0.900] | beta=1.0 | 0.100 |")


def test_frontier_efficiency_table_is_absent_without_the_metric():
    assert report.frontier_efficiency("sentiment", [_record("ppo", "default", 1.0, 1.0, None, "sentiment")]) == []


def test_report_renders_the_frontier_table_on_exact_only_and_states_the_cost_and_options():
    suite = {"name": "frontier", "description": "d", "seeds": [0], "preset": "quick",
             "options": {"ppo-ptx": {"ptx_batch_size": 16}, "ppo": {}}}
    results = {"suite": suite, "command": "zoo bench --suite frontier", "created": "now", "git_commits": ["abc"],
               "versions": {"torch": "x"}, "machine": {"platform": "p", "cpu_count": 2, "torch_threads": 1,
                                                        "devices": ["cpu"]},
               "protocol": {"confidence": 0.95, "n_resamples": 10, "bootstrap_seed": 0, "iqm": "iqm"},
               "execution": {"runs": 6, "executed": 4, "skipped": 2},
               "timing": {"run_wall_seconds": 120.0, "run_process_seconds": 600.0, "run_cpu_seconds": 450.0,
                          "runs_without_process_time": 1, "elapsed_seconds": 400.0},
               "records": [*RECORDS, _record("ppo", "default", 1.0, 1.0, None, "sentiment")],
               "probability_of_improvement": [], "exact_checks": {}, "plots": []}
    text = report.render(results)
    summary_header = "| algorithm | best frontier eff. IQM [95% CI] | best variant |"
    assert text.count(summary_header) == 1 and text.index(summary_header) < text.index("## Task `sentiment`")
    assert "`quick` preset with the suite's options (ppo-ptx: ptx_batch_size = 16), not equalised" in text
    assert "6 runs (4 run by the last invocation, 2 reused); their processes took 10.0 min in all (7.5 min of CPU time; start-up" in text
    assert "1 run(s) without a recorded process time" in text and "2.0 min inside the runs" in text


# --- plots ----------------------------------------------------------------------------------------
def test_exact_curve_is_cut_a_little_past_the_largest_kl_reached():
    curve = {"kl": [0.0, 0.5, 1.0, 2.0, 3.0, 6.0], "reward": [0.0, 0.3, 0.5, 0.7, 0.8, 0.9]}
    recs = [_record("ppo", "default", 1.0, 0.4, [0.6]), _record("ppo", "beta=0.05", 2.0, 0.6, [0.6])]
    # largest upper KL end 2.0 -> limit 2.6: points up to 2.0, and 3.0 so that the curve reaches the edge
    assert plots.curve_extent(curve, recs) == ([0.0, 0.5, 1.0, 2.0, 3.0], [0.0, 0.3, 0.5, 0.7, 0.8])
    assert plots.curve_extent(curve, []) == (curve["kl"], curve["reward"])
    assert plots.sft_gold(recs) == pytest.approx(0.01)


def test_frontier_plot_draws_sweeps_with_both_interval_bars_and_the_exact_curve(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    captured = {}
    real_close = plt.close

    def keep(fig):  # look at the figure before it is closed
        captured["axes"] = fig.axes
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    exact = {"frontier": {"kl": [0.0, 1.0, 2.0, 4.0, 8.0], "reward": [0.0, 0.5, 0.7, 0.9, 1.0]},
             "baseline_gold_reward": 0.01}
    plots.frontier("exact", RECORDS, exact, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    ax, detail = captured["axes"]  # KL 0.1, 0.2 and 0.5 lie below 0.3 x 2.2: a detail panel up to 0.66
    assert detail.get_xlim()[1] == pytest.approx(0.3 * 2.2)
    assert len(detail.containers) == len(RECORDS)
    assert plots.detail_limit(RECORDS[:3]) is None  # only 2 of 3 variants below 0.6: no detail
    curve = next(line for line in ax.get_lines() if line.get_label() == "optimal pi*_beta (exact)")
    assert list(curve.get_xdata()) == [0.0, 1.0, 2.0, 4.0]  # cut past 1.3 x 2.2
    assert len(ax.containers) == len(RECORDS)  # one errorbar per variant
    for container in ax.containers:
        assert container.has_xerr and container.has_yerr
    joined = [line for line in ax.get_lines() if line.get_linestyle() == "-" and line is not curve]
    assert sorted(len(line.get_xdata()) for line in joined) == [2, 3]  # dpo's 2 and ppo's 3 variants joined
    markers = [c.lines[0].get_marker() for c in ax.containers]
    assert markers.count("s") == 2 and markers.count("o") == 3  # the default variants are squares


# --- cost -----------------------------------------------------------------------------------------
def test_process_seconds_are_read_back_and_summed_with_the_run_wall_times(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / BENCH_TIME).write_text(json.dumps({"process_seconds": 12.5, "cpu_seconds": 9.0}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / BENCH_TIME).write_text("not json")
    assert process_seconds(tmp_path / "a") == 12.5 and process_seconds(tmp_path / "a", "cpu_seconds") == 9.0
    assert process_seconds(tmp_path / "b") is None and process_seconds(tmp_path / "missing") is None
    spec = expand(load_suite("frontier"), get_registry())[0]
    runs = [RunResult(spec, {"wall_seconds": 4.0}, {}, True, 12.5, 9.0), RunResult(spec, {"wall_seconds": 3.0}, {}, False)]
    assert harness.timing(runs, 99.0) == {"run_wall_seconds": 7.0, "run_process_seconds": 12.5, "run_cpu_seconds": 9.0,
                                          "runs_without_process_time": 1, "elapsed_seconds": 99.0}



def test_execute_records_the_process_wall_and_cpu_time_of_each_run(tmp_path, monkeypatch):
    import os
    import sys

    from rlhf_zoo.bench.execute import STDERR_LOG, RunFailedError, execute

    spec = expand(load_suite("frontier"), get_registry())[0]
    busy = tmp_path / "busy"  # stands in for the Python that runs the worker: ~0.2 s of CPU, then exit 0
    busy.write_text("#!/bin/sh\ni=0\nwhile [ $i -lt 100000 ]; do i=$((i+1)); done\n")
    os.chmod(busy, 0o755)
    monkeypatch.setattr(sys, "executable", str(busy))
    execute(spec, tmp_path / "run", "cpu")
    recorded = json.loads((tmp_path / "run" / BENCH_TIME).read_text())
    assert 0.02 < recorded["cpu_seconds"] <= recorded["process_seconds"] + 0.05
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    os.chmod(failing, 0o755)
    monkeypatch.setattr(sys, "executable", str(failing))
    with pytest.raises(RunFailedError, match="boom"):
        execute(spec, tmp_path / "failed", "cpu")
    assert (tmp_path / "failed" / STDERR_LOG).read_text() == "boom\n"
    assert not (tmp_path / "failed" / BENCH_TIME).exists()  # a failed run is not a cost to report
