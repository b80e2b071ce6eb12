"""The example third-party plugin in tests/example_plugin (distribution ``zoo-reinforce``, algorithm
``reinforce``): pip installs it as its own distribution into a temporary directory, and the ``zoo``
command line, in subprocesses with that directory on PYTHONPATH, lists it, checks it with the conformance
kit, runs it, and runs the plugin's own tests (the ``zoo_check`` fixture). docs/plugins.md shows exactly
the example's files, and the example imports only the public API."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_zoo.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "tests" / "example_plugin"
DOCS = REPO / "docs" / "plugins.md"
EXAMPLE_FILES = ("pyproject.toml", "zoo_reinforce/__init__.py", "tests/test_reinforce.py")
_zoo_script = Path(sys.executable).with_name("zoo")
ZOO = [str(_zoo_script)] if _zoo_script.is_file() else [sys.executable, "-m", "rlhf_zoo"]


# --- installing the example as its own distribution ------------------------------------------------------
def _setuptools_builds_offline() -> bool:
    """Whether this environment's setuptools can build the example's wheel without the index: setuptools
    >= 61 reads ``[project]`` metadata, and builds wheels itself from 70.1 on (older needs ``wheel``)."""
    try:
        version = tuple(int(x) for x in re.findall(r"\d+", metadata.version("setuptools"))[:2])
    except metadata.PackageNotFoundError:
        return False
    return version >= (70, 1) or (version >= (61, 0) and importlib.util.find_spec("wheel") is not None)


def _pip_install(src: Path, target: Path) -> None:
    """``pip install --no-deps --target`` of the example: offline with this environment's setuptools when
    it can build wheels, else with pip's build isolation (setuptools from the package index; a fresh
    Python 3.11 venv has setuptools 65 without ``wheel``). Skips when neither way is available."""
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
            "--target", str(target)]
    offline = _setuptools_builds_offline()
    attempts = ([[*base, "--no-build-isolation", "--no-index", str(src)]] if offline else []) + [[*base, str(src)]]
    errors = []
    for cmd in attempts:
        shutil.rmtree(target, ignore_errors=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return
        errors.append(f"$ {' '.join(cmd)}\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    if offline:  # this environment can build it, so the example itself is broken
        pytest.fail("pip could not install tests/example_plugin:\n" + "\n".join(errors), pytrace=False)
    pytest.skip("cannot build tests/example_plugin here: this environment's setuptools cannot build wheels "
                "offline (needs setuptools >= 70.1, or `wheel`) and pip's isolated build could not reach the "
                "package index:\n" + errors[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> SimpleNamespace:
    """The example copied (as a plugin author's checkout; the build writes into it) and installed with pip
    into its own site directory; ``env`` puts that directory on PYTHONPATH for subprocesses."""
    root = tmp_path_factory.mktemp("zoo-reinforce")
    src, site = root / "zoo-reinforce", root / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info", ".pytest_cache"))
    _pip_install(src, site)
    assert (site / "zoo_reinforce" / "__init__.py").is_file()
    entry_points = next(site.glob("zoo_reinforce-0.1.0.dist-info")) / "entry_points.txt"
    assert "[rlhf_zoo]\nreinforce = zoo_reinforce" in entry_points.read_text()
    env = {k: v for k, v in os.environ.items() if k not in (ENV_BLOCK, ENV_DISABLE_AUTOLOAD)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return SimpleNamespace(src=src, site=site, env=env)


def _zoo(installed: SimpleNamespace, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ZOO, *args], capture_output=True, text=True, env=installed.env, cwd=cwd, timeout=600)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done.stdout


# --- the installed plugin through the command line --------------------------------------------------------
def test_zoo_list_shows_reinforce_from_its_distribution(installed):
    done = _zoo(installed, "list")
    out = _ok(done)
    line = next(ln for ln in out.splitlines() if ln.startswith("  reinforce "))
    assert line.endswith("[zoo-reinforce 0.1.0]")
    assert "RLOO" in line
    assert "warning:" not in done.stderr


def test_zoo_check_passes_every_check_on_the_example(installed):
    out = _ok(_zoo(installed, "check", "reinforce"))
    lines = out.splitlines()
    assert lines[0] == "zoo check reinforce (zoo-reinforce 0.1.0, plugin reinforce) on exact"
    statuses = {ln.split()[1]: ln.split()[0] for ln in lines[1:-1]}
    assert statuses == dict.fromkeys(("config", "update", "reference", "finite", "determinism", "checkpoint"), "PASS")
    assert lines[-1] == "reinforce: 6 passed, 0 failed, 0 skipped"


def test_zoo_run_smoke_records_the_plugin_distribution(installed, tmp_path):
    out = tmp_path / "run"
    _ok(_zoo(installed, "run", "reinforce", "--task", "exact", "--preset", "smoke", "--device", "cpu",
             "--quiet", "--out", str(out)))
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (summary["algorithm"], summary["task"]) == ("reinforce", "exact")
    assert (config["algorithm_plugin"], config["algorithm_distribution"]) == ("reinforce", "zoo-reinforce")
    assert {"name": "reinforce", "distribution": "zoo-reinforce", "version": "0.1.0"} in config["plugins"]
    assert config["config"]["k"] == 2 and config["config"]["baseline"] == "loo"
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert (out / "policy" / "model.safetensors").is_file()


def test_example_plugin_own_tests_pass_with_the_zoo_check_fixture(installed):
    """The plugin author's workflow: ``python -m pytest`` in the plugin's checkout, with the plugin installed."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=installed.src,
                          capture_output=True, text=True, env=installed.env, timeout=600)
    out = _ok(done)
    assert re.search(r"\b3 passed\b", out) and "skipped" not in out, out


def test_quick_preset_learns_on_exact(installed, tmp_path):
    """A short run of the quick preset (100 of its 400 iterations) beats the SFT policy on the gold reward and
    moves towards the optimal policy pi*_beta (seeds 0-3: gold 0.18-0.29 against 0.013)."""
    out = tmp_path / "run"
    _ok(_zoo(installed, "run", "reinforce", "--task", "exact", "--preset", "quick", "--iterations", "100",
             "--device", "cpu", "--quiet", "--out", str(out)))
    s = json.loads((out / "summary.json").read_text())
    assert s["gold_reward"] > s["baseline_gold_reward"] + 0.1, s
    assert s["kl_to_optimum"] < s["baseline_kl_to_optimum"] - 0.1, s


@pytest.mark.slow
def test_quick_preset_gets_close_to_the_optimum_on_exact(installed, tmp_path):
    """The whole quick preset (seed 0: gold 0.557, kl_to_optimum 0.129; SFT: 0.013, 0.670)."""
    out = tmp_path / "run"
    _ok(_zoo(installed, "run", "reinforce", "--task", "exact", "--preset", "quick", "--device", "cpu", "--quiet",
             "--out", str(out)))
    s = json.loads((out / "summary.json").read_text())
    assert s["gold_reward"] > 0.4, s
    assert s["kl_to_optimum"] < 0.3, s


# --- the example is written against the public API only -------------------------------------------------
PUBLIC = {"rlhf_zoo": None, "rlhf_zoo.ops": None, "rlhf_zoo.rollout": {"collect", "draw_prompts", "Rollout"},
          "rlhf_zoo.training": {"optimizer_step"}}  # None: any name the module exports


def test_example_imports_only_the_public_api():
    import rlhf_zoo
    import rlhf_zoo.ops

    exported = {"rlhf_zoo": set(rlhf_zoo.__all__), "rlhf_zoo.ops": set(rlhf_zoo.ops.__all__)}
    for rel in ("zoo_reinforce/__init__.py", "tests/test_reinforce.py"):
        for node in ast.walk(ast.parse((EXAMPLE / rel).read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("rlhf_zoo") for a in node.names), f"{rel}: import rlhf_zoo.x"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_zoo"):
                names = {a.name for a in node.names}
                if rel.startswith("tests/") and node.module == "rlhf_zoo.testing":
                    continue
                assert node.module in PUBLIC, f"{rel} imports from {node.module}, not a public module"
                allowed = PUBLIC[node.module] or exported[node.module]
                assert names <= allowed, f"{rel} imports {sorted(names - allowed)} from {node.module}"


# --- docs/plugins.md shows the example's real files --------------------------------------------------------
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
FILE_LINE = re.compile(r"^`([\w./-]+\.(?:py|toml))`[^\n]*:$")  # "`path/to/file.py` ...:" names the block's file


def _doc_file_blocks() -> list[tuple[str, str]]:
    """(path, code) of every code block of docs/plugins.md whose preceding line names a file."""
    text = DOCS.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = [ln for ln in text[: m.start()].splitlines() if ln.strip()]
        named = FILE_LINE.match(before[-1]) if before else None
        if named:
            blocks.append((named.group(1), m.group(2)))
    return blocks


def test_docs_blocks_naming_a_file_are_pieces_of_the_example_file_in_order():
    blocks = _doc_file_blocks()
    assert {path for path, _ in blocks} == set(EXAMPLE_FILES)
    position: dict[str, int] = {}
    for path, code in blocks:
        text = (EXAMPLE / path).read_text()
        at = text.find(code, position.get(path, 0))
        assert at >= 0, (f"docs/plugins.md shows a block of {path} that is not in tests/example_plugin/{path} "
                         f"(after the previous block of that file):\n{code}")
        position[path] = at + len(code)


def test_docs_show_every_line_of_the_example_files():
    covered: dict[str, list[tuple[int, int]]] = {}
    for path, code in _doc_file_blocks():
        text = (EXAMPLE / path).read_text()
        start = text.find(code, covered[path][-1][1] if covered.get(path) else 0)
        if start >= 0:  # a block that is not in the file fails the test above
            covered.setdefault(path, []).append((start, start + len(code)))
    for path in EXAMPLE_FILES:
        text = (EXAMPLE / path).read_text()
        rest, last = [], 0
        for start, end in covered.get(path, []):
            rest.append(text[last:start])
            last = end
        rest.append(text[last:])
        missing = [ln for ln in "".join(rest).splitlines() if ln.strip()]
        assert not missing, f"docs/plugins.md does not show these lines of {path}: {missing[:5]}"
