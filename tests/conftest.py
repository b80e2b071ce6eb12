"""Shared fixtures. The task cache is ``$RLHF_ZOO_CACHE`` when set, else the default ``~/.cache/rlhf_zoo``."""

from __future__ import annotations

import pytest

collect_ignore = ["example_plugin"]  # its own test suite, run by tests/test_example_plugin.py once installed


@pytest.fixture(scope="session")
def exact_task():
    """The ``exact`` task (seed 0), built into the cache on first use."""
    from rlhf_zoo.registry import get_registry

    return get_registry().task("exact").load(seed=0, progress=False)
