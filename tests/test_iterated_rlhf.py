"""iterated-rlhf: rounds of sample, label, retrain the reward model, RL; the upfront control; the
conformance kit (determinism and exact resume across rounds); one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhf_zoo.cli import main
from rlhf_zoo.conformance import check_algorithm
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.runner import run
from rlhf_zoo_plugins.iterated_rlhf import IteratedRLHFConfig, Labeler, Rankings


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("iterated") / "run"
    summary = run("iterated-rlhf", task="exact", seed=0, out=out, device="cpu", preset="smoke", progress=False)
    return out, summary


def test_each_round_reports_gold_proxy_kl_and_the_reward_models_accuracy(smoke_run):
    out, summary = smoke_run
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["new_rankings"] == 8  # smoke: 8 prompts per round, each one ranking of K responses
        assert 0.0 <= r["rm_accuracy_after"] <= 1.0
        assert np.isfinite([r["gold_reward"], r["proxy_reward"], r["kl_to_ref"]]).all()
    assert "rm_accuracy_before" not in rounds[0]  # no earlier reward model to measure in round 1
    assert 0.0 <= rounds[1]["rm_accuracy_before"] <= 1.0
    assert rounds[1]["rankings_total"] == rounds[0]["rankings_total"] + 8  # old + every new ranking
    for r in (1, 2):  # each round's online algorithm logged its own iterations
        lines = (out / "rounds" / f"round-{r}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["iteration"] for x in lines] == [1, 2]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert summary["inner_algorithm"] == "ppo" and summary["label_schedule"] == "iterated"


def test_upfront_labels_as_many_rankings_once(tmp_path):
    summary = run("iterated-rlhf", task="exact", seed=0, out=tmp_path / "run", device="cpu", preset="smoke",
                  progress=False, options={"label_schedule": "upfront"})
    first, second = summary["rounds"]
    assert first["new_rankings"] == 16  # rounds x prompts_per_round, all from the starting policy
    assert "new_rankings" not in second and second["rankings_total"] == first["rankings_total"]
    assert 0.0 <= second["rm_accuracy_before"] <= 1.0  # the fixed reward model, measured where the policy is now


def test_conformance_kit_passes_including_exact_resume_across_rounds(tmp_path):
    results = check_algorithm("iterated-rlhf", tmp_path, task="exact", device="cpu")
    failed = [f"{r.name}: {r.detail}" for r in results if r.passed is False]
    assert not failed, failed
    assert {r.name for r in results if r.passed} >= {"update", "reference", "finite", "determinism", "checkpoint"}


def test_an_offline_or_inference_algorithm_is_refused(tmp_path, capsys):
    for algo in ("dpo", "best-of-n", "sft"):
        code = main(["run", "iterated-rlhf", "--task", "exact", "--preset", "smoke", "--algorithm", algo, "--quiet",
                     "--out", str(tmp_path / algo)])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("zoo: error: --algorithm") and "Traceback" not in err


def test_config_checks():
    with pytest.raises(ConfigError, match="algorithm_config must be a JSON object"):
        IteratedRLHFConfig(algorithm_config="{iterations: 3}")
    with pytest.raises(ConfigError, match="k must be >= 2"):
        IteratedRLHFConfig(k=1)


class _Ctx:
    """What `Labeler` reads of a run context, for a world scored by hand."""

    def __init__(self, task):
        self.task, self.seed, self.device, self.registry = task, 0, torch.device("cpu"), None


def test_labeler_at_temperature_zero_ranks_by_the_score_and_rankings_round_trip():
    class World:
        has_gold, objectives, manifest = True, ("gold",), {}

        def gold(self, prompts, responses):
            raise AssertionError("the labelers rank by what they perceive, not the gold")

        def labeler_view(self, prompts, responses):
            return {"gold": np.array([float(len(r)) for r in responses])}

    labeler = Labeler(_Ctx(World()), IteratedRLHFConfig())
    labeler.tau = 0.0
    orders, margins, scores = labeler(["p", "q"], [["aa", "a", "aaa"], ["b", "bbb", "bb"]])
    assert orders == [[2, 0, 1], [1, 2, 0]] and scores == [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]
    assert margins == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    kept = Rankings()
    kept.prompt_ids, kept.response_ids, kept.margins = [[1, 2]], [[[3], [4]]], [[0.5]]
    kept.gold, kept.round, kept.heldout = [[1.0, 0.0]], [1], [False]
    again = Rankings()
    again.load_state_dict(json.loads(json.dumps(kept.state_dict())))
    assert again == kept
