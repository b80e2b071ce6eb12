"""Iterated online RLHF against a fixed reward model with the same labels and RL iterations.

Runs ``zoo run iterated-rlhf --task sentiment --preset quick`` with ``--label-schedule iterated`` (label
the current policy's samples every round, retrain the reward model) and ``upfront`` (the control: the
same number of rankings, all from the starting policy, one reward model), seeds 0..N-1, one process at a
time, and reports per round and at the end: gold reward, proxy reward (under that round's reward model),
KL, and the reward models' accuracy against the gold preference on the current policy's samples.

    python benchmarks/iterated_rlhf.py --seeds 3 --out benchmarks/results/iterated_rlhf.json --md benchmarks/results/iterated_rlhf.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCHEDULES = ("iterated", "upfront")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    from rlhf_zoo.runner import _git_commit, versions

    runs: dict[str, list[dict]] = {s: [] for s in SCHEDULES}
    with tempfile.TemporaryDirectory(prefix="zoo-iterated-") as tmp:
        for seed in range(args.seeds):
            for schedule in SCHEDULES:
                out = Path(tmp) / f"{schedule}-{seed}"
                cmd = [sys.executable, "-m", "rlhf_zoo", "run", "iterated-rlhf", "--task", args.task, "--preset", "quick",
                       "--label-schedule", schedule, "--seed", str(seed), "--quiet", "--out", str(out)]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                s = json.loads((out / "summary.json").read_text())
                runs[schedule].append({"seed": seed, "seconds": round(time.perf_counter() - start, 1),
                                       "gold_reward": s["gold_reward"], "baseline_gold_reward": s["baseline_gold_reward"],
                                       "proxy_reward": s["proxy_reward"], "kl_to_ref": s["kl_to_ref"],
                                       "rounds": s["rounds"]})
                print(schedule, seed, {k: runs[schedule][-1][k] for k in ("gold_reward", "proxy_reward", "kl_to_ref")},
                      flush=True)

    def mean(schedule: str, key: str, round_: int | None = None) -> float | None:
        vals = [(r["rounds"][round_] if round_ is not None else r).get(key) for r in runs[schedule]]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    n_rounds = len(runs["iterated"][0]["rounds"])
    table = {s: [{k: mean(s, k, i) for k in ("gold_reward", "proxy_reward", "kl_to_ref", "rm_accuracy_before",
                                             "rm_accuracy_after")} for i in range(n_rounds)] for s in SCHEDULES}
    result = {"task": args.task, "seeds": list(range(args.seeds)), "preset": "quick", "runs": runs,
              "mean_per_round": table,
              "final": {s: {k: mean(s, k) for k in ("gold_reward", "proxy_reward", "kl_to_ref", "baseline_gold_reward")}
                        for s in SCHEDULES},
              "load_average": os.getloadavg(), "versions": versions(), "git_commit": _git_commit()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        def f(v: float | None) -> str:
            return "" if v is None else f"{v:.3f}"

        lines = [f"# Iterated online RLHF vs a fixed reward model ({args.task}, quick preset, seeds 0-{args.seeds - 1})",
                 "", f"Commit {result['git_commit']}. Both schedules label the same number of rankings and run the "
                 "same RL iterations; proxy is under that round's reward model; RM accuracy is against the gold "
                 "preference on the current policy's held-out samples (before: the previous round's reward model).",
                 "", "| schedule | round | gold | proxy | KL | RM acc. before | RM acc. after |", "|---|---|---|---|---|---|---|"]
        for s in SCHEDULES:
            for i, row in enumerate(table[s], start=1):
                lines.append(f"| {s} | {i} | {f(row['gold_reward'])} | {f(row['proxy_reward'])} | {f(row['kl_to_ref'])} | "
                             f"{f(row['rm_accuracy_before'])} | {f(row['rm_accuracy_after'])} |")
        lines += ["", "Final evaluation (the runner's, on the held-out prompts; baseline = the SFT policy):", "",
                  "| schedule | gold | baseline gold | proxy | KL |", "|---|---|---|---|---|"]
        for s in SCHEDULES:
            fin = result["final"][s]
            lines.append(f"| {s} | {f(fin['gold_reward'])} | {f(fin['baseline_gold_reward'])} | {f(fin['proxy_reward'])} "
                         f"| {f(fin['kl_to_ref'])} |")
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
