"""RRHF's candidate sources and the ablation without the ranking loss (the RRHF paper's Tables 2-4,
seed document 003), on ``sentiment`` at the quick preset.

Each configuration is one ``zoo run rrhf --preset quick`` with different ``--candidates`` (sample, beam,
diverse beam, the dataset's rankings, alone and mixed), ``--rank-weight 0`` (learning from best-of-N),
the paper's weights (``--ft-weight 1``) and IP-n rounds, for every seed; the table gives the mean over
seeds of the gold reward (the task's programmatic stand-in for human preference), the KL to the SFT
policy and the SFT baseline's gold reward on the same prompts. Beam search is also timed against
transformers' ``generate(num_beams=...)`` on the same batch.

    python benchmarks/rrhf_candidates.py --out benchmarks/results/rrhf_candidates.json \\
        --md benchmarks/results/rrhf_candidates.md

About 8 minutes on two CPU cores for 3 seeds (runs one after another, in one process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ALL = "sample:2,beam:2,diverse-beam:2,dataset:2"
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("sample:4 (default)", {}),
    ("beam:4", {"candidates": "beam:4"}),
    ("diverse-beam:4", {"candidates": "diverse-beam:4"}),
    ("dataset (4, a whole ranking)", {"candidates": "dataset"}),
    ("sample:2,dataset:2", {"candidates": "sample:2,dataset:2"}),
    (ALL, {"candidates": ALL}),
    ("sample:4, no ranking loss (best-of-4)", {"rank_weight": 0.0}),
    (f"{ALL}, no ranking loss", {"candidates": ALL, "rank_weight": 0.0}),
    ("sample:4, paper weights (ft 1)", {"ft_weight": 1.0}),
    ("sample:4, IP-4 (4 rounds)", {"rounds": 4}),
    ("sample:4, IP-4, kl-coef 0.1", {"rounds": 4, "kl_coef": 0.1}),
]
FIGURES = ("gold_reward", "kl_to_ref", "proxy_reward", "baseline_gold_reward", "win_rate_vs_reference",
           "response_length", "train_seconds")


def run_configs(seeds: list[int], only: str | None) -> list[dict[str, Any]]:
    from rlhf_zoo.runner import run

    out = []
    with tempfile.TemporaryDirectory(prefix="zoo-rrhf-cand-") as tmp:
        for i, (name, options) in enumerate(CONFIGS):
            if only and only not in name:
                continue
            runs = []
            for seed in seeds:
                start = time.perf_counter()
                s = run("rrhf", task="sentiment", seed=seed, out=Path(tmp) / f"{i}-s{seed}", device="cpu",
                        preset="quick", options=dict(options), progress=False)
                runs.append({"seed": seed, **{k: s[k] for k in FIGURES}, "seconds": round(time.perf_counter() - start, 1)})
                print(f"{name} seed {seed}: gold {s['gold_reward']:.3f} (SFT {s['baseline_gold_reward']:.3f}) "
                      f"kl {s['kl_to_ref']:.3f}", flush=True)
            mean = {k: statistics.fmean(r[k] for r in runs) for k in FIGURES}
            sd = {k: statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0 for k in ("gold_reward", "kl_to_ref")}
            out.append({"name": name, "options": options, "runs": runs, "mean": mean, "std": sd,
                        "gold_gain": mean["gold_reward"] - mean["baseline_gold_reward"]})
    return out


def beam_speed(prompt_counts: tuple[int, ...] = (16, 64), beams: int = 4, repeats: int = 5) -> list[dict[str, Any]]:
    """rlhf_zoo.beam.beam_search against transformers' generate(num_beams) on the SFT policy of sentiment:
    median seconds of ``repeats`` calls, and how often the two return the same W responses in the same order."""
    import torch

    from rlhf_zoo.beam import beam_search
    from rlhf_zoo.ops import response_logprobs
    from rlhf_zoo.registry import get_registry

    task = get_registry().task("sentiment").load(seed=0, progress=False)
    model = task.load_policy().eval()
    T, kw = task.max_new_tokens, {"eos_token_id": task.eos_token_id, "pad_token_id": task.pad_token_id}
    out = []
    for n in prompt_counts:
        ids, mask = task.encode_prompts(task.prompts("train")[:n], "cpu")

        def ours(ids: Any = ids, mask: Any = mask) -> Any:
            return beam_search(model, ids, mask, T, num_beams=beams, suppress_ids=task.suppress_ids, **kw)

        @torch.no_grad()
        def hf(ids: Any = ids, mask: Any = mask) -> Any:
            return model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams,
                                  max_new_tokens=T, do_sample=False, length_penalty=0.0, early_stopping="never",
                                  suppress_tokens=list(task.suppress_ids), **kw)

        times = {}
        for name, fn in (("rlhf_zoo", ours), ("transformers", hf)):
            fn()  # warm-up
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                result = fn()
                samples.append(time.perf_counter() - start)
            times[name] = (statistics.median(samples), result)
        b, seq = times["rlhf_zoo"][1], times["transformers"][1][:, ids.shape[1]:]
        same = 0
        hf_mask = torch.zeros_like(seq)
        for x in range(n):
            theirs = []
            for j in range(beams):
                row = seq[x * beams + j]
                eos = (row == task.eos_token_id).nonzero()
                length = int(eos[0]) + 1 if len(eos) else row.shape[0]
                hf_mask[x * beams + j, :length] = 1
                theirs.append(row[:length].tolist())
            mine = [r[m.bool()].tolist() for r, m in zip(b.response_ids[x], b.response_mask[x], strict=True)]
            same += mine == theirs
        with torch.no_grad():  # transformers' beams scored like ours: log pi(y|x), suppressed ids renormalised
            hf_lp = response_logprobs(model, ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0), seq,
                                      hf_mask, 1.0, task.suppress_ids).sum(-1)
        out.append({"prompts": n, "beams": beams, "max_new_tokens": T,
                    "rlhf_zoo_seconds": round(times["rlhf_zoo"][0], 4),
                    "transformers_seconds": round(times["transformers"][0], 4),
                    "ratio": round(times["rlhf_zoo"][0] / times["transformers"][0], 2),
                    "same_beams_fraction": same / n,
                    "mean_logprob_rlhf_zoo": round(float(b.scores.mean()), 4),
                    "mean_logprob_transformers": round(float(hf_lp.mean()), 4)})
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# RRHF: candidate sources and the ranking loss (`sentiment`, quick preset)",
        "",
        f"`python benchmarks/rrhf_candidates.py`: seeds {', '.join(map(str, r['seeds']))}; commit "
        f"{r['git_commit']}, torch {r['versions'].get('torch')}, transformers {r['versions'].get('transformers')}, "
        f"{r['machine']['cpu_count']} CPUs. Each row is `zoo run rrhf --task sentiment --preset quick` with the "
        "options shown (40 iterations x 16 prompts, ft_weight 10 unless said, lr 1e-4); figures are means over "
        "seeds (gold: the task's programmatic reward on 64 held-out prompts x 2 samples; KL: to the SFT policy, "
        "per response; SFT: the starting policy's gold on the same prompts).",
        "",
        "| candidates | gold | gold - SFT | KL to SFT | proxy | win rate vs SFT | length | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["configs"]:
        m, sd = c["mean"], c["std"]
        lines.append(f"| {c['name']} | {m['gold_reward']:.3f} ± {sd['gold_reward']:.3f} | {c['gold_gain']:+.3f} | "
                     f"{m['kl_to_ref']:.2f} ± {sd['kl_to_ref']:.2f} | {m['proxy_reward']:.3f} | "
                     f"{m['win_rate_vs_reference']:.2f} | {m['response_length']:.1f} | {m['train_seconds']:.1f} |")
    base = r["configs"][0]["mean"]["baseline_gold_reward"]
    lines += ["", f"SFT baseline gold (mean over seeds): {base:.3f}. ± is the standard deviation over seeds.", "",
              "Beam search (`rlhf_zoo.beam.beam_search`) against transformers' `generate(num_beams=W, "
              "length_penalty=0, early_stopping='never')` on the SFT policy, median of 5 calls:", "",
              "| prompts | beams | rlhf_zoo s | transformers s | ratio | same beams | mean log-prob of a beam: rlhf_zoo | "
              "transformers |", "|---|---|---|---|---|---|---|---|"]
    for s in r["beam_speed"]:
        lines.append(f"| {s['prompts']} | {s['beams']} | {s['rlhf_zoo_seconds']:.4f} | {s['transformers_seconds']:.4f} | "
                     f"{s['ratio']:.2f} | {s['same_beams_fraction']:.2f} | {s['mean_logprob_rlhf_zoo']:.3f} | "
                     f"{s['mean_logprob_transformers']:.3f} |")
    lines += ["", "transformers renormalises nothing after `suppress_tokens` (it masks after the log-softmax), "
              "so its beam scores differ slightly from the project's log-probs (suppressed ids masked before "
              "it, as the sampler and trainers do); that and near-ties explain the beams that differ."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="Run only the configurations whose name contains this.")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from rlhf_zoo.bench.harness import machine_info
    from rlhf_zoo.runner import _git_commit, versions

    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    result = {"task": "sentiment", "preset": "quick", "seeds": seeds, "configs": run_configs(seeds, args.only),
              "beam_speed": beam_speed(), "seconds": None,
              "machine": {**machine_info([]), "devices": ["cpu"], "load_average": os.getloadavg()},
              "versions": versions(), "git_commit": _git_commit(), "torch_threads": torch.get_num_threads()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2)
    print(markdown(result))
    if args.out:
        args.out.write_text(text + "\n")
    if args.md:
        args.md.write_text(markdown(result))


if __name__ == "__main__":
    main()
