"""rlhf_zoo: an RLHF algorithm zoo over a Gymnasium text-generation environment.

Public API for plugin authors (docs/plugins.md walks through a complete plugin):

- top-level names: `hookimpl`, `Algorithm`, `TaskSpec`, `RewardFunctionSpec`, `LoggerSpec`, `AlgoConfig`, `option`,
  `check_positive`, `check_range`, `RunContext` (what ``train(ctx, config)`` receives), `ModelPolicy`,
  `RewardModelResult`, the errors `ZooError`, `ConfigError`, `DataError`, and `get_registry`;
- `rlhf_zoo.ops` (log-probs, masks, KL, per-token rewards), `rlhf_zoo.rollout` (`collect`,
  `draw_prompts`, `Rollout`), `rlhf_zoo.training.optimizer_step`;
- `rlhf_zoo.tracking` (`Logger`, `TrackerRun`: experiment trackers for ``--report-to``);
- `rlhf_zoo.testing` (the ``zoo_check`` pytest fixture) and `rlhf_zoo.conformance` (``zoo check``).

Importing the package registers the Gymnasium ids ``rlhf_zoo/TokenGen-v0`` and ``rlhf_zoo/ResponseGen-v0``
(at once if gymnasium is imported already, else the moment it is). Importing it imports no torch,
transformers, datasets or gymnasium: ``zoo --help`` starts at once (benchmarks/cli_startup.py).
"""

import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from rlhf_zoo.config import AlgoConfig, check_positive, check_range, option
from rlhf_zoo.errors import ConfigError, DataError, ZooError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.registry import Algorithm, LoggerSpec, RewardFunctionSpec, TaskSpec, get_registry

__version__ = "0.1.0"

if TYPE_CHECKING:
    from rlhf_zoo.policy import ModelPolicy, RewardModelResult
    from rlhf_zoo.runner import RunContext

__all__ = ["AlgoConfig", "Algorithm", "ConfigError", "DataError", "LoggerSpec", "ModelPolicy", "RewardFunctionSpec", "RewardModelResult",
           "RunContext", "TaskSpec", "ZooError", "check_positive", "check_range", "get_registry", "hookimpl", "option"]

#: names imported on first use, so that importing the package (and starting ``zoo``) imports no torch
_LAZY = {"ModelPolicy": "rlhf_zoo.policy", "RewardModelResult": "rlhf_zoo.policy", "RunContext": "rlhf_zoo.runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhf_zoo' has no attribute {name!r}")


def _register_envs() -> None:
    from rlhf_zoo_envs.registration import register_envs

    register_envs()


class _RegisterEnvsOnImport:
    """A post-import hook: the environment ids are registered right after gymnasium is imported, so that
    importing rlhf_zoo does not import gymnasium (and numpy) for commands that never make an environment.
    It finds gymnasium through the other finders and wraps only the module's execution; once used, it is
    gone from `sys.meta_path`."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "gymnasium":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module: Any) -> None:
                exec_module(module)
                _register_envs()

            spec.loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


if "gymnasium" in sys.modules:
    _register_envs()
else:
    sys.meta_path.insert(0, _RegisterEnvsOnImport())
