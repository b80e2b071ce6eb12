"""``python -m rlhf_zoo.bench.worker SPEC_JSON``: one benchmark run in a fresh process.

A fresh process per run keeps runs independent: peak memory (the process's peak RSS on CPU) and wall
time are the run's own, and no state (caches, RNG, allocator) carries from one algorithm to the next.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    from rlhf_zoo.runner import run

    setup = spec.get("setup") or None
    run(spec["algorithm"], task=None if setup else spec["task"], seed=spec["seed"], out=spec["out"],
        device=spec["device"], preset=spec["preset"], options=spec["options"], progress=False, setup=setup,
        checkpoint_every=0,  # a benchmark resumes whole runs; per-iteration checkpoints would only cost time
        threads=spec.get("threads", "auto"))


if __name__ == "__main__":
    main(sys.argv[1:])
