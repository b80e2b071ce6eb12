"""Configuration: frozen dataclasses whose fields carry help text.

An algorithm's config derives from `AlgoConfig` (or `DatasetConfig`, when it trains on a user dataset). Each field becomes a ``zoo run ALGO`` option and a
key of a config file; ``presets`` maps a preset name to field overrides (``quick`` is a run of under a
minute on two CPU cores). Validation happens in ``__post_init__`` and raises `ConfigError`; a plugin's
``__post_init__`` may also raise ``ValueError`` or ``TypeError``, which `AlgoConfig.from_dict` turns into
a `ConfigError` (the CLI's one-line error).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

from rlhf_zoo.errors import ConfigError


def option(default: Any, help: str) -> Any:
    """A dataclass field with help text (shown by ``zoo run ALGO --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AlgoConfig:
    """Fields every algorithm has. Algorithms add their own in a subclass."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the name of the field that holds the KL coefficient beta of the RLHF objective (PPO's penalty,
    #: DPO's beta), or None when the algorithm has none. Only the declared field sets the environment's
    #: KL penalty and the evaluation's pi*_beta; a field that merely happens to be called ``beta`` does not.
    kl_coefficient: ClassVar[str | None] = None

    eval_prompts: int = option(64, "Held-out prompts used for the final evaluation.")
    eval_samples: int = option(4, "Responses sampled per evaluation prompt.")
    eval_every: int = option(0, "Also evaluate every N iterations (and before the first) on the same held-out "
                                "prompts; figures go to metrics.jsonl as eval/* (0: only the final evaluation).")
    max_new_tokens: int = option(0, "Response length cap in tokens (0: the task's default).")
    temperature: float = option(1.0, "Sampling temperature (log-probs are taken at this temperature).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(type(self), f.name, getattr(self, f.name))
        check_positive(self, "eval_prompts", "eval_samples", "temperature")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0 (0: only the final evaluation), got {self.eval_every}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], preset: str | None = None) -> AlgoConfig:
        """Build a config from a preset and overrides; unknown keys raise `ConfigError`."""
        merged: dict[str, Any] = {}
        if preset not in (None, "default"):
            if not isinstance(preset, str) or preset not in cls.presets:
                known = ", ".join(["default", *sorted(cls.presets)])
                raise ConfigError(f"unknown preset {preset!r} for {cls.__name__}; known: {known}")
            merged.update(cls.presets[preset])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) if str(k).isidentifier() else repr(k) for k in values if k not in names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        merged.update({k: v for k, v in values.items() if v is not None})
        for k, v in merged.items():  # before the plugin's __post_init__ sees a value of the wrong type
            _check_type(cls, k, v)
        try:
            return cls(**merged)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # a plugin's own validation: the same one line as ConfigError
            raise ConfigError(" ".join(str(e).split()) or f"invalid {cls.__name__}: {type(e).__name__}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def kl_coefficient_value(self) -> float | None:
        """The declared KL coefficient's value (None: not declared, or unset: the world's default)."""
        return None if self.kl_coefficient is None else getattr(self, self.kl_coefficient)


@dataclass(frozen=True)
class DatasetConfig(AlgoConfig):
    """Base of the configs of algorithms that train on a user dataset (``--dataset``): how bad and
    over-long rows are handled (`rlhf_zoo.data`). The subclass adds its own ``dataset`` field."""

    bad_rows: Literal["raise", "drop"] = option(
        "raise", "Dataset rows with a missing, mistyped or empty field, chosen == rejected, or prompt or "
                 "response words the tokenizer does not know: raise (stop at the first, naming row and key) or drop (skip "
                 "them; counts by reason go to summary.json).")
    long_rows: Literal["raise", "truncate", "drop"] = option(
        "truncate", "Dataset rows over the length caps (a response: max_new_tokens tokens; a prompt: the "
                    "model's positions minus BOS and max_new_tokens): truncate (the prompt keeps its end, a "
                    "response its start; counted in summary.json), drop (counted), or raise.")
    max_drop_fraction: float = option(
        0.1, "Largest fraction of the dataset's rows that may be dropped; above it the run stops and "
             "says how many rows were dropped and why.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_drop_fraction", 0.0, 1.0)


def read_json_object(path: Path, what: str, expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON file holding one object (a config file, a suite); a one-line `ConfigError` otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected {expected}, got {type(data).__name__}")
    return data


MAX_SEED = 2**32 - 1  # seeds go to numpy's global RNG, which takes 0 .. 2**32 - 1


def check_seed(name: str, value: Any) -> None:
    """A run or task seed: an integer from 0 to `MAX_SEED`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {value!r}")


def check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")


def check_range(cfg: Any, name: str, low: float, high: float) -> None:
    value = getattr(cfg, name)
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")


def field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _check_type(cls: type, name: str, value: Any) -> None:
    expected = field_type(cls, name)
    if not _matches(expected, value):
        raise ConfigError(f"{name} must be of type {_type_name(expected)}, got {value!r}")
    if isinstance(value, float) and math.isnan(value):  # (nan passes every `x < 0` range check unnoticed)
        raise ConfigError(f"{name} must be a number, got nan")


def _matches(tp: Any, value: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))
