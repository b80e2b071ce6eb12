"""rlhf_zoo: an RLHF algorithm zoo over a Gymnasium text-generation environment.

Public API for plugin authors (docs/plugins.md walks through a complete plugin):

- top-level names: `hookimpl`, `Algorithm`, `TaskSpec`, `RewardFunctionSpec`, `AlgoConfig`, `option`,
  `check_positive`, `check_range`, `RunContext` (what ``train(ctx, config)`` receives), `ModelPolicy`,
  `RewardModelResult`, the errors `ZooError`, `ConfigError`, `DataError`, and `get_registry`;
- `rlhf_zoo.ops` (log-probs, masks, KL, per-token rewards), `rlhf_zoo.rollout` (`collect`,
  `draw_prompts`, `Rollout`), `rlhf_zoo.training.optimizer_step`;
- `rlhf_zoo.testing` (the ``zoo_check`` pytest fixture) and `rlhf_zoo.conformance` (``zoo check``).

Importing the package registers the Gymnasium ids ``rlhf_zoo/TokenGen-v0`` and ``rlhf_zoo/ResponseGen-v0``.
"""

from typing import TYPE_CHECKING, Any

from rlhf_zoo.config import AlgoConfig, check_positive, check_range, option
from rlhf_zoo.errors import ConfigError, DataError, ZooError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy, RewardModelResult
from rlhf_zoo.registry import Algorithm, RewardFunctionSpec, TaskSpec, get_registry

__version__ = "0.1.0"

if TYPE_CHECKING:
    from rlhf_zoo.runner import RunContext

__all__ = ["AlgoConfig", "Algorithm", "ConfigError", "DataError", "ModelPolicy", "RewardFunctionSpec", "RewardModelResult",
           "RunContext", "TaskSpec", "ZooError", "check_positive", "check_range", "get_registry", "hookimpl", "option"]


def __getattr__(name: str) -> Any:
    """`RunContext` is imported on first use: the runner is not needed to import the package."""
    if name == "RunContext":
        from rlhf_zoo.runner import RunContext

        return RunContext
    raise AttributeError(f"module 'rlhf_zoo' has no attribute {name!r}")


def _register_envs() -> None:
    from rlhf_zoo_envs.registration import register_envs

    register_envs()


_register_envs()
