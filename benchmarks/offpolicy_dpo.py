"""SFT-then-DPO against plain DPO on preference pairs that were NOT sampled from the reference (issue 11,
item 3; the DPO paper, sec. 4, "DPO outline"; seed 004, "改进训练方法": with preference data from elsewhere,
first SFT on the preferred responses, so that the model's distribution matches the labelled data).

1. The dataset. On the ``sentiment`` task, K responses per training prompt are sampled from a policy other
   than the reference (by default the task's pretrained model before SFT, ``task.load_pretrained()``, at a
   raised temperature), scored with the task's gold reward, ranked by the task's simulated labelers
   (`rlhf_zoo_envs.tasks.labelers.rank`, Plackett-Luce at the labeler temperature the task calibrated,
   ``task.manifest["labelers"]``), and written as prompt/chosen/rejected rows (all C(K,2) pairs of a
   ranking, identical texts dropped) to a .jsonl. How far the data is from the reference is measured: the
   reference's mean token NLL of the chosen responses, against that of the task's own (on-policy) pairs.
2. The runs. ``zoo run dpo --task sentiment --dataset FILE --preset quick`` (one epoch) plain and with
   ``--sft-steps N`` on seeds 0, 1, 2, one process each. With ``--sft-steps`` the reference (and the
   ``baseline_*`` figures) is the SFT-on-chosen model; so that both variants are also measured against the
   same model, each saved policy is evaluated again here against the task's SFT policy on the same prompts
   and sampling seed as the run's own evaluation (``kl_to_task_sft``; its gold reward reproduces the run's).

    python benchmarks/offpolicy_dpo.py --out benchmarks/results/offpolicy_dpo.json --md benchmarks/results/offpolicy_dpo.md

About four minutes on two CPU cores (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TASK = "sentiment"
DATA_SEED = 1234  # the dataset's sampling and labelling streams (fixed: every run trains on the same pairs)
FIGURES = ("gold_reward", "proxy_reward", "kl_to_ref", "baseline_gold_reward", "baseline_proxy_reward",
           "win_rate_vs_reference", "response_length", "wall_seconds")


def build_dataset(task, path: Path, *, source: str, temperature: float, n_prompts: int, k: int) -> dict:
    """Sample K responses per training prompt from ``source``, rank them with the simulated labelers, write
    prompt/chosen/rejected rows to ``path``. Returns the dataset's description and statistics."""
    from rlhf_zoo.policy import ModelPolicy
    from rlhf_zoo_envs.tasks import labelers

    model = task.load_pretrained("cpu") if source == "pretrained" else task.load_policy("cpu")
    prompts = task.prompts("train")[:n_prompts]
    flat = [p for p in prompts for _ in range(k)]
    gen = torch.Generator().manual_seed(DATA_SEED)
    texts: list[str] = []
    with torch.no_grad():
        for start in range(0, len(flat), 1024):
            chunk = flat[start : start + 1024]
            _, _, s = ModelPolicy(model).sample(task, chunk, max_new_tokens=task.max_new_tokens,
                                                temperature=temperature, generator=gen)
            texts += task.decode(s.response_ids, s.response_mask)
    objective = task.objectives[0]
    gold = np.asarray(task.gold(flat, texts)[objective]).reshape(len(prompts), k)
    tau = float(task.manifest["labelers"]["reward"]["temperature"])
    rng = np.random.default_rng(DATA_SEED)
    rows, identical, empty = [], 0, 0
    for i, p in enumerate(prompts):
        order, _ = labelers.rank(gold[i], tau, rng)
        ranked = [texts[i * k + j] for j in order]
        for a in range(k):
            for b in range(a + 1, k):
                if ranked[a] == ranked[b]:
                    identical += 1
                    continue
                if not ranked[a].strip() or not ranked[b].strip():  # an EOS-only response: no text to write
                    empty += 1
                    continue
                rows.append({"prompt": p, "chosen": ranked[a], "rejected": ranked[b]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"source": f"task.load_pretrained() (before SFT) at temperature {temperature}" if source == "pretrained"
            else f"the task's SFT policy at temperature {temperature}",
            "prompts": len(prompts), "responses_per_prompt": k, "pairs": len(rows), "identical_pairs_dropped": identical,
            "pairs_with_an_empty_response_dropped": empty,
            "labeler_temperature": tau, "mean_gold_of_responses": float(gold.mean()),
            "sampling_seed": DATA_SEED}


def chosen_nll(task, triples: list[tuple[str, str, str]], model) -> float:
    """Mean token NLL of the chosen responses under ``model`` (how off-policy the data is for it)."""
    from rlhf_zoo_plugins.dpo import encode_pairs, reference_logprobs

    pairs, _ = encode_pairs(task, triples, task.max_new_tokens, "cpu")
    chosen, _ = reference_logprobs(model, pairs, task.suppress_ids)
    return float(-chosen.sum() / pairs.chosen_mask.sum())


def evaluate_against_task_sft(task, policy_dir: Path, seed: int, eval_prompts: int, eval_samples: int) -> dict:
    """The saved policy evaluated as the runner does, but against the task's SFT policy."""
    from rlhf_zoo.evaluation import evaluate
    from rlhf_zoo.models import load_policy
    from rlhf_zoo.policy import ModelPolicy

    model = load_policy(policy_dir)  # safetensors only
    out = evaluate(ModelPolicy(model), task, reference=task.load_reference("cpu"), reward_fn=task.reward_function(device="cpu"),
                   prompts=task.prompts("eval")[:eval_prompts], samples_per_prompt=eval_samples,
                   max_new_tokens=task.max_new_tokens, temperature=1.0, seed=seed + 10_000, beta=task.beta,
                   missing_eos_penalty=task.missing_eos_penalty, device=torch.device("cpu"))
    return {"kl_to_task_sft": out["kl_to_ref"], "gold_reward_reevaluated": out["gold_reward"]}


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "per_seed": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--source", choices=["pretrained", "sft"], default="pretrained")
    parser.add_argument("--temperature", type=float, default=1.3, help="sampling temperature of the data's policy")
    parser.add_argument("--prompts", type=int, default=1500, help="training prompts of the dataset")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt (C(K,2) pairs each)")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--render", type=Path, default=None,
                        help="recompute the aggregate and the Markdown of a results .json, running nothing")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        result["aggregate"] = aggregate(result["runs"], result["settings"]["seeds"])
        write(result, args.out, args.md)
        return
    from rlhf_zoo.bench.harness import machine_info
    from rlhf_zoo.registry import get_registry
    from rlhf_zoo.runner import _git_commit, versions

    task = get_registry().task(TASK).load(seed=0, progress=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    start_all = time.perf_counter()
    variants = {"plain": [], "sft-then-dpo": ["--sft-steps", str(args.sft_steps)]}
    runs: dict[str, dict[int, dict]] = {v: {} for v in variants}
    with tempfile.TemporaryDirectory(prefix="zoo-offpolicy-dpo-") as tmp:
        tmp = Path(tmp)
        data = tmp / "offpolicy_pairs.jsonl"
        dataset = build_dataset(task, data, source=args.source, temperature=args.temperature, n_prompts=args.prompts,
                                k=args.k)
        reference = task.load_reference("cpu")
        own = task.dataset("pairs")
        own = list(zip(own["prompt"], own["chosen"], own["rejected"], strict=True))[: dataset["pairs"]]
        ours = [(r["prompt"], r["chosen"], r["rejected"]) for r in map(json.loads, data.read_text().splitlines())]
        dataset["reference_nll_chosen_per_token"] = chosen_nll(task, ours, reference)
        dataset["reference_nll_chosen_per_token_task_pairs"] = chosen_nll(task, own, reference)
        print("dataset", dataset, flush=True)
        for seed in seeds:
            for variant, extra in variants.items():
                out = tmp / "runs" / f"{variant}-{seed}"
                cmd = [sys.executable, "-m", "rlhf_zoo", "run", "dpo", "--task", TASK, "--dataset", str(data),
                       "--seed", str(seed), "--preset", args.preset, *extra, "--device", "cpu", "--quiet",
                       "--out", str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
                s = json.loads((out / "summary.json").read_text())
                row = {k: s[k] for k in FIGURES if k in s}
                row.update(evaluate_against_task_sft(task, out / "policy", seed, s["eval_prompts"],
                                                     json.loads((out / "config.json").read_text())["config"]["eval_samples"]))
                if "sft_on_chosen" in s:
                    row["sft_on_chosen"] = s["sft_on_chosen"]
                    row["reference_model"] = s["reference_model"]
                row["command"] = " ".join(["zoo", *cmd[3:]]).replace(str(data), "offpolicy_pairs.jsonl").replace(
                    str(out), f"runs/{variant}-{seed}")
                runs[variant][seed] = row
                print(variant, seed, {k: v for k, v in row.items() if k not in ("command", "sft_on_chosen",
                                                                                 "reference_model")}, flush=True)
    result = {"benchmark": "offpolicy_dpo", "task": TASK, "command": " ".join(sys.argv), "dataset": dataset,
              "settings": {"seeds": seeds, "preset": args.preset, "sft_steps": args.sft_steps},
              "runs": {v: {str(s): r for s, r in rs.items()} for v, rs in runs.items()},
              "aggregate": aggregate({v: {str(s): r for s, r in rs.items()} for v, rs in runs.items()}, seeds),
              "total_seconds": round(time.perf_counter() - start_all, 1),
              "machine": machine_info([]) | {"load_average": os.getloadavg(),
                                              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
              "versions": versions(), "git_commit": _git_commit()}
    write(result, args.out, args.md)


def aggregate(runs: dict[str, dict[str, dict]], seeds: list[int]) -> dict:
    """Means over seeds, and the paired differences per seed."""
    keys = ("gold_reward", "kl_to_ref", "kl_to_task_sft", "baseline_gold_reward", "proxy_reward",
            "win_rate_vs_reference")
    out = {v: {k: summarise([rs[str(s)][k] for s in seeds]) for k in keys} for v, rs in runs.items()}
    for v, rs in runs.items():  # what DPO added to its own reference
        out[v]["gold_gain_over_reference"] = summarise([rs[str(s)]["gold_reward"] - rs[str(s)]["baseline_gold_reward"]
                                                        for s in seeds])
    out["gold_reward_difference_sft_minus_plain"] = summarise(
        [runs["sft-then-dpo"][str(s)]["gold_reward"] - runs["plain"][str(s)]["gold_reward"] for s in seeds])
    out["sft_phase_gold_gain"] = summarise(  # the SFT-on-chosen model against the task's SFT policy, same prompts
        [runs["sft-then-dpo"][str(s)]["baseline_gold_reward"] - runs["plain"][str(s)]["baseline_gold_reward"]
         for s in seeds])
    return out


def write(result: dict, out: Path | None, md_path: Path | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    md = markdown(result)
    print(md)
    if md_path:
        md_path.write_text(md)


def markdown(r: dict) -> str:
    d, a, st = r["dataset"], r["aggregate"], r["settings"]
    seeds = st["seeds"]
    lines = [
        "# SFT-then-DPO against plain DPO on off-policy preference pairs (`sentiment`)", "",
        f"Dataset: {d['pairs']} pairs from {d['prompts']} training prompts x {d['responses_per_prompt']} responses "
        f"sampled from {d['source']} (mean gold {d['mean_gold_of_responses']:.3f}), ranked by the task's simulated "
        f"labelers (Plackett-Luce on the gold reward, temperature {d['labeler_temperature']:.3f}). The reference "
        f"(the task's SFT policy) gives their chosen responses a mean token NLL of "
        f"{d['reference_nll_chosen_per_token']:.3f}, against {d['reference_nll_chosen_per_token_task_pairs']:.3f} "
        "for the task's own pairs (sampled from it).", "",
        f"`zoo run dpo --task sentiment --dataset offpolicy_pairs.jsonl --preset {st['preset']}` (one epoch), plain and "
        f"with `--sft-steps {st['sft_steps']}`, seeds {', '.join(map(str, seeds))}; commit {r['git_commit']}, torch "
        f"{r['versions'].get('torch')}, transformers {r['versions'].get('transformers')}, "
        f"{r['machine'].get('cpu_count')} CPUs, {r['total_seconds']:.0f} s in all.", "",
        "`baseline_gold_reward` is the gold reward of the run's reference: the task's SFT policy for plain DPO, the SFT-on-chosen model "
        "with `--sft-steps`. `kl_to_ref` is against that reference; `kl_to_task_sft` is against the task's SFT "
        "policy for both (the same prompts and sampling seed).", "",
        "| variant | seed | gold_reward | baseline_gold_reward | kl_to_ref | kl_to_task_sft | proxy_reward | win rate vs ref |",
        "|---|---|---|---|---|---|---|---|"]
    for v in ("plain", "sft-then-dpo"):
        for s in seeds:
            x = r["runs"][v][str(s)]
            lines.append(f"| {v} | {s} | {x['gold_reward']:.3f} | {x['baseline_gold_reward']:.3f} | {x['kl_to_ref']:.3f} | "
                         f"{x['kl_to_task_sft']:.3f} | {x['proxy_reward']:.3f} | {x['win_rate_vs_reference']:.2f} |")
        m = a[v]
        lines.append(f"| **{v}, mean** | | **{m['gold_reward']['mean']:.3f}** | {m['baseline_gold_reward']['mean']:.3f} | "
                     f"{m['kl_to_ref']['mean']:.3f} | {m['kl_to_task_sft']['mean']:.3f} | {m['proxy_reward']['mean']:.3f} | "
                     f"{m['win_rate_vs_reference']['mean']:.2f} |")
    diff, phase = a["gold_reward_difference_sft_minus_plain"], a["sft_phase_gold_gain"]
    gain_plain, gain_sft = a["plain"]["gold_gain_over_reference"], a["sft-then-dpo"]["gold_gain_over_reference"]
    sft = [r["runs"]["sft-then-dpo"][str(s)]["sft_on_chosen"] for s in seeds]
    lines += ["", f"Gold reward, SFT-then-DPO minus plain DPO, per seed: "
              f"{', '.join(f'{v:+.3f}' for v in diff['per_seed'])} (mean {diff['mean']:+.3f}). The SFT phase lowered the "
              f"chosen responses' token NLL under the policy from {sft[0]['nll_chosen_before']:.3f} to "
              f"{statistics.fmean(x['nll_chosen_after'] for x in sft):.3f} (mean over seeds).", "",
              f"Where the difference comes from: the SFT-on-chosen model alone is {phase['mean']:+.3f} gold above the task's "
              f"SFT policy (per seed {', '.join(f'{v:+.3f}' for v in phase['per_seed'])}; the baseline columns, same "
              f"prompts and sampling seed), and DPO then adds {gain_sft['mean']:+.3f} on top of it, against "
              f"{gain_plain['mean']:+.3f} on top of the task's SFT policy. SFT-then-DPO also trains "
              f"{st['sft_steps']} steps more, and ends {a['sft-then-dpo']['kl_to_task_sft']['mean']:.3f} nats from the "
              f"task's SFT policy against {a['plain']['kl_to_task_sft']['mean']:.3f} for plain DPO.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
