"""What the plugins registered, as plain data: all that ``zoo list`` and ``zoo run ALGO --help`` need,
without importing the plugins (and torch, transformers and datasets with them).

Plugin modules import torch at the top (the built-ins do, and so will most third-party ones), so the
names, descriptions and config options of the algorithms are known only after every plugin is imported,
several seconds. A `Catalog` is that knowledge as data. It comes from the process's `Registry` when one is
loaded already; otherwise from an index file written the last time a process loaded the plugins, which
is used only while nothing it was built from has changed. Its fingerprint holds:

- the entry points of group ``rlhf_zoo`` (name, target, distribution, version) and the plugin controls
  ($RLHF_ZOO_DISABLE_PLUGIN_AUTOLOAD, $RLHF_ZOO_BLOCK_PLUGINS);
- the Python executable and version;
- the modification time of each site-packages directory on sys.path (installing, upgrading or removing
  any distribution adds, renames or removes entries there);
- modification time and size of every module file that was loaded and lies outside the standard library
  and site-packages: the project's own sources in an editable install, plugins on PYTHONPATH.

Any difference, or an index that cannot be read, and the plugins are loaded as usual and the index is
written again. No index is written while a plugin fails to load (its error may be fixed by an install or
an edit the fingerprint cannot see), and none is used when $RLHF_ZOO_PLUGIN_INDEX is 0. The index lives
in the task cache ($RLHF_ZOO_CACHE, default ~/.cache/rlhf_zoo), one file per Python executable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import types
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from rlhf_zoo import registry
from rlhf_zoo.registry import ENTRY_POINT_GROUP, ENV_BLOCK, ENV_DISABLE_AUTOLOAD, LoadError, PluginInfo, Registry

ENV_INDEX = "RLHF_ZOO_PLUGIN_INDEX"
INDEX_FORMAT = 2  # bump when the catalog's data changes shape
SITE_DIR_NAMES = ("site-packages", "dist-packages")

#: a config field's type as data: "int", "float", "str", "bool", or the list of a Literal's values
FieldType = str | list


@dataclass(frozen=True)
class FieldSpec:
    """One config field, one ``zoo run ALGO`` option."""

    name: str
    type: FieldType
    default: str | None  # as ``--help`` shows it; None when the field has no plain default
    help: str


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm as ``zoo list`` and ``zoo run ALGO --help`` see it (`rlhf_zoo.registry.Algorithm`)."""

    name: str
    description: str
    kind: str
    data_parallel: bool
    doc: str  # the first line of the config class's docstring ("" when dataclass made it up)
    presets: tuple[str, ...]
    fields: tuple[FieldSpec, ...]


@dataclass(frozen=True)
class Entry:
    """A task, a reward function or a logger: a name and one line."""

    name: str
    description: str


@dataclass
class Catalog:
    """The registrations of a `Registry`, as data; the same lookups and errors."""

    algorithms: dict[str, AlgorithmSpec]
    tasks: dict[str, Entry]
    reward_functions: dict[str, Entry]
    provided_by: dict[tuple[str, str], PluginInfo]
    plugins: list[PluginInfo]
    load_errors: list[LoadError]
    loggers: dict[str, Entry] = dataclasses.field(default_factory=dict)

    def algorithm(self, name: str) -> AlgorithmSpec:
        return registry.lookup(self.algorithms, name, "algorithm", self.load_errors)

    @classmethod
    def from_registry(cls, reg: Registry) -> Catalog:
        return cls(algorithms={n: algorithm_spec(a) for n, a in reg.algorithms.items()},
                   tasks={n: Entry(n, t.description) for n, t in reg.tasks.items()},
                   reward_functions={n: Entry(n, r.description) for n, r in reg.reward_functions.items()},
                   provided_by=dict(reg.provided_by), plugins=list(reg.plugins),
                   load_errors=[dataclasses.replace(e, traceback="") for e in reg.load_errors],
                   loggers={n: Entry(n, lg.description) for n, lg in reg.loggers.items()})

    def to_json(self) -> dict[str, Any]:
        return {"algorithms": [dataclasses.asdict(a) for a in self.algorithms.values()],
                "tasks": [dataclasses.asdict(t) for t in self.tasks.values()],
                "reward_functions": [dataclasses.asdict(r) for r in self.reward_functions.values()],
                "loggers": [dataclasses.asdict(lg) for lg in self.loggers.values()],
                "provided_by": [[kind, name, dataclasses.asdict(p)] for (kind, name), p in self.provided_by.items()],
                "plugins": [dataclasses.asdict(p) for p in self.plugins],
                "load_errors": [dataclasses.asdict(e) for e in self.load_errors]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Catalog:
        def algo(a: dict[str, Any]) -> AlgorithmSpec:
            return AlgorithmSpec(**{**a, "presets": tuple(a["presets"]),
                                    "fields": tuple(FieldSpec(**f) for f in a["fields"])})

        return cls(algorithms={a["name"]: algo(a) for a in data["algorithms"]},
                   tasks={t["name"]: Entry(**t) for t in data["tasks"]},
                   reward_functions={r["name"]: Entry(**r) for r in data["reward_functions"]},
                   provided_by={(k, n): PluginInfo(**p) for k, n, p in data["provided_by"]},
                   plugins=[PluginInfo(**p) for p in data["plugins"]],
                   load_errors=[LoadError(**e) for e in data["load_errors"]],
                   loggers={lg["name"]: Entry(**lg) for lg in data["loggers"]})


def field_type(tp: Any) -> FieldType:
    """A field annotation as data; ``X | None`` is X, other unions and types are read as text."""
    origin = get_origin(tp)
    if origin is Literal:
        return list(get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return field_type(args[0]) if len(args) == 1 else "str"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, "str")


def algorithm_spec(algo: Any) -> AlgorithmSpec:
    cls = algo.config_cls
    hints = typing.get_type_hints(cls)
    fields = tuple(FieldSpec(f.name, field_type(hints[f.name]),
                             None if f.default is dataclasses.MISSING else str(f.default), f.metadata.get("help", ""))
                   for f in dataclasses.fields(cls))
    doc = (cls.__doc__ or "").strip().splitlines()
    return AlgorithmSpec(algo.name, algo.description, algo.kind, algo.data_parallel,
                         doc[0] if doc and not doc[0].startswith(cls.__name__) else "",
                         tuple(sorted(getattr(cls, "presets", {}))), fields)


# --- the process's catalog ------------------------------------------------------------------------------
_CATALOG: tuple[Registry | None, Catalog] | None = None  # (the registry it came from, if any; the catalog)


def get_catalog() -> Catalog:
    """The catalog of the loaded registry; before one is loaded, the index's (loading the plugins, and
    writing the index, only when the index is missing or out of date)."""
    global _CATALOG
    reg = registry.loaded_registry()
    if _CATALOG is not None and _CATALOG[0] is reg:
        return _CATALOG[1]
    if reg is None:
        catalog = read_index() if os.environ.get(ENV_INDEX, "1").strip() != "0" else None
        if catalog is None:
            reg = registry.get_registry()
            catalog = Catalog.from_registry(reg)
            if not reg.load_errors and os.environ.get(ENV_INDEX, "1").strip() != "0":
                write_index(catalog)
    else:
        catalog = Catalog.from_registry(reg)
    _CATALOG = (reg, catalog)
    return catalog


# --- the index file -------------------------------------------------------------------------------------
def index_path() -> Path:
    root = Path(os.environ.get("RLHF_ZOO_CACHE") or Path.home() / ".cache" / "rlhf_zoo")
    return root / f"plugin-index-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]}.json"


def fingerprint() -> dict[str, Any]:
    """What the index must match, except the module files (`module_files`)."""
    eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value))
    return {"format": INDEX_FORMAT, "python": sys.version, "prefix": sys.prefix,
            "controls": [os.environ.get(ENV_DISABLE_AUTOLOAD, ""), os.environ.get(ENV_BLOCK, "")],
            "entry_points": [[ep.name, ep.value, *registry.entry_point_dist(ep)] for ep in eps],
            "site_dirs": {d: os.stat(d).st_mtime_ns for d in _site_dirs()}}


def _site_dirs() -> list[str]:
    return [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in SITE_DIR_NAMES and os.path.isdir(p)]


def module_files() -> dict[str, list[int]]:
    """path -> [mtime_ns, size] of every loaded module file outside the standard library and site dirs."""
    paths = sysconfig.get_paths()
    covered = tuple(os.path.join(d, "") for d in {paths["stdlib"], paths["platstdlib"], *_site_dirs()})
    out = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and not file.startswith(covered) and os.path.isfile(file):
            st = os.stat(file)
            out[file] = [st.st_mtime_ns, st.st_size]
    return out


def _unchanged(files: dict[str, list[int]]) -> bool:
    for file, (mtime_ns, size) in files.items():
        try:
            st = os.stat(file)
        except OSError:
            return False
        if (st.st_mtime_ns, st.st_size) != (mtime_ns, size):
            return False
    return True


def read_index() -> Catalog | None:
    """The index's catalog, or None when the index is missing, unreadable or out of date."""
    try:
        data = json.loads(index_path().read_text(encoding="utf-8"))
        if data["fingerprint"] != fingerprint() or not _unchanged(data["files"]):
            return None
        return Catalog.from_json(data["catalog"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_index(catalog: Catalog) -> None:
    """Write the index (atomically); a cache that cannot be written is skipped silently."""
    path = index_path()
    data = {"fingerprint": fingerprint(), "files": module_files(), "catalog": catalog.to_json()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False,
                                         encoding="utf-8") as f:
            tmp = f.name
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
