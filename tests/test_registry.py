"""Plugin discovery: built-ins through entry points, unknown names, duplicates, failing plugins, the env
controls, and a third-party distribution discovered from a ``.dist-info`` directory on sys.path."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf_zoo import AlgoConfig, Algorithm, ModelPolicy, TaskSpec, hookimpl, option
from rlhf_zoo.cli import main
from rlhf_zoo.errors import DuplicateNameError, UnknownNameError, ZooError
from rlhf_zoo.registry import (
    CORE_DISTRIBUTION,
    ENV_BLOCK,
    ENV_DISABLE_AUTOLOAD,
    RewardFunctionSpec,
    build_registry,
    get_registry,
)

BUILTIN_ALGORITHMS = ("sft", "reward-model", "best-of-n", "ppo", "ppo-ptx", "dpo", "rrhf", "rejection-sampling",
                      "rloo", "grpo", "iterated-rlhf")
BUILTIN_TASKS = ("exact", "sentiment", "hh")
BUILTIN_ENTRY_POINTS = {"sft", "reward-model", "best-of-n", "ppo", "dpo", "rrhf", "rejection-sampling", "tasks",
                        "rewards", "rloo", "grpo", "iterated-rlhf", "loggers"}
PLUGIN_SITE = Path(__file__).parent / "fixtures" / "plugin_site"
THIRD_PARTY_MODULES = ("zoo_example_plugin", "zoo_broken_plugin")


@pytest.fixture(autouse=True)
def _no_env_controls(monkeypatch):
    """Every test starts without the env controls (a developer's shell may set them)."""
    monkeypatch.delenv(ENV_BLOCK, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)


@pytest.fixture
def third_party_site(monkeypatch):
    """Put the fake site-packages holding ``zoo-example-plugin`` and ``zoo-broken-plugin`` on sys.path.

    Undone in teardown, in this order: every monkeypatch (sys.path and any env var the test set),
    the modules forgotten, metadata caches cleared, and only then the process-wide registry rebuilt, so
    later tests see only the installed plugins."""
    monkeypatch.syspath_prepend(str(PLUGIN_SITE))  # also invalidates importlib's caches
    yield get_registry(refresh=True)
    monkeypatch.undo()
    for name in THIRD_PARTY_MODULES:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    get_registry(refresh=True)


# --- helpers: inline plugins ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _TinyConfig(AlgoConfig):
    knob: int = option(3, "A knob.")


def _train(ctx, cfg):
    return ModelPolicy(ctx.policy)


class _RegistersAlgorithm:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def register_algorithms(self, register):
        register(Algorithm(self.name, _TinyConfig, _train, f"inline {self.name}"))


class _RaisesInRegister:
    @hookimpl
    def register_algorithms(self, register):
        raise RuntimeError("boom while registering")


# --- built-ins ------------------------------------------------------------------------------------------
def test_registry_builtins_present_and_provided_by_rlhf_zoo():
    reg = build_registry()
    for name in BUILTIN_ALGORITHMS:
        assert reg.algorithm(name).name == name
        assert reg.provided_by[("algorithm", name)].distribution == CORE_DISTRIBUTION
        expected = "ppo" if name == "ppo-ptx" else name  # ppo-ptx is a second registration of the ppo module
        assert reg.provided_by[("algorithm", name)].name == expected  # the entry point is named after it
    for name in BUILTIN_TASKS:
        assert reg.task(name).name == name
        info = reg.provided_by[("task", name)]
        assert (info.name, info.distribution) == ("tasks", CORE_DISTRIBUTION)
    assert not reg.load_errors
    versions = {p.version for p in reg.plugins if p.distribution == CORE_DISTRIBUTION}
    assert versions == {importlib.metadata.version("rlhf-zoo")}


def test_registry_builtin_algorithm_configs_are_algoconfigs():
    reg = build_registry()
    for name in BUILTIN_ALGORITHMS:
        cfg = reg.algorithm(name).config_cls()
        assert isinstance(cfg, AlgoConfig)
        assert "quick" in type(cfg).presets


def test_registry_get_registry_is_cached_until_refresh():
    first = get_registry()
    assert get_registry() is first
    again = get_registry(refresh=True)
    assert again is not first
    assert get_registry() is again
    assert set(again.algorithms) == set(first.algorithms)


# --- unknown names --------------------------------------------------------------------------------------
def test_registry_unknown_algorithm_lists_known_names():
    reg = build_registry()
    with pytest.raises(UnknownNameError) as info:
        reg.algorithm("nosuch")
    msg = str(info.value)
    assert "'nosuch'" in msg
    assert f"known: {', '.join(sorted(BUILTIN_ALGORITHMS))}" in msg  # sorted
    assert isinstance(info.value, ZooError) and isinstance(info.value, KeyError)
    assert not msg.startswith('"')  # not KeyError's quoted repr


def test_registry_unknown_task_lists_known_names():
    reg = build_registry()
    with pytest.raises(UnknownNameError, match=r"unknown task 'nosuch'; known: exact, hh, sentiment"):
        reg.task("nosuch")


def test_registry_unknown_reward_function_lists_the_built_in_ones():
    reg = build_registry()
    with pytest.raises(UnknownNameError, match=r"unknown reward function 'gold'; known: distinct-words, length$"):
        reg.reward_function("gold")


# --- inline plugins -------------------------------------------------------------------------------------
def test_registry_extra_plugin_adds_algorithm_as_local():
    reg = build_registry(extra_plugins={"mine": _RegistersAlgorithm("my-algo")})
    assert reg.algorithm("my-algo").config_cls is _TinyConfig
    info = reg.provided_by[("algorithm", "my-algo")]
    assert (info.name, info.distribution) == ("mine", "local")
    assert set(BUILTIN_ALGORITHMS) <= set(reg.algorithms)


def test_registry_extra_plugin_registers_task_and_reward_function():
    class Plugin:
        @hookimpl
        def register_tasks(self, register):
            register(TaskSpec("toy-task", lambda **kw: None, "a toy"))

        @hookimpl
        def register_reward_functions(self, register):
            register(RewardFunctionSpec("toy-reward", lambda task: None, "a toy reward"))

    reg = build_registry(extra_plugins={"toy": Plugin()})
    assert reg.task("toy-task").description == "a toy"
    assert reg.reward_function("toy-reward").description == "a toy reward"
    assert reg.provided_by[("reward function", "toy-reward")].name == "toy"


def test_registry_duplicate_name_raises_naming_both_plugins():
    with pytest.raises(DuplicateNameError) as info:
        build_registry(extra_plugins={"dup": _RegistersAlgorithm("sft")})
    msg = str(info.value)
    assert "'sft'" in msg
    assert "plugin 'sft' (rlhf-zoo)" in msg  # the first registrant
    assert "plugin 'dup' (local)" in msg  # the second one


def test_registry_duplicate_between_two_extra_plugins():
    with pytest.raises(DuplicateNameError, match=r"'a'.*'b'"):
        build_registry(extra_plugins={"a": _RegistersAlgorithm("same"), "b": _RegistersAlgorithm("same")})


def test_registry_raising_register_hook_is_recorded_and_others_load():
    reg = build_registry(extra_plugins={"raiser": _RaisesInRegister(), "fine": _RegistersAlgorithm("fine-algo")})
    assert [e.plugin for e in reg.load_errors] == ["raiser"]
    err = reg.load_errors[0]
    assert err.distribution == "local"
    assert err.error == "RuntimeError: boom while registering"
    assert "Traceback" in err.traceback
    assert {"fine-algo", *BUILTIN_ALGORITHMS} <= set(reg.algorithms)
    assert set(BUILTIN_TASKS) <= set(reg.tasks)


# --- environment controls -------------------------------------------------------------------------------
def test_registry_block_plugins_env_removes_best_of_n(monkeypatch):
    monkeypatch.setenv(ENV_BLOCK, " best-of-n , ")
    reg = build_registry()
    assert "best-of-n" not in reg.algorithms
    assert {"sft", "reward-model"} <= set(reg.algorithms)
    assert "best-of-n" not in {p.name for p in reg.plugins}
    rest = ", ".join(sorted(set(BUILTIN_ALGORITHMS) - {"best-of-n"}))
    with pytest.raises(UnknownNameError, match=f"known: {rest}$"):
        reg.algorithm("best-of-n")


def test_registry_block_plugins_env_blocks_several(monkeypatch):
    monkeypatch.setenv(ENV_BLOCK, "sft,tasks")
    reg = build_registry()
    assert "sft" not in reg.algorithms
    assert reg.tasks == {}
    assert {"best-of-n", "reward-model"} <= set(reg.algorithms)


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_registry_disable_autoload_keeps_only_core_entry_points(monkeypatch, third_party_site, value):
    assert "example-algo" in third_party_site.algorithms  # discoverable: the control is what removes it
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, value)
    reg = build_registry()
    assert {p.name for p in reg.plugins} == BUILTIN_ENTRY_POINTS
    assert {p.distribution for p in reg.plugins} == {CORE_DISTRIBUTION}
    assert "example-algo" not in reg.algorithms
    assert reg.load_errors == []  # the broken third-party plugin is not even imported
    assert set(BUILTIN_ALGORITHMS) <= set(reg.algorithms) and set(BUILTIN_TASKS) <= set(reg.tasks)


def test_registry_disable_autoload_zero_still_autoloads(monkeypatch, third_party_site):
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "0")
    assert "example-algo" in build_registry().algorithms


# --- a third-party distribution discovered through its .dist-info ---------------------------------------
def test_registry_third_party_plugin_discovered_with_distribution_and_version(third_party_site):
    reg = third_party_site
    algo = reg.algorithm("example-algo")
    info = reg.provided_by[("algorithm", "example-algo")]
    assert (info.name, info.distribution, info.version) == ("example", "zoo-example-plugin", "0.3.0")
    assert algo.config_cls().scale == 1.0
    assert algo.config_cls.__module__ == "zoo_example_plugin"
    assert set(BUILTIN_ALGORITHMS) <= set(reg.algorithms)


def test_registry_broken_third_party_plugin_recorded_by_name(third_party_site):
    reg = third_party_site
    assert [(e.plugin, e.distribution) for e in reg.load_errors] == [("broken", "zoo-broken-plugin")]
    assert reg.load_errors[0].error.startswith("ImportError: zoo_broken_plugin needs a dependency")
    assert "broken" not in {p.name for p in reg.plugins}
    assert {"example", *BUILTIN_ENTRY_POINTS} == {p.name for p in reg.plugins}


def test_registry_block_plugins_env_skips_broken_third_party(monkeypatch, third_party_site):
    monkeypatch.setenv(ENV_BLOCK, "broken")
    reg = build_registry()
    assert reg.load_errors == []
    assert "example-algo" in reg.algorithms


def test_registry_teardown_of_third_party_site_restores_registry(third_party_site):
    # the fixture's teardown is checked by the next test; here just that the fixture took effect
    assert str(PLUGIN_SITE) in sys.path


def test_registry_third_party_plugin_gone_after_fixture_teardown():
    assert str(PLUGIN_SITE) not in sys.path
    assert "example-algo" not in get_registry().algorithms
    assert get_registry().load_errors == []


def test_cli_list_with_broken_plugin_exits_0_and_warns(third_party_site, capsys):
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    for name in (*BUILTIN_ALGORITHMS, *BUILTIN_TASKS, "example-algo"):
        assert f"  {name} " in out
    assert "[zoo-example-plugin 0.3.0]" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "'broken'" in warnings[0] and "zoo-broken-plugin" in warnings[0] and "ImportError" in warnings[0]
    assert "Traceback" not in err


def test_cli_list_json_with_broken_plugin_lists_everything_else(third_party_site, capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    algos = {a["name"]: a for a in data["algorithms"]}
    assert set(algos) == {*BUILTIN_ALGORITHMS, "example-algo"}
    assert (algos["example-algo"]["distribution"], algos["example-algo"]["version"]) == ("zoo-example-plugin", "0.3.0")
    assert algos["example-algo"]["plugin"] == "example"
    assert {t["name"] for t in data["tasks"]} == set(BUILTIN_TASKS)
    assert [(e["plugin"], e["distribution"]) for e in data["load_errors"]] == [("broken", "zoo-broken-plugin")]
    assert "broken" not in {p["name"] for p in data["plugins"]}


def _run_group():
    from rlhf_zoo.cli import build_cli

    return build_cli().commands["run"]


def test_cli_third_party_algorithm_help_shows_its_option(third_party_site, capsys):
    # Through the ``run`` group itself: ``main([... "--help"])`` currently leaks click's Exit (see
    # test_cli.py::test_cli_main_help_of_algorithm_returns_0).
    rc = _run_group().main(["example-algo", "--help"], prog_name="zoo run", standalone_mode=False)
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0
    assert "--scale FLOAT" in out
    assert "Multiplier applied to nothing at all (example option)." in out
    assert "Example third-party algorithm" in out


def test_cli_third_party_config_validation_is_one_line(third_party_site, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "example-algo", "--task", "exact", "--scale", "0", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "zoo: error: scale must be > 0, got 0.0"
    assert not (tmp_path / "runs").exists()
