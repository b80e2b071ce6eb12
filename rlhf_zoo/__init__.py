"""rlhf_zoo: an RLHF algorithm zoo over a Gymnasium text-generation environment.

Public API for plugin authors: `hookimpl`, `Algorithm`, `TaskSpec`, `AlgoConfig`, `option`,
`RunContext`, `ModelPolicy`. Importing the package registers the Gymnasium ids
``rlhf_zoo/TokenGen-v0`` and ``rlhf_zoo/ResponseGen-v0``.
"""

from rlhf_zoo.config import AlgoConfig, option
from rlhf_zoo.errors import ConfigError, DataError, ZooError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy, RewardModelResult
from rlhf_zoo.registry import Algorithm, RewardFunctionSpec, TaskSpec, get_registry

__version__ = "0.1.0"

__all__ = ["AlgoConfig", "Algorithm", "ConfigError", "DataError", "ModelPolicy", "RewardFunctionSpec", "RewardModelResult", "TaskSpec",
           "ZooError", "get_registry", "hookimpl", "option"]


def _register_envs() -> None:
    from rlhf_zoo_envs.registration import register_envs

    register_envs()


_register_envs()
