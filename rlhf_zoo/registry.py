"""Plugin discovery: entry points of group ``rlhf_zoo`` -> pluggy -> named algorithms, tasks, rewards
and loggers (experiment trackers).

Built-in algorithms and tasks are ordinary entry points of the ``rlhf-zoo`` distribution, loaded by the
same path as third-party ones. Controls (environment variables):

- ``RLHF_ZOO_DISABLE_PLUGIN_AUTOLOAD=1``: load only the entry points of the ``rlhf-zoo`` distribution.
- ``RLHF_ZOO_BLOCK_PLUGINS=name1,name2``: skip those entry points (by entry-point name).

A plugin that fails to import, or whose registration hook raises, is recorded in
`Registry.load_errors` and skipped; everything else keeps working, and ``zoo run NAME`` for the name of
a plugin that failed says so, with its error. Where entry points share a name, the built-in one is loaded
first, and a name is taken only by a plugin that loaded: a broken plugin never hides a working one. Two
plugins registering one algorithm, task, reward or logger name raise `DuplicateNameError`.

``zoo list`` and ``zoo run ALGO --help`` read the registrations as data (`rlhf_zoo.catalog`), from an
index that spares importing the plugins while nothing they came from has changed.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from rlhf_zoo import hookspecs
from rlhf_zoo.errors import DuplicateNameError, UnknownNameError

ENTRY_POINT_GROUP = "rlhf_zoo"
CORE_DISTRIBUTION = "rlhf-zoo"
ENV_DISABLE_AUTOLOAD = "RLHF_ZOO_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "RLHF_ZOO_BLOCK_PLUGINS"


@dataclass(frozen=True)
class Algorithm:
    """A trainable method.

    Attributes:
        name: what ``zoo run NAME`` takes.
        config_cls: a frozen dataclass derived from `rlhf_zoo.config.AlgoConfig`; its fields become
            the command-line options.
        train: ``train(ctx: RunContext, config) -> Policy``. The runner owns seeding, device,
            evaluation, logging and saving; ``train`` owns only the algorithm.
        description: one line for ``zoo list``.
        kind: ``policy`` (trains the policy), ``inference`` (changes how the policy answers, trains
            nothing, e.g. best-of-N) or ``reward_model`` (trains a reward model).
        data_parallel: ``train`` shards its batches over the ranks of a data-parallel job
            (``ctx.dist``, `rlhf_zoo.distributed`); only such algorithms run with ``--nproc`` > 1.

    Conventions: ``config_cls.presets`` may hold ``quick`` (a run of about a minute on two CPU cores)
    and should hold ``smoke`` (the smallest run that makes at least one update), which the conformance
    tests use.
    """

    name: str
    config_cls: type
    train: Callable[..., Any]
    description: str = ""
    kind: str = "policy"
    data_parallel: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """A world with a gold reward. ``load(seed, cache_dir, progress) -> Task`` builds it if missing."""

    name: str
    load: Callable[..., Any]
    description: str = ""


@dataclass(frozen=True)
class RewardFunctionSpec:
    """A named reward: ``factory(task) -> RewardFunction``."""

    name: str
    factory: Callable[..., Any]
    description: str = ""


@dataclass(frozen=True)
class LoggerSpec:
    """An experiment tracker, selected per run by name (``zoo run ALGO --report-to NAME``).

    Attributes:
        name: what ``--report-to`` takes.
        factory: ``factory(run: rlhf_zoo.tracking.TrackerRun) -> rlhf_zoo.tracking.Logger``, called once
            the run directory and config.json exist (on rank 0 only). Import the tracker's library here,
            not at the top of the plugin module, so that listing and ``--help`` stay fast.
        description: one line for ``zoo list``.
        requires: modules the factory imports. A run that selects the logger is refused before anything is
            written when one of them is not installed (checked without importing them).
        install: the command that installs them, quoted in that refusal (``pip install 'rlhf-zoo[tensorboard]'``).
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    requires: tuple[str, ...] = ()
    install: str = ""


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from: the entry-point name, its distribution and version."""

    name: str
    distribution: str
    version: str


@dataclass(frozen=True)
class LoadError:
    plugin: str
    distribution: str
    error: str
    traceback: str = field(repr=False, default="")


@dataclass
class Registry:
    """Everything the loaded plugins registered, with the plugin that provided each name."""

    algorithms: dict[str, Algorithm] = field(default_factory=dict)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    reward_functions: dict[str, RewardFunctionSpec] = field(default_factory=dict)
    loggers: dict[str, LoggerSpec] = field(default_factory=dict)
    provided_by: dict[tuple[str, str], PluginInfo] = field(default_factory=dict)  # (kind, name) -> plugin
    plugins: list[PluginInfo] = field(default_factory=list)
    load_errors: list[LoadError] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    def algorithm(self, name: str) -> Algorithm:
        return lookup(self.algorithms, name, "algorithm", self.load_errors)

    def task(self, name: str) -> TaskSpec:
        return lookup(self.tasks, name, "task", self.load_errors)

    def reward_function(self, name: str) -> RewardFunctionSpec:
        return lookup(self.reward_functions, name, "reward function", self.load_errors)

    def logger(self, name: str) -> LoggerSpec:
        return lookup(self.loggers, name, "logger", self.load_errors)

    def _add(self, kind: str, table: dict[str, Any], item: Any, plugin: PluginInfo) -> None:
        name = item.name
        if name in table:
            first = self.provided_by[(kind, name)]
            raise DuplicateNameError(
                f"{kind} {name!r} is registered twice: by plugin {first.name!r} ({first.distribution}) "
                f"and by plugin {plugin.name!r} ({plugin.distribution})"
            )
        table[name] = item
        self.provided_by[(kind, name)] = plugin


def lookup(table: dict[str, Any], name: str, kind: str, load_errors: list[LoadError]) -> Any:
    """``table[name]``; an unknown name raises `UnknownNameError` listing the known ones, and saying so
    when a plugin of that name failed to load (with its error) or when any plugin failed to load."""
    if name in table:
        return table[name]
    failed = next((e for e in load_errors if e.plugin == name), None)
    if failed is not None:
        raise UnknownNameError(f"{kind} {name!r} is not available: plugin {name!r} ({failed.distribution}) "
                               f"failed to load: {failed.error}")
    known = ", ".join(sorted(table)) or "(none)"
    broken = ", ".join(repr(e.plugin) for e in load_errors)
    raise UnknownNameError(f"unknown {kind} {name!r}; known: {known}"
                           + (f" (plugins that failed to load: {broken}; see zoo list)" if broken else ""))


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(ENV_BLOCK, "").split(",") if n.strip()}


def entry_point_dist(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"], dist.version


def _is_core(dist: str) -> bool:
    return dist.lower().replace("_", "-") == CORE_DISTRIBUTION


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def build_registry(extra_plugins: dict[str, Any] | None = None) -> Registry:
    """Load every entry point of group ``rlhf_zoo`` (honouring the env controls) into a fresh registry.

    Args:
        extra_plugins: name -> plugin object registered in addition (tests, notebooks).
    """
    reg = Registry(manager=_new_manager())
    pm = reg.manager
    autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in {"1", "true", "yes"}
    blocked = _blocked()
    taken: dict[str, str] = {}  # entry-point name -> the distribution whose plugin loaded under it
    # built-ins first where names are shared; a name is taken only by a plugin that loaded, so a broken
    # plugin never hides a working one of the same name
    entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP),
                          key=lambda e: (e.name, not _is_core(entry_point_dist(e)[0])))
    for ep in entry_points:
        dist, version = entry_point_dist(ep)
        if ep.name in blocked:
            continue
        if not autoload and not _is_core(dist):
            continue
        if ep.name in taken:
            reg.load_errors.append(LoadError(ep.name, dist, f"entry point name {ep.name!r} is already taken by "
                                             f"{taken[ep.name]}; this one was not loaded"))
            continue
        info = PluginInfo(ep.name, dist, version)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            reg.load_errors.append(LoadError(ep.name, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            continue
        taken[ep.name] = dist
        reg.plugins.append(info)
    for name, obj in (extra_plugins or {}).items():
        pm.register(obj, name=name)
        reg.plugins.append(PluginInfo(name, "local", "unknown"))
    pm.check_pending()
    hooks = (
        ("algorithm", "register_algorithms", reg.algorithms),
        ("task", "register_tasks", reg.tasks),
        ("reward function", "register_reward_functions", reg.reward_functions),
        ("logger", "register_loggers", reg.loggers),
    )
    # A plugin's registrations are collected first and committed only if all its hooks succeed, so a
    # plugin that fails half-way leaves nothing behind (and its run-time hooks are unregistered).
    pending: dict[str, list[tuple[str, dict, Any]]] = {p.name: [] for p in reg.plugins}
    failed: set[str] = set()
    for kind, hook_name, table in hooks:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            name = impl.plugin_name
            if name in failed:
                continue
            items: list[tuple[str, dict, Any]] = []
            try:
                impl.function(register=lambda item, _k=kind, _t=table, _items=items: _items.append((_k, _t, item)))
            except Exception as exc:
                info = next(p for p in reg.plugins if p.name == name)
                reg.load_errors.append(
                    LoadError(name, info.distribution, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                failed.add(name)
                continue
            pending[name].extend(items)
    for info in list(reg.plugins):
        if info.name in failed:
            pm.unregister(name=info.name)
            reg.plugins.remove(info)
            continue
        for kind, table, item in pending[info.name]:
            reg._add(kind, table, item, info)
    return reg


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry()
    return _REGISTRY


def loaded_registry() -> Registry | None:
    """The process-wide registry if it is built, else None (nothing is loaded)."""
    return _REGISTRY
