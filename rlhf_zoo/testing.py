"""The conformance kit as a pytest fixture, for plugin authors' test suites.

In a plugin's ``tests/conftest.py``::

    pytest_plugins = ["rlhf_zoo.testing"]

and in a test::

    def test_my_algorithm_conforms(zoo_check):
        zoo_check("my-algorithm")          # fails with the failed checks' details

``zoo_check(name, task="exact", device="cpu")`` runs `rlhf_zoo.conformance.check_algorithm` in a
temporary directory and returns the results; skipped checks (e.g. checkpointing for an inference-only
algorithm) do not fail. On a model of your own: ``zoo_check(name, setup={"model": DIR, "reward": ("mod:fn",),
"prompts": FILE}, options={"dataset": FILE})`` (``options`` for the algorithms that read a ``dataset``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from rlhf_zoo.conformance import CheckResult, check_algorithm, format_results


@pytest.fixture
def zoo_check(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[CheckResult]]:
    def check(name: str, **kwargs: Any) -> list[CheckResult]:
        results = check_algorithm(name, tmp_path_factory.mktemp(f"zoo-check-{name}"), **kwargs)
        if any(r.passed is False for r in results):
            pytest.fail(f"conformance kit failed for {name!r}:\n{format_results(name, results)}", pytrace=False)
        return results

    return check
