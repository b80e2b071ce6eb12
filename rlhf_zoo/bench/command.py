"""What ``zoo bench`` does with its options: build the suite (a suite file, or the ad hoc form from
``--algos/--tasks/--seeds/--preset``), run it, and say where the results are."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rlhf_zoo.bench.harness import run_bench
from rlhf_zoo.bench.suite import Suite, load_suite, seed_list
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.runner import DEFAULT_TASK

ADHOC = "adhoc"


def _names(value: str, what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--{what} needs at least one name (comma-separated), got {value!r}")
    return names


def build_suite(suite: str | None, algos: str | None, tasks: str | None, seeds: int | None,
                preset: str | None) -> tuple[Suite, list[str]]:
    """The suite to run and the options that name it in the recorded command."""
    if suite is not None:
        extra = [n for n, v in (("--algos", algos), ("--tasks", tasks), ("--seeds", seeds), ("--preset", preset))
                 if v is not None]
        if extra:
            raise ConfigError(f"--suite takes its algorithms, tasks, seeds and preset from the suite file; "
                              f"drop {', '.join(extra)} or write another suite")
        return load_suite(suite), ["--suite", suite]
    if algos is None:
        raise ConfigError("give --suite NAME|PATH, or --algos A,B (with optional --tasks, --seeds, --preset)")
    s = Suite(name=ADHOC, algorithms=_names(algos, "algos"), tasks=_names(tasks or DEFAULT_TASK, "tasks"),
              seeds=seed_list(3 if seeds is None else seeds), preset=preset or "default")
    args = ["--algos", ",".join(s.algorithms), "--tasks", ",".join(s.tasks), "--seeds", str(len(s.seeds)),
            "--preset", s.preset]
    return s, args


def bench(*, out: Path, suite: str | None = None, algos: str | None = None, tasks: str | None = None,
          seeds: int | None = None, preset: str | None = None, device: str = "auto",
          progress: bool = True, threads: int | str = "auto") -> dict[str, Any]:
    """Run ``zoo bench``; returns results.json's content. ``threads``: every run's ``--threads``."""
    the_suite, args = build_suite(suite, algos, tasks, seeds, preset)
    command = shlex.join(["zoo", "bench", *args, "--out", str(out), "--device", device, "--threads", str(threads)])
    return run_bench(the_suite, out, device=device, progress=progress, command=command, threads=threads)
