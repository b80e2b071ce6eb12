"""Every algorithm on a user's own model: the GPT-2 fixture (`rlhf_zoo.fixtures`: byte-level BPE, pad ==
eos, no BOS), ``--preset quick``, one process per run, one after the other.

Every run gets the same Python reward (``keyword_reward:reward``: how often the completion says "happy")
and the same held-out conversational prompts, so ``proxy_reward`` against ``baseline_proxy_reward`` (the
starting model on the same prompts and seed) is the reward before and after for every algorithm; sft and
dpo do not train on it (they only report it), the others optimise it. The reward model reports its
held-out ranking accuracy instead.

    python benchmarks/user_models.py --out benchmarks/results/user_models.json --md benchmarks/results/user_models.md
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

REWARD = ["--reward", "keyword_reward:reward"]
PROMPTS = ["--prompts", "prompts_conv.jsonl"]
EVAL = ["--eval-prompts", "64", "--eval-samples", "4"]  # every run and its baseline scored alike
RUNS = {  # algorithm -> its data options
    "sft": ["--dataset", "demos_messages.jsonl", *REWARD, *PROMPTS],
    "reward-model": ["--dataset", "conv.jsonl"],
    "dpo": ["--dataset", "conv.jsonl", *REWARD, *PROMPTS],
    "ppo": [*REWARD, *PROMPTS],
    "ppo-ptx": [*REWARD, *PROMPTS, "--ptx-dataset", "ptx.jsonl"],
    "rrhf": [*REWARD, *PROMPTS],
    "rejection-sampling": [*REWARD, *PROMPTS],
    "best-of-n": [*REWARD, *PROMPTS],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    from rlhf_zoo.fixtures import build_policy, write_datasets
    from rlhf_zoo.runner import _git_commit, versions

    rows = {}
    with tempfile.TemporaryDirectory(prefix="zoo-user-models-") as tmp:
        tmp = Path(tmp)
        build_policy("gpt2", tmp / "gpt2")
        write_datasets(tmp)
        for algo, options in RUNS.items():
            cmd = [sys.executable, "-m", "rlhf_zoo", "run", algo, "--model", "gpt2", *options, "--preset", "quick", *EVAL,
                   "--quiet", "--out", f"runs/{algo}"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{algo} failed:\n{proc.stderr[-3000:]}")
            s = json.loads((tmp / "runs" / algo / "summary.json").read_text())
            rows[algo] = {"command": " ".join(["zoo", *cmd[3:]]), "process_seconds": round(time.perf_counter() - start, 1),
                          "wall_seconds": s["wall_seconds"], **{k: s[k] for k in (
                              "baseline_proxy_reward", "proxy_reward", "win_rate_vs_reference", "kl_to_ref",
                              "heldout_label_accuracy", "trainable_parameters") if k in s}}
            print(algo, rows[algo], flush=True)
    result = {"model": "rlhf_zoo.fixtures gpt2 (2 layers, hidden 32, 400-token byte-level BPE)", "runs": rows,
              "load_average": os.getloadavg(), "versions": versions(), "git_commit": _git_commit()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        lines = ["# Every algorithm on the GPT-2 fixture (`--preset quick`)", "",
                 f"Commit {result['git_commit']}; reward `keyword_reward:reward` on held-out conversational prompts; "
                 "wall seconds as summary.json reports them (the process adds ~5 s of imports).", "",
                 "| algorithm | wall s | reward before | reward after | win rate | KL to ref |", "|---|---|---|---|---|---|"]
        for algo, r in rows.items():
            if "heldout_label_accuracy" in r:
                lines.append(f"| {algo} | {r['wall_seconds']:.1f} | held-out ranking accuracy "
                             f"{r['heldout_label_accuracy']:.2f} | | | |")
                continue
            lines.append(f"| {algo} | {r['wall_seconds']:.1f} | {r['baseline_proxy_reward']:.3f} | "
                         f"{r['proxy_reward']:.3f} | {r['win_rate_vs_reference']:.2f} | {r['kl_to_ref']:.2f} |")
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
