"""Every algorithm at its ``quick`` preset on one task, several seeds, one process per run (as a user
runs them), with wall time measured around the whole process. Writes a JSON record and a Markdown table.

    python benchmarks/algorithms_quick.py --task sentiment --seeds 0 1 2 --out benchmarks/results/quick_sentiment
    python benchmarks/algorithms_quick.py --task exact --algos ppo dpo --preset default --seeds 0 1 2 \\
        --out benchmarks/results/exact_default

This is the issue-3 acceptance record, not the benchmark protocol (``zoo bench`` is that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ALGOS = ["ppo", "ppo-ptx", "dpo", "rrhf", "rejection-sampling", "best-of-n"]
FIELDS = ["gold_reward", "baseline_gold_reward", "kl_to_ref", "proxy_reward", "kl_to_optimum",
          "baseline_kl_to_optimum", "gold_helpfulness", "gold_harmlessness"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--algos", nargs="+", default=ALGOS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for algo in args.algos:
        for seed in args.seeds:
            run_dir = args.out / "runs" / f"{algo}-s{seed}"
            cmd = [sys.executable, "-m", "rlhf_zoo", "run", algo, "--task", args.task, "--seed", str(seed),
                   "--out", str(run_dir), "--quiet", "--device", "cpu"]
            if args.preset != "default":
                cmd += ["--preset", args.preset]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{algo} seed {seed} failed")
            s = json.loads((run_dir / "summary.json").read_text())
            rec = {"algorithm": algo, "seed": seed, "process_wall_seconds": round(wall, 1),
                   **{k: s[k] for k in FIELDS if k in s}}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    (args.out / "results.json").write_text(json.dumps({"task": args.task, "preset": args.preset,
                                                       "records": records}, indent=2))
    lines = [f"# {args.preset} preset on `{args.task}`, seeds {' '.join(map(str, args.seeds))}", "",
             "| algorithm | gold (mean) | SFT baseline (mean) | gold > baseline, all seeds | kl_to_ref (mean) "
             "| kl_to_optimum / baseline (max) | process wall s (max) |", "|---|---|---|---|---|---|---|"]
    for algo in args.algos:
        rs = [r for r in records if r["algorithm"] == algo]
        ratio = (f"{max(r['kl_to_optimum'] / r['baseline_kl_to_optimum'] for r in rs):.3f}"
                 if "kl_to_optimum" in rs[0] else "")
        lines.append(f"| {algo} | {statistics.mean(r['gold_reward'] for r in rs):.3f} | "
                     f"{statistics.mean(r['baseline_gold_reward'] for r in rs):.3f} | "
                     f"{all(r['gold_reward'] > r['baseline_gold_reward'] for r in rs)} | "
                     f"{statistics.mean(r['kl_to_ref'] for r in rs):.3f} | {ratio} | "
                     f"{max(r['process_wall_seconds'] for r in rs):.1f} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
