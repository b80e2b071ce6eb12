"""How close to pi*_beta can PPO and DPO get on ``exact``, and what stops them.

On ``exact`` every response can be listed, so each algorithm's objective can also be optimised without
its two sources of error, one at a time:

* **model, exact objective**: the task's SFT transformer trained by gradient ascent on the exact
  KL-regularised objective  E_x [ sum_y pi(y|x) r(x,y) ] - beta KL(pi || pi_ref)  (every response
  enumerated: no sampling noise). Its distance to pi*_beta is what the network and the optimizer allow;
  PPO's sampled gradient cannot do better.
* **table, DPO loss**: a free softmax table per prompt (any policy at all) fitted by the DPO loss to
  (a) the task's preference pairs, (b) fresh pair sets drawn the same way (K = 4 responses of pi_ref
  per prompt ranked by Plackett-Luce on the gold reward at temperature 1, all C(4,2) pairs) with 1x, 4x
  and 16x as many rankings, and (c) the population loss (every pair weighted by its probability). What
  remains in (c) is zero; the gap between (a)/(b) and (c) is the finite-data limit DPO itself has.

    python benchmarks/exact_limits.py --out benchmarks/results/exact_limits

writes exact_limits.json and exact_limits.md (figures: KL(pi || pi*_beta) averaged over prompts).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlhf_zoo.evaluation import space_scores
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import get_registry
from rlhf_zoo.runner import _git_commit, versions
from rlhf_zoo_envs.tasks import exact, labelers


def model_exact_objective(task, ref_lp, scores, opt_lp, beta: float, steps: int, lr: float, log_every: int) -> list[dict]:
    """The SFT model trained on the enumerated objective; KL to pi*_beta along the way."""
    model = task.load_policy("cpu")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    prompts = task.prompts("eval")
    logprobs = exact.policy_logprobs.__wrapped__  # the same enumeration, with gradients
    curve = []
    for step in range(steps + 1):
        lp = logprobs(model, task, prompts, task.space)  # (X, R)
        objective = (exact.expected(lp, scores) - beta * exact.kl(lp, ref_lp)).mean()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                curve.append({"step": step, "objective": float(objective), "kl_to_optimum": float(exact.kl(lp, opt_lp).mean()),
                              "kl_to_ref": float(exact.kl(lp, ref_lp).mean())})
            print(f"model exact objective step {step}: KL to optimum {curve[-1]['kl_to_optimum']:.4f}", flush=True)
        if step == steps:
            break
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    return curve


def table_dpo(ref_lp: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
              population: tuple[torch.Tensor, torch.Tensor] | None, opt_lp: torch.Tensor, beta: float,
              steps: int, lr: float) -> dict:
    """A softmax table per prompt, initialised at pi_ref, fitted by the DPO loss (full batch, Adam).
    ``pairs``: (prompt, chosen, rejected, weight) index tensors; ``population``: (pair probability (X,R,R),
    P(first preferred) (X,R,R))."""
    logits = ref_lp.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    best = (float("inf"), 0)
    for step in range(steps):
        lp = torch.log_softmax(logits, -1)
        if step % 10 == 0:
            best = min(best, (float(exact.kl(lp.detach(), opt_lp).mean()), step))
        ratio = lp - ref_lp  # (X, R)
        if pairs is not None:
            x, c, r, w = pairs
            loss = (w * -F.logsigmoid(beta * (ratio[x, c] - ratio[x, r]))).sum() / w.sum()
        else:
            weight, p_first = population
            h = beta * (ratio[:, :, None] - ratio[:, None, :])  # (X, R, R)
            loss = (weight * (p_first * -F.logsigmoid(h) + (1 - p_first) * -F.logsigmoid(-h))).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lp = torch.log_softmax(logits.detach(), -1)
    return {"kl_to_optimum": float(exact.kl(lp, opt_lp).mean()), "kl_to_ref": float(exact.kl(lp, ref_lp).mean()),
            "final_loss": float(loss.detach()), "best_kl_to_optimum": best[0], "best_step": best[1]}


def task_pairs(task, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """The task's preference pairs as (prompt, chosen, rejected, weight) indices into the enumeration."""
    index = {t: i for i, t in enumerate(task.space.texts)}
    ds = task.dataset("pairs")
    rows = {}
    for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"], strict=True):
        key = (prompts.index(p), index[c], index[r])
        rows[key] = rows.get(key, 0) + 1
    keys = torch.tensor(list(rows), dtype=torch.long)
    return keys[:, 0], keys[:, 1], keys[:, 2], torch.tensor(list(rows.values()), dtype=torch.float64)


def fresh_pairs(ref_lp: torch.Tensor, gold: torch.Tensor, rankings: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Pairs drawn as the task build draws them: uniform prompt, K samples of pi_ref, a Plackett-Luce
    ranking at temperature 1 on the gold reward, all C(K,2) pairs, identical responses dropped."""
    rng = np.random.default_rng(seed)
    probs = ref_lp.exp().numpy()
    counts: dict[tuple[int, int, int], int] = {}
    xs = rng.integers(len(probs), size=rankings)
    for x in xs:
        ys = rng.choice(probs.shape[1], size=k, p=probs[x] / probs[x].sum())
        order, _ = labelers.rank(gold[x, ys].numpy(), 1.0, rng)
        ranked = ys[order]
        for i in range(k):
            for j in range(i + 1, k):
                if ranked[i] != ranked[j]:
                    key = (int(x), int(ranked[i]), int(ranked[j]))
                    counts[key] = counts.get(key, 0) + 1
    keys = torch.tensor(list(counts), dtype=torch.long)
    return keys[:, 0], keys[:, 1], keys[:, 2], torch.tensor(list(counts.values()), dtype=torch.float64)


def population(ref_lp: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = ref_lp.exp()
    weight = p[:, :, None] * p[:, None, :]
    weight = weight * (1 - torch.eye(p.shape[1], dtype=p.dtype))  # identical responses are dropped
    return weight, torch.sigmoid(gold[:, :, None] - gold[:, None, :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/exact_limits"))
    ap.add_argument("--task-seed", type=int, default=0)
    ap.add_argument("--model-steps", type=int, default=600)
    ap.add_argument("--model-lr", type=float, default=1e-3)
    ap.add_argument("--table-steps", type=int, default=3000)
    ap.add_argument("--table-lr", type=float, default=0.05)
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="run directories of zoo runs on exact to list beside")
    ap.add_argument("--only-runs", action="store_true", help="keep the experiments of --out's exact_limits.json and "
                    "list --runs again (runs finished after the experiments)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only_runs:
        result = json.loads((args.out / "exact_limits.json").read_text())
        finish(result, args)
        return
    torch.manual_seed(0)
    start = time.perf_counter()
    task = get_registry().task("exact").load(seed=args.task_seed, progress=True)
    beta = task.beta
    prompts = task.prompts("eval")
    ref_lp = ModelPolicy(task.load_reference("cpu")).exact_logprobs(task)
    scores = space_scores(task, task.reward_function(device="cpu"), task.missing_eos_penalty, torch.device("cpu"))
    gold = task.exact_rewards
    opt_lp = exact.optimal_logprobs(ref_lp, scores, beta)
    result = {"task": "exact", "task_seed": args.task_seed, "beta": beta, "command": "python " + " ".join(sys.argv),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "versions": versions(),
              "git_commit": _git_commit(), "sft_kl_to_optimum": float(exact.kl(ref_lp, opt_lp).mean()),
              "optimum_kl_to_ref": float(exact.kl(opt_lp, ref_lp).mean())}
    result["model_exact_objective"] = model_exact_objective(task, ref_lp, scores, opt_lp, beta, args.model_steps,
                                                            args.model_lr, max(1, args.model_steps // 12))
    tables = {}
    x, c, r, w = task_pairs(task, prompts)
    tables["task pairs (6,000 rankings)"] = {"pairs": int(w.sum()), **table_dpo(ref_lp, (x, c, r, w), None, opt_lp, beta,
                                                                                 args.table_steps, args.table_lr)}
    n_rankings = task.manifest["spec"]["ranking_prompts"]
    for mult in (1, 4, 16):
        fresh = fresh_pairs(ref_lp, gold, mult * n_rankings, 4, seed=1000 + mult)
        tables[f"fresh pairs, {mult}x rankings"] = {"pairs": int(fresh[3].sum()),
                                                    **table_dpo(ref_lp, fresh, None, opt_lp, beta, args.table_steps, args.table_lr)}
        print(f"table DPO {mult}x: {tables[f'fresh pairs, {mult}x rankings']}", flush=True)
    tables["population (infinite data)"] = {"pairs": None, **table_dpo(ref_lp, None, population(ref_lp, gold), opt_lp,
                                                                       beta, args.table_steps, args.table_lr)}
    result["table_dpo"] = tables
    result["seconds"] = round(time.perf_counter() - start, 1)
    finish(result, args)


def finish(result: dict, args: argparse.Namespace) -> None:
    """List the zoo runs beside the experiments; write the JSON and the report."""
    result["runs"] = []
    for d in args.runs:
        s = json.loads((d / "summary.json").read_text())
        cfg = json.loads((d / "config.json").read_text())
        result["runs"].append({"run": d.name, "algorithm": s["algorithm"], "seed": s["seed"], "argv": " ".join(cfg["argv"][1:]),
                               **{k: s[k] for k in ("kl_to_optimum", "frontier_efficiency", "gold_reward", "kl_to_ref",
                                                    "wall_seconds")}})
    (args.out / "exact_limits.json").write_text(json.dumps(result, indent=2))
    (args.out / "exact_limits.md").write_text(report(result))
    print(report(result))


def report(res: dict) -> str:
    m = res["model_exact_objective"]
    lines = ["# How close to pi*_beta on `exact`, and what limits it", "",
             f"Command: `{res['command']}`; {res['machine']}; commit {res['git_commit']}; "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), "",
             f"beta = {res['beta']}; KL(pi_SFT || pi*_beta) = {res['sft_kl_to_optimum']:.4f}; "
             f"KL(pi*_beta || pi_SFT) = {res['optimum_kl_to_ref']:.4f}. Figures are KL(pi || pi*_beta), mean over the 9 prompts.",
             "", "## The network on the exact objective (no sampling noise)", "",
             "| step | objective | KL to pi*_beta | KL to ref |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['objective']:.4f} | {r['kl_to_optimum']:.4f} | {r['kl_to_ref']:.4f} |" for r in m]
    lines += ["", "## DPO loss on a free table (any policy): the data limit", "",
              "| preference data | pairs | KL to pi*_beta at the end | KL to ref at the end | final loss | "
              "closest along the way (step) |", "|---|---|---|---|---|---|"]
    for name, t in res["table_dpo"].items():
        lines.append(f"| {name} | {t['pairs'] if t['pairs'] is not None else 'all, weighted'} | {t['kl_to_optimum']:.4f} | "
                     f"{t['kl_to_ref']:.4f} | {t['final_loss']:.4f} | {t['best_kl_to_optimum']:.4f} ({t['best_step']}) |")
    if res["runs"]:
        lines += ["", "## zoo runs", "", "| run | algorithm | seed | options | KL to pi*_beta | frontier efficiency | gold | KL to ref |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['algorithm']} | {r['seed']} | `{r['argv']}` | {r['kl_to_optimum']:.4f} | "
                  f"{r['frontier_efficiency']:.4f} | {r['gold_reward']:.4f} | {r['kl_to_ref']:.4f} |" for r in res["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
