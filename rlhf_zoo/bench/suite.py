"""Benchmark suites: which algorithms, tasks, seeds, preset, and knob sweeps; expanded into runs.

A suite is a JSON object (``benchmarks/suites/NAME.json``)::

    {"description": "...",
     "algorithms": ["ppo", "dpo"], "tasks": ["exact"], "seeds": [0, 1, 2],   # or "seeds": 3 for 0..2
     "preset": "quick",                                                     # "default": no preset
     "options": {"ppo": {"iterations": 100}},           # optional fixed overrides per algorithm
     "evaluation": {"eval_prompts": 64, "eval_samples": 4},  # optional: the same evaluation for all
     "sweeps": {"ppo": {"beta": [0.03, 0.3, 1.0]}},     # optional: one extra variant per value
     "setups": {"mine": {"model": "sft/policy", "reward": ["rm/model"],  # optional: worlds of your own
                         "prompts": "prompts.jsonl", "gold": "judge:score"}}}

A name in ``tasks`` is a built-in task, or a key of ``setups``: a run on your own model with those
``zoo run`` options (``model`` required; keys as the options without dashes, e.g. ``ref_model``; paths
relative to the working directory). Give ``gold`` to compare algorithms on a gold reward, as on the
built-in tasks (docs/your-own-model.md).

Every algorithm runs its ``default`` variant (the preset plus ``options``); each sweep value adds a
variant that changes that one knob (one knob at a time, not a grid). Runs are ordered seed-major, so an
interrupted benchmark has balanced seeds across algorithms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_zoo.config import read_json_object
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.registry import Registry

SUITE_KEYS = {"description", "algorithms", "tasks", "seeds", "preset", "options", "sweeps", "evaluation", "setups"}
EVALUATION_KEYS = {"eval_prompts", "eval_samples", "max_new_tokens", "temperature"}  # fields of AlgoConfig
DEFAULT_VARIANT = "default"
SUITES_DIR = Path("benchmarks") / "suites"


@dataclass(frozen=True)
class Suite:
    name: str
    algorithms: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    preset: str = "default"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweeps: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    description: str = ""
    #: evaluation settings applied to every algorithm (after its preset), so every run, and the SFT
    #: baseline evaluated beside it, is scored on the same prompts with the same number of samples
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: worlds of the user's own (name -> `rlhf_zoo.runner.make_context` ``setup``), named in ``tasks``
    setups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "algorithms": list(self.algorithms),
                "tasks": list(self.tasks), "seeds": list(self.seeds), "preset": self.preset,
                "options": self.options, "sweeps": self.sweeps, "evaluation": self.evaluation,
                **({"setups": self.setups} if self.setups else {})}


@dataclass(frozen=True)
class RunSpec:
    """One run: ``runner.run(algorithm, task=task, seed=seed, preset=preset, options=options)``."""

    algorithm: str
    task: str
    seed: int
    variant: str
    preset: str
    options: dict[str, Any]
    config: dict[str, Any]  # the resolved config (preset + options), checked against a resumed run
    setup: dict[str, Any] = field(default_factory=dict)  # a world of the user's own (``task`` is its name)

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / self.task / self.algorithm / self.variant / f"seed{self.seed}"


def suite_path(name_or_path: str) -> Path:
    """A path to a suite file, or a name in ``benchmarks/suites`` (of the working directory, then of the
    source checkout)."""
    given = Path(name_or_path)
    if given.suffix == ".json" or given.exists():
        if not given.is_file():
            raise ConfigError(f"suite file {given} not found")
        return given
    roots = [Path.cwd() / SUITES_DIR, Path(__file__).resolve().parents[2] / SUITES_DIR]
    for root in roots:
        if (root / f"{name_or_path}.json").is_file():
            return root / f"{name_or_path}.json"
    known = sorted({p.stem for r in roots if r.is_dir() for p in r.glob("*.json")})
    raise ConfigError(f"unknown suite {name_or_path!r}; known: {', '.join(known) or '(none)'} "
                      f"(or give a path to a .json file)")


def seed_list(seeds: int | list[int]) -> tuple[int, ...]:
    """``N`` -> seeds 0..N-1; a list is kept as given (paired across algorithms by value)."""
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
        raise ConfigError(f"seeds must be a count or a list of ints, got {seeds!r}")
    out = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    if not out or any(not isinstance(s, int) or isinstance(s, bool) for s in out) or len(set(out)) != len(out):
        raise ConfigError(f"seeds must be distinct ints and at least one, got {seeds!r}")
    return out


def load_suite(name_or_path: str) -> Suite:
    path = suite_path(name_or_path)
    data = read_json_object(path, "suite")
    unknown = sorted(set(data) - SUITE_KEYS)
    missing = sorted({"algorithms", "tasks", "seeds"} - set(data))
    if unknown or missing:
        raise ConfigError(f"suite {path}: unknown key(s) {unknown}, missing key(s) {missing}; "
                          f"known: {', '.join(sorted(SUITE_KEYS))}")
    return Suite(name=path.stem, algorithms=tuple(data["algorithms"]), tasks=tuple(data["tasks"]),
                 seeds=seed_list(data["seeds"]), preset=data.get("preset", "default"),
                 options=data.get("options", {}), sweeps=data.get("sweeps", {}),
                 evaluation=data.get("evaluation", {}), setups=_setups(data.get("setups", {}), path),
                 description=data.get("description", ""))


def _setups(setups: Any, path: Path) -> dict[str, dict[str, Any]]:
    from rlhf_zoo.runner import SETUP_KEYS

    if not isinstance(setups, dict):
        raise ConfigError(f"suite {path}: setups must map names to objects of zoo run options, got {setups!r}")
    for name, setup in setups.items():
        if not isinstance(setup, dict) or "model" not in setup:
            raise ConfigError(f"suite {path}: setup {name!r} must be an object with at least a 'model'")
        unknown = sorted(set(setup) - set(SETUP_KEYS))
        if unknown:
            raise ConfigError(f"suite {path}: setup {name!r} has unknown key(s) {unknown}; known: {', '.join(SETUP_KEYS)}")
        if isinstance(setup.get("reward"), str):
            setup["reward"] = [setup["reward"]]
    return setups


def variants(suite: Suite, algorithm: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) of the default variant and of each sweep value, e.g. ``("beta=0.3", {...})``."""
    bad = sorted(set(suite.evaluation) - EVALUATION_KEYS)
    if bad:
        raise ConfigError(f"suite {suite.name}: evaluation keys {bad} unknown; known: {sorted(EVALUATION_KEYS)}")
    base = {**suite.evaluation, **suite.options.get(algorithm, {})}
    out = [(DEFAULT_VARIANT, base)]
    for knob, values in suite.sweeps.get(algorithm, {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep {algorithm}.{knob}: expected a non-empty list of values, got {values!r}")
        out += [(f"{knob}={v}", {**base, knob: v}) for v in values]
    return out


def expand(suite: Suite, registry: Registry) -> list[RunSpec]:
    """Every run of the suite, seed-major; configs are resolved (and so validated) before anything runs.
    A sweep value whose config equals an earlier variant's is dropped (it would repeat the same run)."""
    for name in (*suite.options, *suite.sweeps):
        if name not in suite.algorithms:
            raise ConfigError(f"suite {suite.name}: options or sweeps for {name!r}, which is not among its "
                              f"algorithms ({', '.join(suite.algorithms)})")
    for task in suite.tasks:
        if task not in suite.setups:
            registry.task(task)  # unknown task: a clear error now, not after an hour of runs
    resolved: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    for algorithm in suite.algorithms:
        cls = registry.algorithm(algorithm).config_cls
        seen: list[dict[str, Any]] = []
        for label, options in variants(suite, algorithm):
            try:
                config = json.loads(json.dumps(cls.from_dict(options, preset=suite.preset).to_dict()))
            except ConfigError as e:
                raise ConfigError(f"suite {suite.name}, {algorithm} variant {label}: {e}") from None
            if config not in seen:
                seen.append(config)
                resolved.append((algorithm, label, options, config))
    return [RunSpec(algorithm, task, seed, label, suite.preset, options, config, suite.setups.get(task, {}))
            for seed in suite.seeds for task in suite.tasks for algorithm, label, options, config in resolved]
