"""Torch threads per run: 1 thread against all usable cores, alone and next to competing busy processes.

The figures behind ``zoo run --threads auto`` (`rlhf_zoo.threads`, issue 15 item 6). Each measurement is a
fresh process: a short ``zoo run`` on a built-in task (start-up, task loading, training and the final
evaluation), or a matmul loop standing in for larger models, with ``--threads T`` (OMP_NUM_THREADS and
MKL_NUM_THREADS removed from its environment). Conditions:

    alone   nothing else started by the benchmark (the machine's own load is recorded with every sample)
    busy    ``--busy`` pure-Python spin loops (one core each) running for the whole measurement: another
            job on the machine, which a pool of as many threads as cores then has to share cores with

Repetitions are interleaved (every case, condition and thread count once, then again), so drift in the
machine's load spreads over all cells; each cell is the median of ``--reps``. Per sample: the process's
wall time, the run's own ``wall_seconds`` (summary.json: without Python and torch start-up) and the
process's CPU seconds, plus the 1-minute load average before it started.

    python benchmarks/threads.py                      # the real figures: quiet machine, ~15-25 min on 2 cores
    python benchmarks/threads.py --quick --out /tmp/threads-quick   # end to end in ~2 min (1 rep, smallest runs)

Writes OUT/threads.json and OUT/threads.md (default OUT: benchmarks/results; with --quick a temporary
directory unless --out is given, so a check never replaces the committed figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf_zoo.runner import versions as runner_versions

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: case -> (kind, arguments). ``zoo``: the arguments of ``zoo``; ``matmul``: (size, iterations)
CASES: dict[str, tuple[str, list[str]]] = {
    "grpo-exact": ("zoo", ["run", "grpo", "--task", "exact", "--preset", "quick"]),
    "ppo-sentiment": ("zoo", ["run", "ppo", "--task", "sentiment", "--preset", "quick", "--iterations", "20"]),
    "dpo-sentiment": ("zoo", ["run", "dpo", "--task", "sentiment", "--preset", "smoke", "--steps", "300",
                              "--max-pairs", "2400", "--eval-prompts", "32"]),
    "matmul-512": ("matmul", ["512", "4000"]),
}
QUICK_CASES: dict[str, tuple[str, list[str]]] = {
    "grpo-exact-smoke": ("zoo", ["run", "grpo", "--task", "exact", "--preset", "smoke"]),
    "matmul-128": ("matmul", ["128", "50"]),
}
DESCRIPTIONS = {
    "grpo-exact": "grpo on exact, the quick preset (150 iterations; hidden size 32), the run issue 15 reported",
    "ppo-sentiment": "ppo on sentiment, 20 iterations of the quick preset (hidden size 64)",
    "dpo-sentiment": "dpo on sentiment, 300 steps of 8 pairs (hidden size 64)",
    "matmul-512": "4000 fp32 512 x 512 matmuls (the op size of a larger model)",
    "grpo-exact-smoke": "grpo on exact, the smoke preset (2 iterations)",
    "matmul-128": "50 fp32 128 x 128 matmuls",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SPIN = "while True:\n    pass\n"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def git_commit() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=HERE, capture_output=True,
                         text=True)
    return out.stdout.strip() or "unknown"


def child_env() -> dict[str, str]:
    """The measured process's environment: no thread variables, so --threads alone sets the count."""
    return {k: v for k, v in os.environ.items() if k not in THREAD_VARS}


def matmul_child(size: int, iterations: int, threads: int) -> None:
    """``--matmul-child``: ``iterations`` (size x size) fp32 matmuls on ``threads`` threads; prints JSON."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    start = time.perf_counter()
    for _ in range(iterations):
        c = a @ b
        a = c / c.norm()  # a chain: no step can be skipped or reordered
    print(json.dumps({"wall_seconds": time.perf_counter() - start, "torch_threads": torch.get_num_threads()}))


def measure(case: str, kind: str, args: list[str], threads: int, work: Path) -> dict[str, Any]:
    """One fresh process of ``case`` on ``threads`` threads: its wall, CPU and run-only seconds."""
    if kind == "zoo":
        out = work / f"{case}-t{threads}"
        argv = [sys.executable, "-m", "rlhf_zoo", *args, "--threads", str(threads), "--device", "cpu", "--quiet",
                "--out", str(out), "--overwrite"]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--matmul-child", *args, str(threads)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = load1()
    start = time.perf_counter()
    proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise SystemExit(f"threads.py: {case} with {threads} thread(s) failed: {last}")
    if kind == "zoo":
        run_seconds = json.loads((out / "summary.json").read_text())["wall_seconds"]
        recorded = json.loads((out / "config.json").read_text()).get("torch_threads")
        shutil.rmtree(out, ignore_errors=True)
    else:
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        run_seconds, recorded = child["wall_seconds"], child["torch_threads"]
    if recorded != threads:
        raise SystemExit(f"threads.py: {case} asked for {threads} thread(s) but ran with {recorded}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"process_seconds": round(wall, 3), "run_seconds": round(float(run_seconds), 3),
            "cpu_seconds": round(cpu, 3), "load_before": load}


class Busy:
    """``n`` spinning Python processes (one core each) while the block runs; ended by their own ids."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN], env=child_env()) for _ in range(self.n)]
        if self.n:
            time.sleep(1.0)  # scheduled and spinning before the measured process starts
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (case, condition, threads), with the speed-up of each count over 1 thread."""
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for s in samples:
        cells.setdefault((s["case"], s["condition"], s["threads"]), []).append(s)
    rows = []
    for (case, condition, threads), group in cells.items():
        row = {"case": case, "condition": condition, "threads": threads, "reps": len(group)}
        for key in ("process_seconds", "run_seconds", "cpu_seconds"):
            row[f"median_{key}"] = round(statistics.median(g[key] for g in group), 3)
        loads = [g["load_before"] for g in group if g["load_before"] is not None]
        row["median_load_before"] = round(statistics.median(loads), 2) if loads else None
        rows.append(row)
    for row in rows:
        one = next((r for r in rows if (r["case"], r["condition"], r["threads"]) == (row["case"], row["condition"], 1)),
                   None)
        row["run_speedup_vs_1"] = (round(one["median_run_seconds"] / row["median_run_seconds"], 3)
                                   if one and row["median_run_seconds"] > 0 else None)
    return rows


def render(result: dict[str, Any]) -> str:
    m, counts = result["machine"], result["settings"]["threads"]
    lines = ["# Torch threads per run" + (" (--quick: a check, not figures)" if result["quick"] else ""), "",
             f"`{result['command']}` — commit {result['git_commit']}, {result['created']}.", "",
             f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs ({m['usable_cores']} usable); "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f"; 1-minute load average {result['load_before']} before, {result['load_after']} after "
               f"(median before each sample in the table).", "",
             f"Fresh process per sample; median of {result['settings']['reps']} interleaved repetitions. "
             "run s: summary.json's `wall_seconds` (without Python/torch start-up); process s: the whole process; "
             f"busy: {result['settings']['busy']} spinning process(es) running alongside. speed-up: run s at 1 "
             "thread / run s at N threads (> 1: more threads helped).", "",
             "| case | condition | " + " | ".join(f"{t} thr run s | {t} thr process s" for t in counts)
             + " | " + " | ".join(f"speed-up {t} thr" for t in counts if t != 1) + " | load |",
             "|---|---|" + "---:|---:|" * len(counts) + "---:|" * sum(t != 1 for t in counts) + "---:|"]
    table = {(r["case"], r["condition"], r["threads"]): r for r in result["summary"]}
    for case in result["settings"]["cases"]:
        for condition in result["settings"]["conditions"]:
            cells = [table.get((case, condition, t)) for t in counts]
            if not any(cells):
                continue
            vals = " | ".join(f"{c['median_run_seconds']:.3f} | {c['median_process_seconds']:.2f}" if c else "- | -"
                              for c in cells)
            ups = " | ".join(f"{c['run_speedup_vs_1']:.2f}x" if c and c["run_speedup_vs_1"] else "-"
                             for c, t in zip(cells, counts) if t != 1)
            loads = [c["median_load_before"] for c in cells if c and c["median_load_before"] is not None]
            lines.append(f"| {case} | {condition} | {vals} | {ups} | {max(loads) if loads else '-'} |")
    lines += ["", "Cases:", *[f"- {c}: {DESCRIPTIONS.get(c, c)}" for c in result["settings"]["cases"]], ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition of the smallest runs: checks it end to end")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per cell (default 5; --quick: 1)")
    ap.add_argument("--threads", default=None, help="comma-separated counts (default: 1 and the usable cores)")
    ap.add_argument("--cases", default=None, help="comma-separated cases (default: all of the mode's)")
    ap.add_argument("--conditions", default="alone,busy", help="alone, busy or both (default both)")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes of the busy condition (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="directory of threads.json and threads.md")
    ap.add_argument("--matmul-child", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.matmul_child:
        matmul_child(*args.matmul_child)
        return None
    table = QUICK_CASES if args.quick else CASES
    cases = args.cases.split(",") if args.cases else list(table)
    unknown = [c for c in cases if c not in table]
    if unknown:
        raise SystemExit(f"threads.py: unknown case(s) {unknown}; known: {', '.join(table)}")
    conditions = args.conditions.split(",")
    if not set(conditions) <= {"alone", "busy"} or not conditions:
        raise SystemExit(f"threads.py: --conditions {args.conditions!r}: expected alone, busy or alone,busy")
    cores = usable_cores()
    counts = sorted({int(t) for t in args.threads.split(",")} if args.threads else {1, cores})
    if min(counts) < 1:
        raise SystemExit(f"threads.py: --threads {args.threads!r}: counts must be >= 1")
    reps = args.reps or (1 if args.quick else 5)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="zoo-threads-")) if args.quick else RESULTS)
    command = " ".join(["python", "benchmarks/threads.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "command": command, "git_commit": git_commit(), "versions": runner_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "usable_cores": cores},
        "settings": {"cases": cases, "conditions": conditions, "threads": counts, "reps": reps, "busy": args.busy,
                     "commands": {c: table[c] for c in cases}},
        "load_before": load1(), "samples": [],
    }
    with tempfile.TemporaryDirectory(prefix="zoo-threads-runs-") as tmp:
        for rep in range(reps):
            for case in cases:
                kind, case_args = table[case]
                for condition in conditions:
                    with Busy(args.busy if condition == "busy" else 0):
                        for threads in counts:
                            s = measure(case, kind, case_args, threads, Path(tmp))
                            s.update(case=case, condition=condition, threads=threads, rep=rep)
                            result["samples"].append(s)
                            print(f"rep {rep + 1}/{reps} {case:<14} {condition:<5} {threads:>2} thr: run "
                                  f"{s['run_seconds']:8.2f} s  process {s['process_seconds']:8.2f} s  cpu "
                                  f"{s['cpu_seconds']:8.2f} s  load {s['load_before']}", flush=True)
    result["load_after"] = load1()
    result["summary"] = summarise(result["samples"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (out_dir / "threads.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'threads.json'} and {out_dir / 'threads.md'}")
    return result


if __name__ == "__main__":
    main()
