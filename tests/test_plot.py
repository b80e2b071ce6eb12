"""``zoo plot``: the curves drawn are the values in metrics.jsonl, several runs overlaid, PNGs written;
bad run directories are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_zoo.cli import main
from rlhf_zoo.plot import ema, plot_runs

pytest.importorskip("matplotlib")

SMOKE = ["--task", "exact", "--preset", "smoke", "--device", "cpu", "--quiet", "--eval-every", "1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("plot")
    runs = [root / "ppo", root / "dpo"]
    assert main(["run", "ppo", *SMOKE, "--out", str(runs[0])]) == 0
    assert main(["run", "dpo", *SMOKE, "--out", str(runs[1]), "--seed", "1"]) == 0
    return runs


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_plot_draws_every_metric_of_both_runs_with_the_logged_values(two_runs, tmp_path, capsys):
    assert main(["plot", *map(str, two_runs), "--out", str(tmp_path / "figs")]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(tmp_path / "figs" / "training.png"),
                                               "wrote", str(tmp_path / "figs" / "evaluation.png")]
    drawn = plot_runs(two_runs, tmp_path / "again")
    labels = {"ppo": "ppo exact s0 (ppo)", "dpo": "dpo exact s1 (dpo)"}
    for run in two_runs:
        label = labels[run.name]
        for row in rows(run):
            for key, value in row.items():
                if key == "iteration":
                    continue
                curves = drawn["evaluation"][key[5:]] if key.startswith("eval/") else drawn["training"][key]
                xs, ys = curves[label]
                assert value in [y for x, y in zip(xs, ys, strict=True) if x == row["iteration"]], (run, key)
    # a metric one algorithm logs is drawn for that run only; the evaluation curves hold both runs
    assert set(drawn["training"]["policy_loss"]) == {labels["ppo"]}
    assert set(drawn["training"]["reward_margin"]) == {labels["dpo"]}
    assert set(drawn["evaluation"]["gold_reward"]) == set(labels.values())
    assert drawn["evaluation"]["gold_reward"][labels["ppo"]][0] == [0, 1, 2]  # the start, and after each iteration


def test_the_pngs_are_images(two_runs, tmp_path):
    import matplotlib.image

    files = plot_runs(two_runs[:1], tmp_path)["files"]
    assert [f.name for f in files] == ["training.png", "evaluation.png"]
    for f in files:
        h, w, channels = matplotlib.image.imread(f).shape
        assert w > 400 and h > 200 and channels in (3, 4)


def test_default_out_is_the_first_runs_plots_dir_and_a_fresh_run_replaces_it(two_runs, tmp_path):
    run = tmp_path / "run"
    assert main(["run", "ppo", *SMOKE, "--out", str(run)]) == 0
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "training.png").is_file()
    assert main(["run", "ppo", *SMOKE, "--out", str(run), "--overwrite"]) == 0
    assert not (run / "plots").exists()  # a run's plots are its own: the new run does not keep the old ones


def test_ema_is_tensorboards_debiased_smoothing():
    assert ema([1.0, 3.0, 2.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75, (0.875 + 1.0) / 0.875])
    assert ema([4.0, 5.0], 0.0) == [4.0, 5.0]


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "{d} is not a directory; give run directories (zoo run --out)"),
    (lambda d: d.mkdir(), "{d} has no metrics.jsonl; is it a run directory (zoo run --out)?"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "{d}/metrics.jsonl has no rows yet (the run has "
     "not finished an iteration)"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"iteration": 1}\n{"iter')),
     "{d}/metrics.jsonl line 2 is not JSON (Unterminated string starting at: line 1 column 2 (char 1))"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1}\n')),
     "{d}/metrics.jsonl line 1 has no integer 'iteration'"),
])
def test_bad_run_directories_are_one_line(tmp_path, capsys, setup, message):
    d = tmp_path / "r"
    setup(d)
    assert main(["plot", str(d)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "zoo: error: " + message.format(d=d)
