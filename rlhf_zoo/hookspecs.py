"""The hooks a plugin can implement (pluggy project name ``rlhf_zoo``).

Registration hooks receive a ``register`` callable; run-time hooks observe a run. Hooks are always
called by keyword. A plugin module implements any subset, decorated with `hookimpl`:

    from rlhf_zoo import hookimpl

    @hookimpl
    def register_algorithms(register):
        register(Algorithm(name="my-algo", config_cls=MyConfig, train=train))
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "rlhf_zoo"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_algorithms(register: Any) -> None:
    """Call ``register(Algorithm(...))`` once per algorithm this plugin provides."""


@hookspec
def register_tasks(register: Any) -> None:
    """Call ``register(TaskSpec(...))`` once per task this plugin provides."""


@hookspec
def register_reward_functions(register: Any) -> None:
    """Call ``register(RewardFunctionSpec(name, factory))``; ``factory(task) -> RewardFunction``."""


@hookspec
def register_loggers(register: Any) -> None:
    """Call ``register(LoggerSpec(name, factory, description, requires, install))`` once per experiment
    tracker; a run uses the ones named by ``--report-to`` (`rlhf_zoo.tracking`)."""


@hookspec
def on_run_start(run: Any) -> None:
    """Called once the run directory and config exist, before training."""


@hookspec
def on_iteration_end(run: Any, iteration: int, metrics: dict[str, float]) -> None:
    """Called after each training iteration with that iteration's metrics (loggers, callbacks)."""


@hookspec
def on_run_end(run: Any, summary: dict[str, Any]) -> None:
    """Called after the final evaluation with the run's summary."""
