"""How many torch threads a run uses (``--threads``, default ``auto``): the policy, in one place.

On a CPU, torch's default (one intra-op thread per core) is the worst choice when cores are shared: with
two threads on a 2-core machine under load, a `grpo` quick run on `exact` took 783-1171 s against 73 s with
one thread (issue 15), because each thread of an oversubscribed pool waits for the slowest at every op.
The built-in tasks' models are tiny (hidden size 32-64), so per-op overhead dominates and a second thread
buys little even on an idle machine. benchmarks/threads.py measures the choice (benchmarks/results/threads.md).

``--threads N`` sets N. ``auto`` (`auto_threads`, a pure function of the facts `choose_threads` gathers):

1. ``OMP_NUM_THREADS`` (else ``MKL_NUM_THREADS``) set in the environment wins, as torch itself honours it;
   torchrun sets ``OMP_NUM_THREADS=1`` per process when it is unset, except under ``zoo run --nproc``,
   whose launcher marks the value it sets (`LAUNCHER_MARK`) so that the ranks apply the rest of the policy;
2. one thread on a built-in task (`TINY_TASKS`), or when the 1-minute load average already exceeds
   (usable cores - 1): the machine is busy and more threads would only oversubscribe it;
3. otherwise the usable cores (``os.sched_getaffinity``) divided by the processes on this machine
   (``LOCAL_WORLD_SIZE`` under torchrun / ``--nproc``), at least 1.

Thread count is not part of a run's identity (``--resume`` does not compare it), but float sums split over
another number of threads add in another order: runs are bit-for-bit repeatable only at the same count
(docs/decisions.md). Task builds fix their own count (`rlhf_zoo_envs.tasks.build.BUILD_THREADS`).

No torch import at module level: the CLI parses ``--threads`` before it loads torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

AUTO = "auto"
#: the built-in tasks, whose models are tiny: one thread per process under ``auto``
TINY_TASKS = frozenset({"exact", "sentiment", "hh"})
#: environment variables that set torch's thread count, in the order torch reads them
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: set by ``zoo run --nproc``'s launcher to the OMP_NUM_THREADS it sets (so torchrun neither sets one nor
#: warns); a rank that finds the two equal treats OMP_NUM_THREADS as unset by the user
LAUNCHER_MARK = "RLHF_ZOO_LAUNCHER_OMP"

Threads = Union[int, str, None]  # N >= 1, "auto", or None (leave the process's setting alone)


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count of a run and why (config.json's ``torch_threads``, ``torch_threads_reason``)."""

    threads: int
    reason: str


def parse_threads(value: object) -> int | str:
    """``--threads``: ``"auto"`` or a whole number >= 1 (an int, or its text). ConfigError otherwise."""
    from rlhf_zoo.errors import ConfigError

    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        n = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--threads {value!r}: expected auto or a whole number of threads >= 1")
    return n


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The machine's 1-minute load average, or None where the OS gives none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def user_thread_env(env: Mapping[str, str]) -> tuple[str, int] | None:
    """(name, value) of the thread-count variable the user set (`THREAD_ENV_VARS`, first valid one), or None.
    An OMP_NUM_THREADS that ``zoo run --nproc``'s launcher set (`LAUNCHER_MARK`) is not the user's."""
    for name in THREAD_ENV_VARS:
        raw = env.get(name)
        if raw is None or (name == "OMP_NUM_THREADS" and env.get(LAUNCHER_MARK) == raw):
            continue
        try:
            n = int(raw.strip())
        except ValueError:
            continue  # (not a count torch can use either, e.g. OpenMP's nested "4,2")
        if n >= 1:
            return name, n
    return None


def auto_threads(*, cores: int, local_world_size: int = 1, load: float | None = None, tiny_task: bool = False,
                 env: Mapping[str, str] | None = None) -> ThreadChoice:
    """``--threads auto`` (see the module docstring): a pure function of the usable ``cores``, the processes
    on this machine, the 1-minute ``load`` average (None: unknown), whether the task is a built-in tiny one
    and the environment."""
    given = user_thread_env(env or {})
    if given is not None:
        name, n = given
        return ThreadChoice(n, f"auto: {name}={n} in the environment (torch honours it; --threads overrides it)")
    cores, ranks = max(1, int(cores)), max(1, int(local_world_size))
    if tiny_task:
        return ThreadChoice(1, "auto: a built-in task (tiny models, per-op overhead dominates): 1 thread per process")
    if load is not None and load > cores - 1:
        return ThreadChoice(1, f"auto: 1-minute load average {load:.2f} > {cores - 1} (usable cores {cores} - 1): "
                               "1 thread, the cores are busy")
    n = max(1, cores // ranks)
    per = f" // {ranks} processes on this machine" if ranks > 1 else ""
    return ThreadChoice(n, f"auto: {cores} usable cores{per}")


def choose_threads(requested: Threads, *, task: str | None = None, own_model: bool = False,
                   env: Mapping[str, str] | None = None) -> ThreadChoice:
    """The run's thread count: ``requested`` N, ``auto`` (`auto_threads` on this machine's facts; ``task``
    is the built-in task's name, ``own_model`` a run on the user's own model), or None: the process's
    current setting, left alone (`rlhf_zoo.runner.run` called from Python without ``threads``)."""
    env = os.environ if env is None else env
    if requested is None:
        import torch

        return ThreadChoice(torch.get_num_threads(), "the calling process's setting (threads=None leaves it)")
    requested = parse_threads(requested)
    if requested != AUTO:
        given = user_thread_env(env)
        over = f" (over {given[0]}={given[1]} in the environment)" if given and given[1] != requested else ""
        return ThreadChoice(int(requested), f"--threads {requested}{over}")
    try:
        ranks = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        ranks = 1
    return auto_threads(cores=usable_cores(), local_world_size=ranks, load=load_average(),
                        tiny_task=not own_model and task in TINY_TASKS, env=env)


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra-op threads to ``choice.threads``, and its inter-op threads too where torch still
    allows it (once per process, before any inter-op work). Returns ``choice``."""
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    try:
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:  # already set, or inter-op work has started: the pool keeps its size
        pass
    return choice


def launcher_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment ``zoo run --nproc`` starts torchrun with: where the user set no OMP_NUM_THREADS, one
    (1, torchrun's own default, so it does not warn) marked as the launcher's (`LAUNCHER_MARK`), so that each
    rank's ``auto`` gives it usable cores // processes instead."""
    out = dict(env)
    if "OMP_NUM_THREADS" not in out:
        out["OMP_NUM_THREADS"] = out[LAUNCHER_MARK] = "1"
    return out
