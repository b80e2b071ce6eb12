"""The run directory before a run starts: is ``--out`` usable, what does it hold, and who writes it.

Nothing in a run directory is deleted or written before these checks pass (`rlhf_zoo.runner.make_context`):

- `check_out`: ``--out`` is not a file, its nearest existing folder is writable, no live run holds it,
  and (``zoo run`` without ``--resume`` or ``--overwrite``) it is empty; a refusal says what is there.
- `lock_run_dir`: one writer per run directory. ``run.lock`` in the directory holds the writer's pid and
  host, locked with ``fcntl.flock``: the kernel drops the lock when the process dies (even by SIGKILL), so
  a crashed run never leaves it stuck, and a second ``zoo run`` on a directory a live run holds is refused
  with one line naming that process. Stdlib only, so a test can hold the lock from a bare subprocess.
- `set_aside` / `restore_set_aside` / `drop_set_aside`: a fresh run in a directory that holds an earlier
  run moves the earlier run's files into ``.replaced/`` and deletes them only once the new run has logged
  its first iteration (or finished); a run that fails or is stopped before that (a bad ``--dataset`` is
  read only when training starts) puts the earlier run back as it was, so ``--overwrite`` loses nothing to
  a mistake.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import IO

from rlhf_zoo.errors import ConfigError

LOCK_FILE = "run.lock"
#: what a run writes in its directory (a fresh run in the directory replaces these; nothing else is touched)
RUN_ENTRIES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "policy", "model", "adapter", "rounds", "plots",
               "samples", "tensorboard", "wandb", "trackers", "eval", "responses.jsonl")
ASIDE = ".replaced"  # an earlier run's files while a fresh run in its directory has not logged anything yet
TOLERATED = ("stderr.log",)  # a failed benchmark run's log (`rlhf_zoo.bench.execute`): kept, never refused
_HELD: dict[str, IO[str]] = {}  # run directories this process holds: resolved path -> open lock file


def check_out(out: Path, *, resume: bool, overwrite: bool | None) -> None:
    """Refuse an ``--out`` that cannot hold the run (a `ConfigError` saying what is there), before any work.

    ``overwrite``: ``zoo run`` passes False, or True with ``--overwrite``: a directory that holds anything
    but a run's files is refused, and one that holds a run's files is refused unless the run resumes or
    overwrites it. None (the Python API's default): only the path is checked, and a fresh run replaces an
    earlier run's files (`RUN_ENTRIES`) without asking."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is a file, not a directory; give a directory path")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a directory; give a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; choose a directory you can write to")
    if not out.is_dir():
        return
    holder = _live_holder(out)
    if holder is not None:
        raise _in_use(out, holder)
    if overwrite is None:
        return
    entries = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_FILE, *TOLERATED))
    foreign = [n for n in entries if n not in (*RUN_ENTRIES, ASIDE)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ConfigError(f"--out {out} is not a run directory (it holds {shown}); give a new or empty directory")
    if resume or overwrite or not _holds_anything(out, entries):
        return
    raise ConfigError(f"--out {out} is not empty: it holds {describe_run(out)}; add --resume to continue it, "
                      "--overwrite to replace it, or give another --out")


def _holds_anything(out: Path, entries: list[str]) -> bool:
    """Whether a fresh run would lose something: an empty metrics.jsonl alone (a run stopped before its
    first iteration) is nothing."""
    return any(n != "metrics.jsonl" or (out / n).stat().st_size > 0 for n in entries)


def describe_run(out: Path) -> str:
    """What a run directory holds, for a one-line refusal: the run, its metrics rows, checkpoints, summary."""
    parts = []
    try:
        config = json.loads((out / "config.json").read_text())
        parts.append(f"a run of {config.get('algorithm')} on {config.get('task')} (seed {config.get('seed')})")
    except (OSError, ValueError, AttributeError):
        pass
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, "rb") as f:
            parts.append(f"metrics.jsonl ({sum(1 for line in f if line.strip())} rows)")
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("iter-*")) if (out / "checkpoints").is_dir() else []
    if checkpoints:
        parts.append(f"{len(checkpoints)} checkpoint{'s' * (len(checkpoints) > 1)} (last {checkpoints[-1]})")
    parts += [n for n in ("summary.json", "policy/", "model/", "rounds/") if (out / n.rstrip("/")).exists()]
    return ", ".join(parts) or "files of an earlier run"


def _live_holder(out: Path) -> str | None:
    """Who holds ``out``'s lock now (its pid and host), or None; takes nothing."""
    if str(out.resolve()) in _HELD or not (out / LOCK_FILE).is_file():
        return None
    with open(out / LOCK_FILE) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
    return None


def _in_use(out: Path, holder: str) -> ConfigError:
    return ConfigError(f"--out {out} is in use by another zoo run ({holder}); wait for it to finish, or give "
                       "another --out")


def lock_run_dir(out: Path) -> bool:
    """Make this process the one writer of ``out`` (created if missing) until it exits or `unlock_run_dir`.
    A directory another live process holds: `ConfigError` naming that process. Returns whether this call
    took the lock (False: this process already held it, and the earlier taker releases it)."""
    key = str(out.resolve())
    if key in _HELD:  # this process already holds it (a second context in the same process)
        return False
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise _in_use(out, holder) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD[key] = f
    return True


def holds(out: Path) -> bool:
    """Whether this process holds ``out``'s lock."""
    return str(Path(out).resolve()) in _HELD


def unlock_run_dir(out: Path) -> None:
    """Release the lock `lock_run_dir` took (closing the file drops it); the lock file stays."""
    f = _HELD.pop(str(out.resolve()), None)
    if f is not None:
        f.close()


def set_aside(out: Path) -> None:
    """A fresh run starts in ``out``: move what an earlier run wrote there (`RUN_ENTRIES`) into ``.replaced/``
    and start an empty metrics.jsonl. A ``.replaced/`` left by a run that was killed before its first
    iteration holds the run before that one, which that run's start had replaced: it is dropped."""
    aside = out / ASIDE
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for name in RUN_ENTRIES:
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, aside / name)
    (out / "metrics.jsonl").write_text("")


def restore_set_aside(out: Path) -> bool:
    """The fresh run failed or was stopped before its first iteration: delete what it wrote and put the
    earlier run's files back. Returns whether an earlier run was restored."""
    aside = out / ASIDE
    if not aside.is_dir():
        return False
    _remove_entries(out)
    kept = sorted(p.name for p in aside.iterdir())
    for name in kept:
        os.replace(aside / name, out / name)
    aside.rmdir()
    return bool(kept)


def drop_set_aside(out: Path) -> None:
    """The fresh run has started for good (its first metrics row, or its end): delete the earlier run."""
    aside = out / ASIDE
    if aside.is_dir():
        shutil.rmtree(aside)


def _remove_entries(out: Path) -> None:
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
