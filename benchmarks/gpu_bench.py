"""GPU benchmark: each policy algorithm on a ~100M-parameter Llama on the ``sentiment`` task.

For every algorithm (default: every ``policy`` and ``inference`` algorithm of the registry except the
``sft`` stage: ppo, ppo-ptx, dpo, rrhf, rejection-sampling, best-of-n) it reports time per phase
(generate, score, reference, train), tokens/s, peak memory, training MFU (6 x params x trained tokens
over the train phase's time and the measured peak matmul FLOP/s) and decode MBU (bytes of weights and KV
cache per decode step over the step time and the measured copy bandwidth); and, on one batch of prompts,
the same rollout (sample + reward-model score) through our sampler and through transformers'
``generate`` (and, on CUDA or with ``--static-generate on``, its static-cache ``generate``, which
transformers compiles with CUDA graphs on CUDA, and our sampler with ``cache="static"`` and
``cache="compiled"``, `rlhf_zoo.ops.kv_cache`), as a ratio. See `rlhf_zoo.accel` for the formulas.

Models, built from config (``--size``): ``100m`` is `rlhf_zoo.models.tiny_llama_config` with hidden 768,
16 layers, 12 heads (94M parameters), ``tiny`` hidden 32, 2 layers (what the tests run on CPU); the
vocabulary is the task's tokenizer (45 words). They are randomly initialised: only speed is measured.
  * policy: the big model, a fresh copy for every algorithm; reference: a frozen copy of its initial
    weights (what ``ctx.reference`` is in a real run, the SFT policy);
  * reward model: `rlhf_zoo.models.reward_model_from_policy` of the big policy (InstructGPT's RM is
    initialised from the SFT model, so policy and RM have the same size), its head drawn N(0, 0.02) so
    scores differ and selections (best-of-N, RRHF, rejection sampling) are not all ties;
  * PPO's critic is NOT replaced: the ``ppo`` plugin loads it from the task's reward-model files (a
    tiny model, hidden 64), so PPO's train phase here is the big policy's plus a negligible critic's.

Each algorithm runs through `rlhf_zoo.runner.make_context` (so every plugin runs exactly as ``zoo run``
runs it) with its ``smoke`` preset plus, at ``--size 100m``, the budgets of ``BENCH_OPTIONS``; then
``ctx.policy``, ``ctx.reference`` and ``ctx.reward_fn`` are swapped for the big models and
``algorithm.train`` runs inside `rlhf_zoo.accel.autocast` (bf16 on CUDA, fp32 master weights; nothing
on CPU). Inference algorithms (best-of-n) train nothing: their returned policy answers ``eval_prompts``
evaluation prompts in an ``inference`` phase. No evaluation runs. Phases are timed with a device
synchronisation at both ends, so queued GPU work is charged to the phase that queued it.

    python benchmarks/gpu_bench.py --device cuda --size 100m --out benchmarks/results/gpu_h100
    python benchmarks/gpu_bench.py --device cpu --size tiny --algos dpo,best-of-n --out /tmp/gpu-bench
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_zoo import accel
from rlhf_zoo.generation import sample
from rlhf_zoo.models import new_causal_lm, reward_model_from_policy, reward_scores, tiny_llama_config
from rlhf_zoo.registry import get_registry
from rlhf_zoo.runner import _git_commit, make_context, peak_memory_mb, resolve_device, versions
from rlhf_zoo_envs.tasks.base import ModelReward

SIZES = {  # tiny_llama_config arguments; intermediate size is 2 x hidden
    "100m": {"hidden_size": 768, "num_layers": 16, "num_heads": 12},
    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 4},
}
MAX_POSITIONS = 128  # prompts (<= 13 tokens on sentiment) + 16 response tokens fit easily
RM_HEAD_STD = 0.02
STAGES = ("sft",)  # pipeline stages of kind "policy" that are not preference optimisation
#: budgets at --size 100m, on top of the smoke preset: a few updates at realistic batch sizes
BENCH_OPTIONS: dict[str, dict[str, Any]] = {
    "ppo": {"iterations": 2, "batch_prompts": 64, "minibatches": 4, "epochs": 2},
    "ppo-ptx": {"iterations": 2, "batch_prompts": 64, "minibatches": 4, "epochs": 2},
    "dpo": {"steps": 8, "batch_size": 32, "max_pairs": 256},
    "rrhf": {"iterations": 2, "prompts_per_iteration": 16, "candidates": 4, "epochs": 2},
    "rejection-sampling": {"rounds": 2, "prompts_per_round": 64, "k": 4, "epochs": 2.0, "batch_size": 32},
    "best-of-n": {"n": 8, "eval_prompts": 32},
}
ROLLOUT_DEFAULTS = {"100m": (64, 5), "tiny": (8, 2)}  # (batch, timed repetitions)


# --- setup -------------------------------------------------------------------------------------------------
def default_algorithms() -> list[str]:
    reg = get_registry()
    return [a.name for a in reg.algorithms.values() if a.kind in ("policy", "inference") and a.name not in STAGES]


def build_models(task: Any, size: str, device: torch.device, seed: int) -> dict[str, torch.nn.Module]:
    """Policy, frozen reference (the policy's initial weights) and reward model, fp32, on ``device``."""
    tok = task.tokenizer
    cfg = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, max_positions=MAX_POSITIONS, **SIZES[size])
    policy = new_causal_lm(cfg, seed)
    rm = reward_model_from_policy(policy)
    head = rm.score  # LlamaForSequenceClassification's scalar head
    torch.nn.init.normal_(head.weight, std=RM_HEAD_STD, generator=torch.Generator().manual_seed(seed + 1))
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    return {"policy": policy.to(device), "reference": reference.to(device), "rm": rm.to(device).eval()}


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: bf16 under the CUDA autocast, else the fp32 of the weights."""
    return accel.CUDA_AUTOCAST_DTYPE if device.type == "cuda" else torch.float32


def decode_meter(models: Sequence[torch.nn.Module], device: torch.device) -> accel.DecodeMeter:
    size = torch.empty((), dtype=compute_dtype(device)).element_size()
    return accel.DecodeMeter(models, device, weight_bytes_per_param=size, kv_bytes_per_element=size)


def synchronize_phases(ctx: Any) -> None:
    """Make ``ctx.phase`` wait for the device at both ends (the runner's reads the clock only, so on CUDA
    work queued in one phase would be charged to whatever synchronises next)."""
    inner = ctx.phase

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        accel.synchronize(ctx.device)
        with inner(name):
            try:
                yield
            finally:
                accel.synchronize(ctx.device)

    ctx.phase = phase


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- one algorithm -------------------------------------------------------------------------------------
def run_algorithm(name: str, models: dict[str, torch.nn.Module], args: argparse.Namespace, device: torch.device,
                  peaks: dict[str, float], run_dir: Path) -> dict[str, Any]:
    options = BENCH_OPTIONS.get(name, {}) if args.size == "100m" else {}
    ctx = make_context(name, task=args.task, seed=args.seed, out=run_dir / name, device=str(device), preset="smoke",
                       options=options, progress=False)
    ctx.policy = copy.deepcopy(models["policy"]).train()  # a fresh trainable copy per algorithm
    ctx.reference = models["reference"]
    ctx.reward_fn = ModelReward(models["rm"])
    synchronize_phases(ctx)
    algo, cfg, task = ctx.algorithm, ctx.config, ctx.task
    reset_peak_memory(device)
    with decode_meter([ctx.policy, ctx.reference], device) as meter, accel.autocast(device):
        accel.synchronize(device)
        start = time.perf_counter()
        result = algo.train(ctx, cfg)
        if algo.kind == "inference":  # nothing trained: the work is answering prompts
            prompts = task.prompts("eval")[: cfg.eval_prompts]
            with ctx.phase("inference"):
                result.sample(task, prompts, max_new_tokens=ctx.max_new_tokens, temperature=cfg.temperature,
                              generator=ctx.generator)
        accel.synchronize(device)
        wall = time.perf_counter() - start
    phases = dict(ctx.phase_seconds)
    generated = ctx.counters["generated_tokens"] or (meter.sampled_tokens if algo.kind == "inference" else 0)
    trained = ctx.counters["trained_tokens"]
    gen_s = phases.get("generate") or phases.get("inference") or 0.0
    train_s = phases.get("train", 0.0)
    params = accel.count_params(ctx.policy)
    record = {
        "algorithm": name, "kind": algo.kind, "options": {"preset": "smoke", **options},
        "wall_seconds": wall, "phase_seconds": phases,
        "generated_tokens": generated, "trained_tokens": trained,
        "tokens_per_second": {
            "overall": (generated + trained) / wall,
            "generate": generated / gen_s if generated and gen_s else None,
            "train": trained / train_s if trained and train_s else None,
        },
        "peak_memory_mb": peak_memory_mb(device),
        "train_mfu": accel.mfu(params, trained, train_s, peaks["flops"]) if trained and train_s else None,
        "decode": meter.summary(peaks["bandwidth"]),
    }
    del ctx, result
    return record


# --- the same rollout through our sampler and through generate -------------------------------------------------
def rollout_comparison(task: Any, models: dict[str, torch.nn.Module], device: torch.device, batch: int, reps: int,
                       seed: int, peaks: dict[str, float], static: bool) -> dict[str, Any]:
    """One rollout of ``batch`` prompts (sample one response each, score it with the RM), timed through
    `rlhf_zoo.generation.sample` and through ``generate``; methods interleaved, medians reported. Decode
    MBU comes from one extra, metered repetition (the meter synchronises every step)."""
    policy, rm = models["policy"].eval(), models["rm"]
    prompts = [task.prompts("train")[i % len(task.prompts("train"))] for i in range(batch)]
    p_ids, p_mask = task.encode_prompts(prompts, device)
    T = task.max_new_tokens
    gen = torch.Generator(device=device).manual_seed(seed)
    eos, pad = task.eos_token_id, task.pad_token_id

    def score(r_ids: torch.Tensor, r_mask: torch.Tensor) -> int:
        reward_scores(rm, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1))
        return int(r_mask.sum())

    def ours(cache: str = "dynamic") -> int:
        s = sample(policy, p_ids, p_mask, T, eos_token_id=eos, pad_token_id=pad, suppress_ids=task.suppress_ids,
                   generator=gen, cache=cache)
        return score(s.response_ids, s.response_mask)

    def plain(**extra: Any) -> int:
        out = policy.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True, max_new_tokens=T, top_k=None,
                              top_p=None, temperature=1.0, eos_token_id=eos, pad_token_id=pad,
                              suppress_tokens=task.suppress_ids, **extra)
        resp = out[:, p_ids.shape[1]:]
        is_eos = (resp == eos).long()
        mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()  # up to and including the first EOS
        return score(torch.where(mask.bool(), resp, pad), mask)

    methods = {"sample": ours, "generate": plain}
    if static:
        methods["generate_static"] = lambda: plain(cache_implementation="static")
        methods["sample_static"] = lambda: ours("static")
        methods["sample_compiled"] = lambda: ours("compiled")  # static cache + torch.compile'd decode step
    times: dict[str, list[float]] = {k: [] for k in methods}
    tokens: dict[str, list[int]] = {k: [] for k in methods}
    errors: dict[str, str] = {}
    with torch.no_grad(), accel.autocast(device):
        for rep in range(reps + 1):  # the first round warms up (and compiles) and is not counted
            for name, fn in methods.items():
                if name in errors:
                    continue
                accel.synchronize(device)
                start = time.perf_counter()
                try:
                    n = fn()
                except Exception as e:  # an optional path (static cache + compile) may not work here
                    if name in ("sample", "generate"):
                        raise
                    errors[name] = f"{type(e).__name__}: {e}"
                    continue
                accel.synchronize(device)
                if rep:
                    times[name].append(time.perf_counter() - start)
                    tokens[name].append(n)
        decode: dict[str, Any] = {}
        for name in ("sample", "generate"):  # the static path is compiled: forward hooks may not fire
            with decode_meter([policy], device) as meter:
                methods[name]()
            decode[name] = meter.summary(peaks["bandwidth"])
    out: dict[str, Any] = {"batch": batch, "max_new_tokens": T, "reps": reps, "methods": {}, "errors": errors}
    for name in methods:
        if name in errors:
            continue
        med = statistics.median(times[name])
        out["methods"][name] = {"median_seconds": med, "tokens_per_second": statistics.median(tokens[name]) / med,
                                "decode": decode.get(name)}
    base = out["methods"]["generate"]["median_seconds"]
    for m in out["methods"].values():
        m["ratio_vs_generate"] = m["median_seconds"] / base
    return out


# --- report -----------------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    m, p = res["model"], res["peaks"]
    lines = [
        f"# GPU benchmark: {res['device_name']}", "",
        f"`{' '.join(res['argv'])}` on {res['device']} ({res['device_name']}), commit `{res['git_commit']}`, "
        f"torch {res['versions'].get('torch')}, transformers {res['versions'].get('transformers')}.", "",
        f"Model: Llama from config, {m['params']:,} parameters (hidden {m['hidden_size']}, "
        f"{m['num_layers']} layers, {m['num_heads']} heads, vocab {m['vocab_size']}), fp32 weights, forwards in "
        f"{res['compute_dtype']}. Task `{res['task']}`, responses of at most {res['max_new_tokens']} tokens.", "",
        f"Measured peaks: {p['flops'] / 1e12:.3g} TFLOP/s ({p['flops_dtype']} {p['matmul_size']}^3 matmul), "
        f"{p['bandwidth'] / 1e9:.4g} GB/s (copy, read + write).", "",
        "| algorithm | wall s | generate s | score s | reference s | train s | gen tok/s | train tok/s | "
        "peak MB | train MFU | decode ms/step | decode MBU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["algorithms"]:
        ph, tps, d = r["phase_seconds"], r["tokens_per_second"], r["decode"]
        gen_s = ph.get("generate", ph.get("inference"))
        lines.append(
            f"| {r['algorithm']} | {r['wall_seconds']:.3g} | {_fmt(gen_s)} | {_fmt(ph.get('score'))} | "
            f"{_fmt(ph.get('reference'))} | {_fmt(ph.get('train'))} | {_fmt(tps['generate'], '.4g')} | "
            f"{_fmt(tps['train'], '.4g')} | {r['peak_memory_mb']:.0f} | {_fmt(r['train_mfu'])} | "
            f"{_fmt(d['step_ms'])} | {_fmt(d['mbu'])} |")
    ro = res["rollout"]
    lines += ["", f"Rollout of {ro['batch']} prompts (sample + reward-model score), median of {ro['reps']}:", "",
              "| method | seconds | tokens/s | decode ms/step | decode MBU | ratio vs generate |", "|---|---|---|---|---|---|"]
    for name, r in ro["methods"].items():
        d = r["decode"] or {}
        lines.append(f"| {name} | {r['median_seconds']:.4g} | {r['tokens_per_second']:.4g} | {_fmt(d.get('step_ms'))} | "
                     f"{_fmt(d.get('mbu'))} | {r['ratio_vs_generate']:.3f} |")
    for name, err in ro["errors"].items():
        lines.append(f"\n`{name}` failed: {err}")
    lines += ["", "MFU = 6 x params x trained tokens / train-phase seconds / peak FLOP/s; MBU = (weight + KV-cache "
              "bytes read per decode step) / step time / bandwidth, weights and KV at the compute dtype "
              "(see rlhf_zoo/accel.py). Peak memory: CUDA max allocated per algorithm; on CPU the process's "
              "peak RSS so far. PPO's critic is the task's tiny reward model (see the script's docstring).", ""]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--size", choices=sorted(SIZES), default="100m")
    ap.add_argument("--algos", default="", help="comma-separated algorithms (default: all policy algorithms)")
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rollout-batch", type=int, default=0, help="prompts in the rollout comparison (0: by size)")
    ap.add_argument("--reps", type=int, default=0, help="timed rollout repetitions (0: by size)")
    ap.add_argument("--static-generate", choices=("auto", "on", "off"), default="auto",
                    help="also time generate and the zoo's sampler with a static cache, and the sampler with a "
                         "compiled decode step (auto: on CUDA only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="directory for results.json and report.md")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()] or default_algorithms()
    reg = get_registry()
    for a in algos:
        reg.algorithm(a)  # an unknown name fails here, with the known ones listed
    task = reg.task(args.task).load(progress=True)

    # 1) measured peaks of this device, at the dtype the matmuls run in
    dtype = compute_dtype(device)
    matmul = 8192 if device.type == "cuda" else 256
    peaks = {"flops": accel.measure_peak_flops(device, dtype, matmul), "flops_dtype": str(dtype).removeprefix("torch."),
             "matmul_size": matmul, "bandwidth": accel.measure_bandwidth(device)}
    # 2) models
    models = build_models(task, args.size, device, args.seed)
    cfg = models["policy"].config
    # 3) rollout: our sampler vs generate (also warms the device up)
    batch, reps = ROLLOUT_DEFAULTS[args.size]
    static = args.static_generate == "on" or (args.static_generate == "auto" and device.type == "cuda")
    rollout = rollout_comparison(task, models, device, args.rollout_batch or batch, args.reps or reps, args.seed,
                                 peaks, static)
    # 4) the algorithms
    records = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name in algos:
            print(f"[gpu_bench] {name}", file=sys.stderr, flush=True)
            records.append(run_algorithm(name, models, args, device, peaks, Path(tmp)))
    res = {
        "device": str(device), "device_name": accel.device_name(device), "task": args.task, "size": args.size,
        "max_new_tokens": task.max_new_tokens, "compute_dtype": str(dtype).removeprefix("torch."),
        "model": {"params": accel.count_params(models["policy"]), "hidden_size": cfg.hidden_size,
                  "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
                  "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
                  "attn_implementation": cfg._attn_implementation},
        "peaks": peaks, "rollout": rollout, "algorithms": records, "threads": torch.get_num_threads(),
        "versions": versions(), "git_commit": _git_commit(), "argv": ["benchmarks/gpu_bench.py", *(argv or sys.argv[1:])],
    }
    print(markdown(res))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "report.md").write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
