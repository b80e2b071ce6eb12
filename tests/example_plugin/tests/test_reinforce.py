"""zoo-reinforce's own tests: the rlhf_zoo conformance kit through its pytest fixture, and the baseline."""

from importlib import metadata

import pytest
import torch

from rlhf_zoo import ConfigError

pytest_plugins = ["rlhf_zoo.testing"]  # provides the zoo_check fixture

try:  # the registry finds the algorithm through the installed distribution's entry point
    metadata.distribution("zoo-reinforce")
except metadata.PackageNotFoundError:
    pytest.skip("zoo-reinforce is not installed: run `pip install -e .` first", allow_module_level=True)

from zoo_reinforce import ReinforceConfig, leave_one_out_baseline  # noqa: E402


def test_reinforce_passes_the_conformance_kit(zoo_check):
    results = zoo_check("reinforce")  # smoke runs on `exact`; fails with the details of any failed check
    assert [r.status for r in results] == ["PASS"] * 6  # it trains, so the checkpoint check runs too


def test_leave_one_out_baseline_is_the_mean_of_the_other_responses():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])  # two prompts, k = 3
    assert leave_one_out_baseline(returns, 3).tolist() == [2.5, 2.0, 1.5, 25.0, 20.0, 15.0]


def test_leave_one_out_needs_two_responses_per_prompt():
    with pytest.raises(ConfigError, match="k >= 2"):
        ReinforceConfig(k=1)
    assert ReinforceConfig(k=1, baseline="mean").k == 1
