"""CLI start-up time: ``zoo --help``, ``zoo list`` and ``zoo run ppo --help`` in fresh processes.

Each command runs ``--runs`` times in a new Python process (after one warm-up run that is not counted:
it compiles bytecode and, for ``list`` and ``run ppo --help``, builds the plugin index). Reported per
command: the median wall time and the median CPU time (user + system of the child; steadier than wall
time on a busy machine), with the load average before and after. One more run under
``python -X importtime`` lists the heaviest imports left and whether torch, transformers or datasets
were imported at all.

    python benchmarks/cli_startup.py --runs 15 --label after
    python benchmarks/cli_startup.py --runs 15 --label before --pythonpath /tmp/zoo-head   # a worktree of HEAD

Results merge into benchmarks/results/cli_startup.json (one entry per label) and cli_startup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {"zoo --help": ["--help"], "zoo list": ["list"], "zoo run ppo --help": ["run", "ppo", "--help"]}
HEAVY = ("torch", "transformers", "datasets", "numpy", "gymnasium")
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def zoo_argv(args: list[str], importtime: bool = False) -> list[str]:
    """The installed console script when there is one (what a user runs), else ``python -m rlhf_zoo``."""
    script = Path(sys.executable).parent / "zoo"
    flags = ["-X", "importtime"] if importtime else []
    entry = [str(script)] if script.is_file() else ["-m", "rlhf_zoo"]
    return [sys.executable, *flags, *entry, *args]


def timed_run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one run; the command must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_profile(args: list[str], env: dict[str, str], top: int) -> dict:
    """Parse ``-X importtime``: the heaviest top-level imports (cumulative) and which heavy packages loaded."""
    proc = subprocess.run(zoo_argv(args, importtime=True), env=env, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            rows.append({"module": m.group(4), "self_ms": int(m.group(1)) / 1000,
                         "cumulative_ms": int(m.group(2)) / 1000, "depth": len(m.group(3)) // 2})
    top_level = sorted((r for r in rows if r["depth"] == 0), key=lambda r: -r["cumulative_ms"])
    names = {r["module"] for r in rows}
    return {"total_ms": sum(r["self_ms"] for r in rows), "modules": len(rows),
            "heavy_imported": [h for h in HEAVY if h in names],
            "top": [{k: r[k] for k in ("module", "cumulative_ms")} for r in top_level[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=11, help="timed runs per command (the median is reported)")
    ap.add_argument("--label", default="current", help="name of this measurement (e.g. before, after)")
    ap.add_argument("--pythonpath", default=None, help="put this source tree first (e.g. a worktree of HEAD)")
    ap.add_argument("--top", type=int, default=8, help="heaviest imports listed per command")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cli_startup.json")
    args = ap.parse_args()

    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.pythonpath, env.get("PYTHONPATH")) if p)
    load_before = os.getloadavg()
    results = {}
    for name, cmd in COMMANDS.items():
        first_wall, _ = timed_run(zoo_argv(cmd), env)  # warm-up: bytecode, the plugin index
        walls, cpus = zip(*(timed_run(zoo_argv(cmd), env) for _ in range(args.runs)))
        results[name] = {"median_wall_s": statistics.median(walls), "median_cpu_s": statistics.median(cpus),
                         "min_wall_s": min(walls), "first_wall_s": first_wall,
                         "imports": import_profile(cmd, env, args.top)}
        r = results[name]
        print(f"{name:<20} wall {r['median_wall_s']:.3f} s (min {r['min_wall_s']:.3f})  cpu {r['median_cpu_s']:.3f} s"
              f"  heavy imports: {', '.join(r['imports']['heavy_imported']) or 'none'}")
        for t in r["imports"]["top"]:
            print(f"    {t['cumulative_ms']:8.1f} ms  {t['module']}")
    entry = {"runs": args.runs, "load_average_before": load_before, "load_average_after": os.getloadavg(),
             "cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.platform(),
             "pythonpath": args.pythonpath, "commands": results,
             "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                      cwd=args.pythonpath or Path(__file__).parent).stdout.strip()}
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[args.label] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(data))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def report(data: dict) -> str:
    """A Markdown table: one row per command, one column pair per label."""
    labels = list(data)
    lines = ["# CLI start-up", "", "Median of fresh processes (wall / CPU seconds); see benchmarks/cli_startup.py.", "",
             "| command | " + " | ".join(f"{lb} wall | {lb} cpu" for lb in labels) + " |",
             "|---|" + "---:|---:|" * len(labels)]
    for cmd in COMMANDS:
        cells = [f"{data[lb]['commands'][cmd]['median_wall_s']:.3f} | {data[lb]['commands'][cmd]['median_cpu_s']:.3f}"
                 if cmd in data[lb]["commands"] else "- | -" for lb in labels]
        lines.append(f"| `{cmd}` | " + " | ".join(cells) + " |")
    lines.append("")
    for lb in labels:
        e = data[lb]
        lines.append(f"**{lb}** (commit {e['commit']}, {e['runs']} runs, {e['cpus']} CPUs, load average "
                     f"{e['load_average_before'][0]:.2f} before, {e['load_average_after'][0]:.2f} after): heavy "
                     "imports: " + "; ".join(f"`{c}`: {', '.join(r['imports']['heavy_imported']) or 'none'}"
                                            for c, r in e["commands"].items()))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
