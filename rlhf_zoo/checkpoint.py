"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``checkpoints/iter-NNNNNN/`` holding

    state.safetensors   every tensor of the saved state (model and optimizer tensors, RNG states)
    state.json          the rest of the state, with tensors replaced by references into state.safetensors
    checkpoint.json     {"iteration": N, "complete": true, ...}, written last

It is written into a temporary sibling directory, each file flushed to disk, and renamed into place, so
a directory named ``iter-*`` with a ``checkpoint.json`` is complete; a crash mid-write leaves only a
``.tmp-*`` directory, which is ignored and removed. A complete checkpoint that still cannot be loaded
(truncated or replaced tensor file, damaged JSON: `checkpoint_problem`) is passed over: `latest_checkpoint`
is the newest one that loads, so a resume falls back to the one before. A new checkpoint is read back
before older ones are deleted.

State is any nesting of dicts, lists, tuples, tensors, numbers, strings, booleans and None. Dict keys
may be strings or integers (optimizer state is keyed by parameter index); tuples stay tuples.
Objects are saved through `state_of` and restored in place through `restore`: modules, optimizers and
schedulers by their ``state_dict``, torch and numpy generators by their RNG state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf_zoo.errors import ZooError

CHECKPOINT_GLOB = "iter-*"


# ---------------------------------------------------------------- nested state <-> (tensors, JSON)

def flatten(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``state`` into named tensors and a JSON-able skeleton that refers to them."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()  # safetensors refuses tensors that share memory (tied weights): copy those

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            t = x.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in storages else t
            storages.add(ptr)
            return {"__tensor__": name}
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"checkpoint state: dict key {k!r} is not a string or an integer")
            return {"__dict__": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"checkpoint state: cannot save a {type(x).__name__} (only tensors, numbers, "
                        "strings, None and dicts/lists/tuples of them)")

    return tensors, walk(state)


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(tensors, v) for v in skeleton["__tuple__"])
        return {k: unflatten(tensors, v) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten(tensors, v) for v in skeleton]
    return skeleton


# ---------------------------------------------------------------- objects <-> state

def state_of(obj: Any) -> Any:
    """The saveable state of a module, optimizer, scheduler, generator or anything with ``state_dict``."""
    if isinstance(obj, torch.Generator):
        return {"torch_generator": obj.get_state()}
    if isinstance(obj, np.random.Generator):
        return {"numpy_generator": obj.bit_generator.state}
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}: give it state_dict() and load_state_dict()")


def restore(obj: Any, state: Any) -> None:
    """Load ``state`` (from `state_of`) into ``obj`` in place."""
    if isinstance(obj, torch.Generator):
        obj.set_state(state["torch_generator"])
    elif isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state["numpy_generator"]
    elif isinstance(obj, torch.nn.Module):
        obj.load_state_dict(state, strict=True)
    else:
        obj.load_state_dict(state)


def global_rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's global RNG states (and CUDA's when there is one)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {"python": [version, list(internal), gauss],
           "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_global_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- directories

def _write(path: Path, data: bytes | str) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(root: Path, iteration: int, state: dict[str, Any], info: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as checkpoint ``iteration`` under ``root`` atomically; keep the last ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"iter-{iteration:06d}", root / f".tmp-iter-{iteration:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, skeleton = flatten(state)
    save_file(tensors, str(tmp / "state.safetensors"))
    with open(tmp / "state.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    _write(tmp / "state.json", json.dumps(skeleton))
    _write(tmp / "checkpoint.json", json.dumps({"iteration": iteration, "complete": True, **info}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    problem = checkpoint_problem(final)
    if problem is not None:  # never delete the older ones for a checkpoint that cannot be read back
        print(f"zoo: warning: checkpoint {final} cannot be read back ({problem}); older checkpoints kept",
              file=sys.stderr)
        return final
    # keep the newest ``keep`` checkpoints that load (damaged ones are never counted, and go)
    found = complete_checkpoints(root)
    kept = [p for p in reversed(found) if p == final or checkpoint_problem(p) is None][:keep] if keep > 0 else found
    for old in found:
        if old not in kept:
            shutil.rmtree(old)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root`` (their checkpoint.json written), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(CHECKPOINT_GLOB) if (p / "checkpoint.json").is_file())


def checkpoint_problem(path: Path) -> str | None:
    """Why the complete checkpoint ``path`` cannot be loaded (truncated or non-safetensors tensor file,
    unreadable JSON, a tensor the skeleton names but the file lacks), or None when it loads. Reads the
    safetensors header and the JSON files, not the tensor data."""
    parsed = {}
    for name in ("checkpoint.json", "state.json"):
        try:
            parsed[name] = json.loads((path / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{name} is missing"
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f"{name}: invalid JSON ({' '.join(str(e).split())})"
    info, skeleton = parsed["checkpoint.json"], parsed["state.json"]
    if not isinstance(info, dict) or not isinstance(info.get("iteration"), int):
        return "checkpoint.json: no iteration number"
    try:
        with safe_open(str(path / "state.safetensors"), framework="pt") as f:
            names = set(f.keys())
    except FileNotFoundError:
        return "state.safetensors is missing"
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: the file is not a safetensors file
        return f"state.safetensors: {' '.join(str(e).split())}"
    missing = sorted(_tensor_names(skeleton) - names)
    return f"state.json refers to tensors state.safetensors lacks ({', '.join(missing[:3])})" if missing else None


def _tensor_names(skeleton: Any) -> set[str]:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return {skeleton["__tensor__"]}
        return set().union(*(_tensor_names(v) for v in skeleton.values()))
    if isinstance(skeleton, list):
        return set().union(*(_tensor_names(v) for v in skeleton))
    return set()


def loadable_checkpoints(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints that load, oldest first; the damaged ones with the reason each fails)."""
    good, damaged = [], []
    for p in complete_checkpoints(root):
        problem = checkpoint_problem(p)
        if problem is None:
            good.append(p)
        else:
            damaged.append((p, problem))
    return good, damaged


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint that loads: a damaged newer one is passed over (`loadable_checkpoints`
    says which and why), so a resume falls back to the checkpoint before it."""
    good, _ = loadable_checkpoints(root)
    return good[-1] if good else None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, info) of a complete checkpoint directory. Tensors are loaded by safetensors (no pickle).
    A damaged checkpoint raises a one-line `ZooError` naming it."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ZooError(f"checkpoint {path} cannot be loaded: {problem}")
    info = json.loads((path / "checkpoint.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    return unflatten(tensors, json.loads((path / "state.json").read_text())), info
