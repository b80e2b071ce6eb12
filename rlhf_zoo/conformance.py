"""The conformance kit: the invariants that hold for ANY algorithm (docs/plugins.md section 8), checked by
running it. ``zoo check ALGO`` prints the checks; `rlhf_zoo.testing` offers them as a pytest fixture.

The kit runs the algorithm's ``smoke`` preset (every algorithm must have one) through the real runner on
a task (``exact`` by default: it builds in seconds), or on a user's own model (``zoo check --model DIR
--reward SPEC --prompts FILE --dataset FILE``: ``setup`` and ``options`` of `check_algorithm`), and checks:

  config       the config is a frozen `AlgoConfig` dataclass, every field has help text, the smoke
               preset constructs, and out-of-range values of each field (negative, zero, NaN, empty, a
               wrong choice) construct or give the one-line error, never another exception
  update       the run changes every trainable parameter (policy and reward-model algorithms) or none
               (inference algorithms such as best-of-N)
  reference    the reference policy is bit-for-bit unchanged and frozen
  finite       every logged metric and every summary figure is finite
  determinism  a second run with the same seed gives bit-identical weights, metrics and summary figures
  checkpoint   a run resumed from its first checkpoint (as after a crash right after it) ends bit-identical
               to the uninterrupted run: the policy, the tracked state and the RNGs round-trip exactly
               (skipped for inference algorithms, which train nothing)
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rlhf_zoo.checkpoint import complete_checkpoints
from rlhf_zoo.config import AlgoConfig
from rlhf_zoo.errors import ConfigError, NonFiniteError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.registry import Registry, build_registry

CHECKS = ("config", "update", "reference", "finite", "determinism", "checkpoint")
KEEP_ALL = 10**6


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool | None  # None: skipped
    detail: str

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


class _Probe:
    """A plugin that records what the runner's hooks see: the starting weights and the reference."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}
        self.reference_changed: list[str] = []
        self.reference_trainable = False

    @hookimpl
    def on_run_start(self, run: Any) -> None:
        self.start = {n: p.detach().clone() for n, p in run.policy.named_parameters() if p.requires_grad}
        self.reference = {k: v.clone() for k, v in run.reference.state_dict().items()}

    @hookimpl
    def on_run_end(self, run: Any, summary: dict[str, Any]) -> None:
        now = run.reference.state_dict()
        self.reference_changed = [k for k, v in self.reference.items() if not torch.equal(v, now[k])]
        self.reference_trainable = any(p.requires_grad for p in run.reference.parameters())


def _odd_values(tp: Any) -> tuple[Any, ...]:
    """Values a user may give a field of type ``tp`` that are often out of its range."""
    if tp is bool:
        return ()
    if tp is int:
        return (-1, 0, 10**12)
    if tp is float:
        return (-1.0, 0.0, math.nan, math.inf)
    if tp is str:
        return ("", "zoo-check-no-such-value")
    if typing.get_origin(tp) is typing.Literal:
        return ("zoo-check-no-such-choice",)
    return ()


def invalid_value_problems(cls: type, options: dict[str, Any] | None = None) -> list[str]:
    """Each field set to odd values (negative, zero, NaN, empty, a wrong choice) over the smoke preset: the
    config must construct or raise a one-line `ConfigError` (a ``ValueError``/``TypeError`` from the
    plugin's ``__post_init__`` becomes one in `AlgoConfig.from_dict`); any other exception, e.g. an
    ``assert`` or a ``ZeroDivisionError``, would reach the user as a traceback."""
    problems = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        for value in _odd_values(hints[f.name]):
            try:
                cls.from_dict({**(options or {}), f.name: value}, preset="smoke")
            except ConfigError as e:
                if len(str(e).strip().splitlines()) > 1:
                    problems.append(f"{f.name}={value!r}: the error is more than one line")
            except Exception as e:  # noqa: BLE001 - reported as the check's failure
                first = (str(e).strip().splitlines() or [""])[0]
                problems.append(f"{f.name}={value!r} raised {type(e).__name__}: {first} (raise ValueError or "
                                "ConfigError in __post_init__ for a value out of range, not another exception)")
                break
    return problems[:3]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    for kind in ("policy", "model"):  # reward-model algorithms save model/
        path = out / kind / "model.safetensors"
        if path.is_file():
            return load_file(str(path))
    raise FileNotFoundError(f"{out} has no policy/ or model/ weights")


def _numbers(x: Any, where: str) -> list[tuple[str, float]]:
    if isinstance(x, bool):
        return []
    if isinstance(x, (int, float)):
        return [(where, float(x))]
    if isinstance(x, dict):
        return [n for k, v in x.items() for n in _numbers(v, f"{where}.{k}" if where else str(k))]
    if isinstance(x, list):
        return [n for i, v in enumerate(x) for n in _numbers(v, f"{where}[{i}]")]
    return []


def _metrics(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if "time" not in k and "seconds" not in k} for r in rows]


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without what depends on the clock or the machine."""
    skip = ("seconds", "per_second", "memory", "phase")
    return {k: v for k, v in summary.items() if not any(s in k for s in skip)}


def _weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def check_algorithm(
    name: str,
    workdir: str | Path,
    *,
    task: str = "exact",
    device: str = "cpu",
    seed: int = 0,
    registry_factory: Callable[[dict[str, Any]], Registry] = build_registry,
    progress: bool = False,
    setup: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> list[CheckResult]:
    """Run the kit on algorithm ``name``; runs go under ``workdir``. Returns one result per check.

    ``setup``: run on the user's own model instead of ``task`` (the ``zoo run`` setup options, keys
    `rlhf_zoo.runner.SETUP_KEYS`: ``model`` and, as the algorithm needs them, ``reward``, ``prompts``, ...);
    ``options``: config values on top of the smoke preset (e.g. ``dataset`` for sft, dpo, reward-model)."""
    from rlhf_zoo.runner import run

    workdir = Path(workdir)
    results: list[CheckResult] = []
    registry = registry_factory({})
    algo = registry.algorithm(name)
    cls = algo.config_cls

    # config
    problems = []
    if not (isinstance(cls, type) and issubclass(cls, AlgoConfig) and dataclasses.is_dataclass(cls)):
        problems.append(f"{cls!r} is not an AlgoConfig dataclass")
    elif not cls.__dataclass_params__.frozen:
        problems.append("the config dataclass is not frozen")
    else:
        problems += [f"field {f.name!r} has no help text" for f in dataclasses.fields(cls) if not f.metadata.get("help")]
        if "smoke" not in cls.presets:
            problems.append("no 'smoke' preset (the kit runs it: a run of a few seconds)")
        else:
            try:
                cls.from_dict(dict(options or {}), preset="smoke")
            except Exception as e:  # noqa: BLE001 - reported as the check's failure
                problems.append(f"the smoke preset does not construct: {e}")
            else:
                problems += invalid_value_problems(cls, options)
    results.append(CheckResult("config", not problems, "; ".join(problems) or
                               f"frozen {cls.__name__}, {len(dataclasses.fields(cls))} fields with help, "
                               f"smoke preset valid"))
    if problems:
        return results + [CheckResult(c, None, "not run: the config check failed") for c in CHECKS[1:]]

    def one_run(out: Path, **kwargs: Any) -> tuple[dict[str, Any], _Probe]:
        probe = _Probe()
        summary = run(name, task=None if setup else task, seed=seed, out=out, device=device, preset="smoke",
                      progress=progress, keep_checkpoints=KEEP_ALL, options=dict(options or {}),
                      registry=registry_factory({"zoo-check-probe": probe}), setup=dict(setup or {}) or None,
                      **kwargs)
        return summary, probe

    a_dir, b_dir, c_dir = workdir / "run-a", workdir / "run-b", workdir / "run-resumed"
    for d in (a_dir, b_dir, c_dir):
        shutil.rmtree(d, ignore_errors=True)
    try:
        summary_a, probe = one_run(a_dir, checkpoint_every=1)
    except Exception as e:  # noqa: BLE001 - the run's failure is the check's result
        failing = "finite" if isinstance(e, NonFiniteError) else "update"
        return results + [CheckResult(c, False, f"the smoke run failed: {type(e).__name__}: {e}") if c == failing
                          else CheckResult(c, None, "not run: the smoke run failed") for c in CHECKS[1:]]
    final = _final_weights(a_dir)

    # update
    common = [k for k in probe.start if k in final]
    changed = [k for k in common if not torch.equal(probe.start[k], final[k])]
    if algo.kind == "inference":
        ok, detail = not changed, (f"an inference algorithm left all {len(common)} policy tensors unchanged" if not changed
                                   else f"an inference algorithm changed {changed[:3]}")
    elif not common:
        ok, detail = False, "the saved model shares no parameter name with the starting policy"
    else:
        unchanged = sorted(set(common) - set(changed))
        ok = not unchanged
        detail = (f"changed {len(changed)}/{len(common)} trainable tensors" if ok
                  else f"{len(unchanged)}/{len(common)} trainable tensors unchanged, e.g. {unchanged[:3]}")
    results.append(CheckResult("update", ok, detail))

    # reference
    ok = not probe.reference_changed and not probe.reference_trainable
    detail = ("unchanged and frozen" if ok else
              f"changed: {probe.reference_changed[:3]}" if probe.reference_changed else "has trainable parameters")
    results.append(CheckResult("reference", ok, detail))

    # finite
    bad = [(w, v) for row in _metrics(a_dir) for w, v in _numbers(row, f"metrics[{row.get('iteration')}]")
           if not math.isfinite(v)]
    bad += [(w, v) for w, v in _numbers(_figures(summary_a), "summary") if not math.isfinite(v)]
    n_rows = len(_metrics(a_dir))
    results.append(CheckResult("finite", not bad, f"{n_rows} metric rows and the summary are finite" if not bad
                               else f"non-finite: {bad[:3]}"))

    # determinism
    summary_b, _ = one_run(b_dir, checkpoint_every=0)
    diff = _weight_diff(final, _final_weights(b_dir))
    problems = [f"weights differ: {diff[:3]}"] if diff else []
    if _metrics(a_dir) != _metrics(b_dir):
        problems.append("metrics.jsonl differs")
    fa, fb = _figures(summary_a), _figures(summary_b)
    problems += [f"summary {k}: {fa.get(k)} vs {fb.get(k)}" for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)][:3]
    results.append(CheckResult("determinism", not problems, "; ".join(problems) or
                               "two runs with the same seed: identical weights, metrics and summary"))

    # checkpoint: resume from the first checkpoint as after a crash right after it
    checkpoints = complete_checkpoints(a_dir / "checkpoints")
    if algo.kind == "inference":
        results.append(CheckResult("checkpoint", None, "inference algorithm: no training state to checkpoint"))
        return results
    if not checkpoints:
        results.append(CheckResult("checkpoint", False, "no checkpoint was written: loop over ctx.iterations() "
                                   "and register the loop's state with ctx.track()"))
        return results
    first = checkpoints[0]
    c_dir.mkdir(parents=True)
    for f in ("config.json", "metrics.jsonl"):
        shutil.copy(a_dir / f, c_dir / f)
    shutil.copytree(first, c_dir / "checkpoints" / first.name)
    summary_c, _ = one_run(c_dir, checkpoint_every=1, resume=True)
    diff = _weight_diff(final, _final_weights(c_dir))
    problems = [f"weights differ: {diff[:3]}"] if diff else []
    if _metrics(a_dir) != _metrics(c_dir):
        problems.append("metrics.jsonl differs")
    fc = _figures(summary_c)
    problems += [f"summary {k}: {fa.get(k)} vs {fc.get(k)}" for k in sorted(fa.keys() | fc.keys()) if fa.get(k) != fc.get(k)][:3]
    total = json.loads((first / "checkpoint.json").read_text()).get("total")
    results.append(CheckResult("checkpoint", not problems, "; ".join(problems) or
                               f"resumed from {first.name} of {total}: identical to the uninterrupted run"))
    return results


def format_results(name: str, results: list[CheckResult]) -> str:
    lines = [f"  {r.status}  {r.name:<12} {r.detail}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(f"{name}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return "\n".join(lines)
