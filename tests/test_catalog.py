"""Fast start (issue 14): ``zoo --help``, ``zoo list`` and ``zoo run ALGO --help`` import no torch,
transformers, datasets or gymnasium once the plugin index is written (`rlhf_zoo.catalog`), and the index
gives the same listing and options as the loaded plugins, and is dropped when anything it came from changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf_zoo import catalog, registry
from rlhf_zoo.catalog import Catalog, get_catalog, read_index, write_index
from rlhf_zoo.cli import build_cli, main
from rlhf_zoo.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, get_registry

HEAVY = ("torch", "transformers", "datasets", "gymnasium", "numpy")


@pytest.fixture
def index(monkeypatch, tmp_path):
    """An index of the installed plugins in a scratch cache; yields its path."""
    monkeypatch.delenv(ENV_BLOCK, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(catalog.ENV_INDEX, raising=False)
    monkeypatch.setenv("RLHF_ZOO_CACHE", str(tmp_path / "cache"))
    write_index(Catalog.from_registry(get_registry(refresh=True)))
    yield catalog.index_path()
    monkeypatch.setattr(catalog, "_CATALOG", None)


def _without_registry(monkeypatch) -> None:
    """As a fresh process: no registry loaded, and loading one fails the test."""
    monkeypatch.setattr(registry, "_REGISTRY", None)
    monkeypatch.setattr(catalog, "_CATALOG", None)

    def no_loading(refresh: bool = False):
        raise AssertionError("the plugins were loaded although the index is up to date")

    monkeypatch.setattr(registry, "get_registry", no_loading)


@pytest.mark.parametrize("args", [["--help"], ["list"], ["run", "ppo", "--help"]])
def test_catalog_cli_metadata_commands_import_nothing_heavy(index, args, tmp_path):
    code = ("import sys\nfrom rlhf_zoo.cli import main\nrc = main(sys.argv[1:])\n"
            f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    *out, last = proc.stdout.strip().splitlines()
    assert last == "0 []", proc.stdout + proc.stderr
    assert proc.stderr == ""
    expected = {"--help": "Commands:", "list": "  ppo ", "run": "--kl-estimator [k1|k2|k3]"}[args[0]]
    assert expected in "\n".join(out)


def test_catalog_round_trips_through_json(index):
    cat = Catalog.from_registry(get_registry())
    assert Catalog.from_json(json.loads(json.dumps(cat.to_json()))) == cat
    assert read_index() == cat


def _help(name: str, capsys) -> str:
    assert build_cli().commands["run"].main([name, "--help"], prog_name="zoo run", standalone_mode=False) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["ppo", "ppo-ptx", "dpo", "sft", "reward-model", "rrhf", "best-of-n"])
def test_catalog_run_help_from_index_equals_from_plugins(index, monkeypatch, capsys, name):
    loaded = _help(name, capsys)
    _without_registry(monkeypatch)
    assert _help(name, capsys) == loaded


def test_catalog_list_from_index_equals_from_plugins(index, monkeypatch, capsys):
    assert main(["list", "--json"]) == 0
    loaded = capsys.readouterr().out
    _without_registry(monkeypatch)
    assert main(["list", "--json"]) == 0
    assert capsys.readouterr().out == loaded


def test_catalog_unknown_algorithm_from_index_is_the_same_one_line(index, monkeypatch, capsys):
    known = ", ".join(sorted(get_registry().algorithms))
    _without_registry(monkeypatch)
    assert main(["run", "nosuch"]) == 2
    assert capsys.readouterr().err.strip() == f"zoo: error: unknown algorithm 'nosuch'; known: {known}"


def test_catalog_index_is_dropped_when_a_module_file_changes(index, tmp_path):
    data = json.loads(index.read_text())
    module = tmp_path / "some_plugin.py"
    module.write_text("X = 1\n")
    st = module.stat()
    data["files"][str(module)] = [st.st_mtime_ns, st.st_size]
    index.write_text(json.dumps(data))
    assert read_index() is not None
    module.write_text("X = 22\n")
    assert read_index() is None
    module.unlink()
    assert read_index() is None


def test_catalog_index_is_dropped_when_the_plugin_controls_change(index, monkeypatch):
    assert read_index() is not None
    monkeypatch.setenv(ENV_BLOCK, "ppo")
    assert read_index() is None


def test_catalog_index_is_dropped_when_an_entry_point_changes(index):
    data = json.loads(index.read_text())
    data["fingerprint"]["entry_points"][0][3] = "0.0.0"  # another version of the distribution
    index.write_text(json.dumps(data))
    assert read_index() is None


@pytest.mark.parametrize("text", ["", "{", "[]", '{"fingerprint": 1}'])
def test_catalog_damaged_index_is_not_used(index, text):
    index.write_text(text)
    assert read_index() is None


def test_catalog_stale_index_is_rewritten_from_the_plugins(index, monkeypatch):
    index.write_text("{")
    monkeypatch.setattr(registry, "_REGISTRY", None)
    monkeypatch.setattr(catalog, "_CATALOG", None)
    cat = get_catalog()
    assert "ppo" in cat.algorithms and registry.loaded_registry() is not None
    assert read_index() == cat


def test_catalog_env_zero_neither_reads_nor_writes_the_index(index, monkeypatch):
    index.unlink()
    monkeypatch.setenv(catalog.ENV_INDEX, "0")
    monkeypatch.setattr(registry, "_REGISTRY", None)
    monkeypatch.setattr(catalog, "_CATALOG", None)
    assert "ppo" in get_catalog().algorithms
    assert not index.exists()
