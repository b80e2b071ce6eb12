"""Reward-model over-optimisation measured as Gao, Schulman and Hilton (2022) measure it.

The distance from the initial policy is d = sqrt(KL(pi || pi_ref)). Two ways of moving along it:

* **Best-of-N** (N = 1, 2, 4, ..., N_max) against each proxy reward model: one pool of M >= N_max SFT
  samples per prompt gives every N at once through the unbiased estimator of the best-of-N expectation
  (the i-th lowest-scored of M samples is the best of a random N-subset with probability
  C(i-1, N-1) / C(M, N)). KL is the analytic log N - (N-1)/N (an upper bound, exact without ties).
  Fitted form: gold(d) - gold(0) = d (alpha - beta d).
* **PPO** with a small KL coefficient, evaluated every few iterations (``--eval-every``): gold and proxy
  along training against the sampled KL. Fitted form: gold(d) - gold(0) = d (alpha - beta log d).

Proxy reward models of several training-set sizes (rankings of K SFT samples labelled by the task's
simulated labelers, the task builder's own pipeline, labeler bias included) show how the gold peak moves
with RM data.

    python benchmarks/overoptimisation.py --task sentiment --out benchmarks/results/overoptimisation

writes overoptimisation.json / .md and PNG plots (matplotlib) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rlhf_zoo.evaluation import sequence_scores
from rlhf_zoo.models import reward_model_from_policy
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import get_registry
from rlhf_zoo.runner import _git_commit, run, versions
from rlhf_zoo.training import RankingRow, ranking_accuracy, train_reward_model
from rlhf_zoo_envs.tasks import labelers
from rlhf_zoo_envs.tasks.base import ModelReward
from rlhf_zoo_envs.tasks.build import _sample_responses
from rlhf_zoo_envs.tasks.plugin import HH_SPEC, SENTIMENT_SPEC

SPECS = {"sentiment": SENTIMENT_SPEC, "hh": HH_SPEC}


# --- the estimators and fits (pure functions, tested in tests/test_overoptimisation.py) -------------
def bon_weights(m: int, n: int) -> np.ndarray:
    """P(the i-th lowest of m scores is the highest of a uniformly random n-subset), i = 1..m.  -> (m,)"""
    i = np.arange(1, m + 1)
    log_w = np.full(m, -np.inf)
    ok = i >= n
    log_w[ok] = (_log_comb(i[ok] - 1, n - 1) - _log_comb(np.array(m), n))
    return np.exp(log_w)


_LGAMMA = np.vectorize(math.lgamma, otypes=[float])


def _log_comb(a: np.ndarray, b: int) -> np.ndarray:
    """log C(a, b), elementwise over ``a``."""
    return _LGAMMA(a + 1.0) - math.lgamma(b + 1.0) - _LGAMMA(a - b + 1.0)


def best_of_n(proxy: np.ndarray, values: np.ndarray, n: int) -> float:
    """Expected ``values`` of the best-of-n by ``proxy``, averaged over prompts. proxy, values: (P, M)."""
    order = np.argsort(proxy, axis=1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=1)
    return float((ranked * bon_weights(proxy.shape[1], n)).sum(1).mean())


def bon_kl(n: int) -> float:
    """KL(best-of-n || pi_ref) for a continuous score: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def fit(d: np.ndarray, gain: np.ndarray, form: str) -> dict[str, float]:
    """Least squares of gain = d (alpha - beta f(d)), f = d (``bon``) or log d (``rl``), through the
    origin; R^2 and the peak of the fitted curve."""
    d, gain = np.asarray(d, float), np.asarray(gain, float)
    keep = d > 0
    x = np.stack([d[keep], -d[keep] * (d[keep] if form == "bon" else np.log(d[keep]))], 1)
    (alpha, beta), *_ = np.linalg.lstsq(x, gain[keep], rcond=None)
    pred = x @ np.array([alpha, beta])
    ss_res = float(((gain[keep] - pred) ** 2).sum())
    ss_tot = float(((gain[keep] - gain[keep].mean()) ** 2).sum())
    out = {"alpha": float(alpha), "beta": float(beta), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
           "rmse": math.sqrt(ss_res / keep.sum())}
    if beta > 0:
        d_peak = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
        gain_peak = d_peak * (alpha - beta * (d_peak if form == "bon" else math.log(d_peak)))
        out.update({"peak_d": d_peak, "peak_kl": d_peak**2, "peak_gain": gain_peak})
    return out


def largest_fall(kl: list[float], gold: list[float], proxy: list[float]) -> dict | None:
    """The largest fall of the gold between two evaluations i < j of a run while the proxy rose (Gao et al.'s
    over-optimisation, located in a curve that need not be single-peaked), or None when the gold never fell
    while the proxy rose."""
    best = None
    for i in range(len(gold)):
        for j in range(i + 1, len(gold)):
            if proxy[j] > proxy[i] and gold[j] < gold[i] and (best is None or gold[i] - gold[j] > best["fall"]):
                best = {"fall": gold[i] - gold[j], "from": i, "to": j}
    if best is None:
        return None
    i, j = best["from"], best["to"]
    return {**best, "kl": [kl[i], kl[j]], "gold": [gold[i], gold[j]], "proxy": [proxy[i], proxy[j]]}


def pooled_curve(curves: list[dict], bins: int = 12) -> dict:
    """Several seeds' PPO curves as one: every evaluation point (d, gold - that seed's gold(0), proxy) pooled,
    the fit on all points, and the means in equal-width bins of d (the curve one seed's oscillations hide)."""
    d = np.concatenate([c["d"] for c in curves])
    gain = np.concatenate([np.array(c["gold"]) - c["gold"][0] for c in curves])
    gold0 = float(np.mean([c["gold"][0] for c in curves]))
    proxy = np.concatenate([c["proxy"] for c in curves])
    edges = np.linspace(0, d.max() + 1e-9, bins + 1)
    which = np.clip(np.digitize(d, edges) - 1, 0, bins - 1)
    binned = {"d": [], "kl": [], "gold": [], "gold_sem": [], "proxy": [], "points": []}
    for b in range(bins):
        m = which == b
        if m.sum() == 0:
            continue
        binned["d"].append(float(d[m].mean()))
        binned["kl"].append(float((d[m] ** 2).mean()))
        binned["gold"].append(gold0 + float(gain[m].mean()))
        binned["gold_sem"].append(float(gain[m].std(ddof=1) / math.sqrt(m.sum())) if m.sum() > 1 else float("nan"))
        binned["proxy"].append(float(proxy[m].mean()))
        binned["points"].append(int(m.sum()))
    peak = int(np.argmax(binned["gold"]))
    return {"seeds": [c["seed"] for c in curves], "beta": curves[0]["beta"], "proxy_rm": curves[0].get("proxy_rm"),
            "gold0": gold0, "fit": fit(d, gain, "rl"), "bins": binned,
            "observed_peak": {"kl": binned["kl"][peak], "gold": binned["gold"][peak],
                              "gold_after": binned["gold"][peak + 1:], "proxy_after": binned["proxy"][peak + 1:],
                              "gold_falls_after_peak": bool(min(binned["gold"][peak + 1:], default=np.inf)
                                                            < binned["gold"][peak] - 1e-9),
                              "proxy_rises_after_peak": bool(all(b > a for a, b in zip(binned["proxy"][peak:],
                                                                                        binned["proxy"][peak + 1:]))
                                                             and peak + 1 < len(binned["proxy"]))}}


# --- the measurements -------------------------------------------------------------------------------
def train_proxies(task, sizes: list[int], args, device) -> dict[str, dict]:
    """Reward models trained on the first n of one set of rankings for each n in ``sizes``, each from the
    SFT trunk with the task build's schedule; held-out accuracy against the gold preference."""
    spec = SPECS[task.name]
    tok = task.tokenizer
    sft = task.load_policy(device)
    rng = np.random.default_rng([args.seed, 101])
    n_total = max(sizes) + args.heldout
    prompts = [task.language.prompt(rng) for _ in range(n_total)]
    t0 = time.perf_counter()
    responses = _sample_responses(sft, tok, prompts, spec, task.suppress_ids, args.seed + 101)
    objective = task.objectives[0]
    gold = np.array([[task.language.gold(p, r)[objective] for r in rs] for p, rs in zip(prompts, responses, strict=True)])
    view = np.array([[labelers.perceived(task.language, p, r)[objective] for r in rs]
                     for p, rs in zip(prompts, responses, strict=True)])  # what the labelers rank by
    tau = task.manifest["labelers"]["reward"]["temperature"] if "reward" in task.manifest.get("labelers", {}) else 1.0
    groups, golds = [], []
    bos, eos = tok.bos_token_id, tok.eos_token_id
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    for p, rs, g, v in zip(prompts, responses, gold, view, strict=True):
        order, levels = labelers.rank(v, tau, rng)
        groups.append(RankingRow([bos, *enc(p)], [[*enc(rs[i]), eos] for i in order],
                                 labelers.margins_from_levels(levels).tolist()))
        golds.append([float(g[i]) for i in order])
    print(f"rankings: {n_total} prompts x {spec.responses_per_prompt} in {time.perf_counter() - t0:.0f}s", flush=True)
    heldout, heldout_gold = groups[max(sizes):], golds[max(sizes):]
    out = {}
    for n in sizes:
        rm = reward_model_from_policy(sft)
        t0 = time.perf_counter()
        losses = train_reward_model(rm, groups[:n], pad_id=tok.pad_token_id, steps=spec.rm_steps,
                                    batch_size=spec.rm_batch_size, lr=spec.rm_lr, seed=args.seed + n, progress=False)
        acc = ranking_accuracy(rm, heldout, heldout_gold, tok.pad_token_id)
        rm.eval()
        out[f"rm-{n}"] = {"rankings": n, "heldout_gold_accuracy": round(acc, 4), "model": rm,
                          "final_loss": round(float(np.mean(losses[-20:])), 4),
                          "seconds": round(time.perf_counter() - t0, 1)}
        print(f"rm-{n}: held-out gold accuracy {acc:.3f} ({out[f'rm-{n}']['seconds']}s)", flush=True)
    return out


@torch.no_grad()
def bon_pool(task, proxies: dict[str, dict], args, device) -> dict:
    """M samples per prompt from the SFT policy; gold and every proxy's score of each.  -> arrays (P, M)"""
    prompts = task.prompts("eval")[: args.prompts]
    policy = ModelPolicy(task.load_policy(device))
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    gold = np.zeros((len(prompts), args.pool))
    scores = {name: np.zeros((len(prompts), args.pool)) for name in proxies}
    lengths = np.zeros((len(prompts), args.pool))
    t0 = time.perf_counter()
    per_chunk = max(1, args.chunk // args.pool)
    for start in range(0, len(prompts), per_chunk):
        chunk = prompts[start : start + per_chunk]
        flat = [p for p in chunk for _ in range(args.pool)]
        p_ids, p_mask, s = policy.sample(task, flat, max_new_tokens=task.max_new_tokens, temperature=1.0, generator=gen)
        texts = task.decode(s.response_ids, s.response_mask)
        rows = slice(start, start + len(chunk))
        gold[rows] = task.gold(flat, texts)[task.objectives[0]].reshape(len(chunk), args.pool)
        lengths[rows] = s.response_mask.sum(-1).reshape(len(chunk), args.pool).cpu().numpy()
        for name, rm in proxies.items():
            sc = sequence_scores(rm["fn"], task, p_ids, p_mask, s.response_ids, s.response_mask, task.missing_eos_penalty)
            scores[name][rows] = sc.reshape(len(chunk), args.pool).cpu().numpy()
    print(f"best-of-N pool: {len(prompts)} prompts x {args.pool} samples in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"gold": gold, "scores": scores, "lengths": lengths}


def bon_curves(pool: dict, n_max: int) -> dict[str, dict]:
    ns = [2**k for k in range(int(math.log2(n_max)) + 1)]
    out = {}
    for name, proxy in pool["scores"].items():
        gold = [best_of_n(proxy, pool["gold"], n) for n in ns]
        prox = [best_of_n(proxy, proxy, n) for n in ns]
        length = [best_of_n(proxy, pool["lengths"], n) for n in ns]
        kl = [bon_kl(n) for n in ns]
        d = np.sqrt(kl)
        peak = int(np.argmax(gold))
        out[name] = {"n": ns, "kl": kl, "d": d.tolist(), "gold": gold, "proxy": prox, "response_length": length,
                     "fit": fit(d, np.array(gold) - gold[0], "bon"),
                     "observed_peak": {"n": ns[peak], "kl": kl[peak], "gold": gold[peak],
                                       "gold_falls_after_peak": bool(gold[-1] < gold[peak] - 1e-9),
                                       "proxy_rises_after_peak": bool(prox[-1] > prox[peak])}}
    return out


def ppo_curve(task_name: str, beta: float, args, out_dir: Path, proxy: str = "task", proxies: dict | None = None,
              seed: int = 0) -> dict:
    """A long PPO run with KL coefficient ``beta`` evaluated every ``args.ppo_eval_every`` iterations, against
    the task's reward model (``proxy`` "task") or one of ``proxies`` (the RM the environment pays and the
    evaluation's proxy_reward, swapped in for this process's runs)."""
    from rlhf_zoo_envs.tasks.base import Task  # noqa: PLC0415

    run_dir = out_dir / "runs" / (f"ppo-{task_name}-beta{beta:g}" + ("" if proxy == "task" else f"-{proxy}")
                                  + (f"-s{seed}" if seed else ""))
    if proxy != "task":
        model = proxies[proxy]["model"]
        Task.proxy_reward = lambda self, device="cpu": ModelReward(model.to(device))
    options = {"beta": beta, "iterations": args.ppo_iterations, "eval_every": args.ppo_eval_every,
               "eval_prompts": args.prompts, "eval_samples": args.ppo_eval_samples, "lr_schedule": "constant",  # (keeps moving)
               "learning_rate": args.ppo_lr}
    t0 = time.perf_counter()
    if _finished_with(run_dir, options, seed):  # (a finished run of the same config is read, not redone)
        print(f"ppo beta {beta}: reusing the finished run in {run_dir}", flush=True)
    else:
        run("ppo", task=task_name, seed=seed, out=run_dir, device=args.device, options=options, progress=False,
            checkpoint_every=0, overwrite=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = [r for r in rows if "eval/gold_reward" in r]
    it = [r["iteration"] for r in curve]
    kl = [max(r["eval/kl_to_ref"], 0.0) for r in curve]
    gold = [r["eval/gold_reward"] for r in curve]
    prox = [r["eval/proxy_reward"] for r in curve]
    d = np.sqrt(kl)
    peak = int(np.argmax(gold))
    print(f"ppo beta {beta}: {time.perf_counter() - t0:.0f}s, peak gold {gold[peak]:.3f} at KL {kl[peak]:.2f}", flush=True)
    return {"beta": beta, "seed": seed, "iterations": it, "kl": kl, "d": d.tolist(), "gold": gold, "proxy": prox,
            "response_length": [r.get("eval/response_length") for r in curve],
            "fit": fit(d, np.array(gold) - gold[0], "rl"), "largest_fall": largest_fall(kl, gold, prox),
            "observed_peak": {"iteration": it[peak], "kl": kl[peak], "gold": gold[peak],
                              "gold_falls_after_peak": bool(gold[-1] < gold[peak] - 1e-9),
                              "proxy_rises_after_peak": bool(max(prox[peak + 1:], default=prox[peak]) > prox[peak])},
            "seconds": json.loads((run_dir / "summary.json").read_text()).get("wall_seconds"), "run_dir": str(run_dir)}


def _finished_with(run_dir: Path, options: dict, seed: int) -> bool:
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return ((run_dir / "summary.json").is_file() and config.get("seed") == seed
            and all(config["config"].get(k) == v for k, v in options.items()))


# --- report -----------------------------------------------------------------------------------------
def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    files = []

    def save(fig, axes, name: str, size: int) -> None:
        for ax in axes:
            ax.legend(fontsize=size)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, c in result["best_of_n"].items():
        line, = axes[0].plot(c["d"], c["gold"], "o-", label=f"{name} gold")
        axes[0].plot(c["d"], c["proxy"], "s--", color=line.get_color(), alpha=0.6, label=f"{name} proxy")
        f = c["fit"]
        dd = np.linspace(0, max(c["d"]), 100)
        axes[1].plot(c["d"], np.array(c["gold"]) - c["gold"][0], "o", color=line.get_color())
        axes[1].plot(dd, dd * (f["alpha"] - f["beta"] * dd), "-", color=line.get_color(),
                     label=f"{name}: a={f['alpha']:.2f} b={f['beta']:.2f} R2={f['r2']:.2f}")
    axes[0].set(xlabel="d = sqrt(KL)", ylabel="reward", title=f"best-of-N on {result['task']}: gold (solid), proxy (dashed)")
    axes[1].set(xlabel="d = sqrt(KL)", ylabel="gold - gold(N=1)", title="fit gold = d (alpha - beta d)")
    save(fig, axes, f"bon_{result['task']}.png", 7)
    for c in result.get("ppo_pooled", []):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        runs = [r for r in result["ppo"] if r["proxy_rm"] == c["proxy_rm"] and r["beta"] == c["beta"]]
        for r in runs:
            axes[0].plot(r["d"], r["gold"], ".", color="C0", alpha=0.3)
            axes[0].plot(r["d"], r["proxy"], ".", color="C1", alpha=0.3)
        b, f = c["bins"], c["fit"]
        axes[0].errorbar(b["d"], b["gold"], yerr=b["gold_sem"], fmt="o-", color="C0", label="gold (bin mean)")
        axes[0].plot(b["d"], b["proxy"], "s--", color="C1", label="proxy (bin mean)")
        dd = np.linspace(1e-3, max(b["d"]), 200)
        axes[1].plot(np.concatenate([r["d"] for r in runs]),
                     np.concatenate([np.array(r["gold"]) - r["gold"][0] for r in runs]), ".", alpha=0.4)
        axes[1].plot(dd, dd * (f["alpha"] - f["beta"] * np.log(dd)), "-",
                     label=f"a={f['alpha']:.2f} b={f['beta']:.2f} R2={f['r2']:.2f}")
        axes[0].set(xlabel="d = sqrt(KL)", ylabel="reward",
                    title=f"PPO beta={c['beta']:g} against {c['proxy_rm']}, {len(runs)} seeds")
        axes[1].set(xlabel="d = sqrt(KL)", ylabel="gold - gold(0)", title="fit gold = d (alpha - beta log d), all points")
        save(fig, axes, f"ppo_{result['task']}_beta{c['beta']:g}_{c['proxy_rm']}_pooled.png", 8)
    for c in result.get("ppo", []):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        axes[0].plot(c["d"], c["gold"], "o-", label="gold")
        axes[0].plot(c["d"], c["proxy"], "s--", label="proxy (RM the run optimises)")
        f = c["fit"]
        dd = np.linspace(1e-3, max(c["d"]), 200)
        axes[1].plot(c["d"], np.array(c["gold"]) - c["gold"][0], "o")
        axes[1].plot(dd, dd * (f["alpha"] - f["beta"] * np.log(dd)), "-",
                     label=f"a={f['alpha']:.2f} b={f['beta']:.2f} R2={f['r2']:.2f}")
        axes[0].set(xlabel="d = sqrt(KL)", ylabel="reward", title=f"PPO beta={c['beta']:g} against {c['proxy_rm']} on {result['task']}")
        axes[1].set(xlabel="d = sqrt(KL)", ylabel="gold - gold(0)", title="fit gold = d (alpha - beta log d)")
        save(fig, axes, f"ppo_{result['task']}_beta{c['beta']:g}_{c['proxy_rm']}_s{c.get('seed', 0)}.png", 8)
    return files


def report(result: dict) -> str:
    lines = [f"# Reward-model over-optimisation on `{result['task']}` (Gao et al. 2022)", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + f"; commit {result['git_commit']}", "",
             "d = sqrt(KL(pi || pi_ref)). Best-of-N: one pool of SFT samples per prompt, the unbiased best-of-N "
             "estimator, analytic KL log N - (N-1)/N; fit gold - gold(N=1) = d (alpha - beta d). PPO: evaluated "
             "every few iterations on the held-out prompts (sampled KL); fit gold - gold(0) = d (alpha - beta log d).",
             *(["", result["note"]] if result.get("note") else []),
             *([f"", f"The best-of-N curves are those of `{result['best_of_n_from']['command']}` at commit "
                f"{result['best_of_n_from']['git_commit']} (`--ppo-only`: the same world, proxy RMs and seeds; only "
                "the PPO curves were run again)."] if "best_of_n_from" in result else []),
             "", "## Best-of-N against proxy reward models of several training-set sizes", "",
             "| proxy RM | rankings | held-out gold accuracy | alpha | beta | R^2 | fitted peak KL | fitted peak gain | "
             "observed peak (N, KL, gold) | gold at N_max | proxy at peak -> N_max |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in result["best_of_n"].items():
        rm, f, p = result["proxies"][name], c["fit"], c["observed_peak"]
        lines.append(f"| {name} | {rm['rankings']} | {rm['heldout_gold_accuracy']:.3f} | {f['alpha']:.3f} | {f['beta']:.3f} | "
                     f"{f['r2']:.3f} | {f.get('peak_kl', float('nan')):.2f} | {f.get('peak_gain', float('nan')):.3f} | "
                     f"{p['n']}, {p['kl']:.2f}, {p['gold']:.3f} | {c['gold'][-1]:.3f} | {c['proxy'][int(np.log2(p['n']))]:.3f} -> {c['proxy'][-1]:.3f} |")
    for c in result.get("ppo_pooled", []):
        f, p, b = c["fit"], c["observed_peak"], c["bins"]
        lines += ["", f"## PPO against {c['proxy_rm']}, beta = {c['beta']:g}, seeds {', '.join(map(str, c['seeds']))} pooled", "",
                  f"Every evaluation point of the seeds' runs, gold relative to each seed's starting gold; fit on all "
                  f"points: alpha {f['alpha']:.3f}, beta {f['beta']:.3f}, R^2 {f['r2']:.3f}, fitted peak at KL "
                  f"{f.get('peak_kl', float('nan')):.2f} (gain {f.get('peak_gain', float('nan')):.3f}). Binned in d: peak "
                  f"gold {p['gold']:.3f} at KL {p['kl']:.2f}; gold falls after it: {p['gold_falls_after_peak']}; proxy "
                  f"rises in every bin after it: {p['proxy_rises_after_peak']}.", "",
                  "| bin mean KL | d | gold (mean +- s.e.) | proxy | points |", "|---|---|---|---|---|"]
        lines += [f"| {k:.2f} | {d:.2f} | {g:.3f} +- {e:.3f} | {q:.3f} | {n} |" for k, d, g, e, q, n in
                  zip(b["kl"], b["d"], b["gold"], b["gold_sem"], b["proxy"], b["points"], strict=True)]
    for c in result.get("ppo", []):
        f, p = c["fit"], c["observed_peak"]
        lines += ["", f"## PPO against {c['proxy_rm']}, beta = {c['beta']:g}, seed {c.get('seed', 0)}, {c['iterations'][-1]} iterations, learning rate "
                  f"{result['args']['ppo_lr']} ({c['seconds']:.0f} s)", "",
                  f"Fit: alpha {f['alpha']:.3f}, beta {f['beta']:.3f}, R^2 {f['r2']:.3f}, fitted peak at KL "
                  f"{f.get('peak_kl', float('nan')):.2f}. Observed peak: gold {p['gold']:.3f} at iteration {p['iteration']}, "
                  f"KL {p['kl']:.2f}; gold falls after it: {p['gold_falls_after_peak']}; proxy rises after it: "
                  f"{p['proxy_rises_after_peak']}.", ""]
        fall = c.get("largest_fall")
        if fall:
            it = c["iterations"]
            lines += [f"Largest fall of the gold while the proxy rose: iteration {it[fall['from']]} -> {it[fall['to']]}, "
                      f"KL {fall['kl'][0]:.2f} -> {fall['kl'][1]:.2f}, gold {fall['gold'][0]:.3f} -> {fall['gold'][1]:.3f}, "
                      f"proxy {fall['proxy'][0]:.3f} -> {fall['proxy'][1]:.3f}.", ""]
        lines += ["| iteration | KL | gold | proxy | length |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {k:.3f} | {g:.3f} | {q:.3f} | {ln:.1f} |" for i, k, g, q, ln in
                  zip(c["iterations"], c["kl"], c["gold"], c["proxy"], c["response_length"], strict=True)]
    lines += ["", "## Best-of-N curves", ""]
    for name, c in result["best_of_n"].items():
        lines += [f"{name}: " + ", ".join(f"N={n}: gold {g:.3f} proxy {q:.3f}" for n, g, q in zip(c["n"], c["gold"], c["proxy"], strict=True)), ""]
    lines += [f"![best-of-N]({result['plots'][0]})"] + [f"![PPO]({p})" for p in result["plots"][1:]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sentiment", choices=sorted(SPECS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/overoptimisation"))
    ap.add_argument("--rm-sizes", default="150,500,1500,6000", help="rankings per proxy RM, comma-separated")
    ap.add_argument("--heldout", type=int, default=500, help="held-out rankings for the RMs' gold accuracy")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts (best-of-N pool and PPO evaluation)")
    ap.add_argument("--pool", type=int, default=1024, help="SFT samples per prompt (M); N goes up to M / 2")
    ap.add_argument("--chunk", type=int, default=8192, help="samples per sampling batch")
    ap.add_argument("--ppo-betas", default="0.01", help="PPO KL coefficients, comma-separated (empty: no PPO)")
    ap.add_argument("--ppo-iterations", type=int, default=300)
    ap.add_argument("--ppo-proxies", default="task,rm-500", help="the RMs PPO optimises: task (the task's own) and "
                    "names of the --rm-sizes RMs (rm-N), comma-separated")
    ap.add_argument("--ppo-eval-every", type=int, default=10)
    ap.add_argument("--ppo-lr", type=float, default=1e-5, help="PPO policy learning rate (constant: small, so KL "
                    "grows slowly enough to trace the gold curve)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppo-seeds", default="0,1,2", help="PPO seeds, comma-separated: one run each, and a pooled curve")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ppo-eval-samples", type=int, default=8, help="samples per held-out prompt at each PPO evaluation")
    ap.add_argument("--report-only", action="store_true", help="redraw the report and plots from --out's JSON")
    ap.add_argument("--ppo-only", type=Path, default=None, metavar="JSON",
                    help="keep the best-of-N curves of this earlier result and redo the PPO curves (the proxy RMs are "
                         "retrained from the earlier --rm-sizes and seed: the same recipe and rankings)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        result = json.loads((args.out / f"overoptimisation_{args.task}.json").read_text())
        for c in result.get("ppo", []):
            c["largest_fall"] = largest_fall(c["kl"], c["gold"], c["proxy"])
        result["ppo_pooled"] = pool_ppo(result.get("ppo", []))
        write(result, args.out)
        return
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    task = get_registry().task(args.task).load(seed=0, progress=True)
    start = time.perf_counter()
    earlier = json.loads(args.ppo_only.read_text()) if args.ppo_only else None
    if earlier:
        args.rm_sizes = earlier["args"]["rm_sizes"]
    sizes = [int(s) for s in args.rm_sizes.split(",") if s]
    proxies = train_proxies(task, sizes, args, device) if sizes else {}
    task_rm = task.reward_models[0]
    proxies[f"task-{task_rm}"] = {"rankings": task.manifest["spec"]["ranking_prompts"], "model": task.load_reward_model(task_rm, device),
                                  "heldout_gold_accuracy": task.manifest["reward_models"][task_rm]["heldout_gold_accuracy"]}
    for p in proxies.values():
        p["fn"] = ModelReward(p["model"])
    if earlier:
        for name, p in earlier["proxies"].items():
            if name in proxies and abs(p["heldout_gold_accuracy"] - proxies[name]["heldout_gold_accuracy"]) > 1e-9:
                print(f"warning: {name} held-out accuracy {proxies[name]['heldout_gold_accuracy']} differs from the "
                      f"earlier result's {p['heldout_gold_accuracy']}", flush=True)
    pool = None if earlier else bon_pool(task, proxies, args, device)
    result = {"task": args.task, "command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, "
              f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.platform()}",
              "versions": versions(), "git_commit": _git_commit(), "args": {k: str(v) for k, v in vars(args).items()},
              "proxies": {k: {kk: vv for kk, vv in v.items() if kk not in ("model", "fn")} for k, v in proxies.items()},
              "best_of_n": earlier["best_of_n"] if earlier else bon_curves(pool, args.pool // 2)}
    if earlier:
        result["best_of_n_from"] = {"command": earlier["command"], "git_commit": earlier["git_commit"]}
    seeds = [int(x) for x in args.ppo_seeds.split(",") if x]
    result["ppo"] = [{**ppo_curve(args.task, float(b), args, args.out, proxy, proxies, seed), "proxy_rm": proxy}
                     for proxy in args.ppo_proxies.split(",") for b in args.ppo_betas.split(",") if b for seed in seeds]
    result["ppo_pooled"] = pool_ppo(result["ppo"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    write(result, args.out)


def pool_ppo(curves: list[dict]) -> list[dict]:
    """One pooled curve per (proxy RM, beta) that has more than one seed."""
    groups: dict[tuple, list[dict]] = {}
    for c in curves:
        groups.setdefault((c["proxy_rm"], c["beta"]), []).append(c)
    return [pooled_curve(g) for g in groups.values() if len(g) > 1]


def write(result: dict, out: Path) -> None:
    result["plots"] = plot(result, out)
    (out / f"overoptimisation_{result['task']}.json").write_text(json.dumps(result, indent=2))
    (out / f"overoptimisation_{result['task']}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
