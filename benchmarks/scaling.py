"""Where the time goes (issue 15 item 5): one iteration's wall time of ``dpo`` and ``ppo`` against batch size,
response length and model size, a fitted line per series (how much of an iteration is fixed overhead),
and the training step's FLOP/s as a fraction of this machine's measured matmul peak.

Setup: benchmarks/speed_vs_trl.py's realistic user-model shape (`build_user_setup`: a 32k byte-level BPE
tokenizer trained in-process, a Qwen2 of 8 layers x 512 with tied embeddings, ~42M parameters, random
weights, and a reward model of the same architecture; prompts of exactly 64 tokens), built once, with
responses in the data as long as the longest of the response-length series (shorter caps truncate them).
The model-size series changes only the number of decoder layers (same tokenizer, width, data and seed), so
the parameter count is an exact linear axis. Each point runs the plugin's ``train`` through the own-model
path, as ``zoo run ALGO --model DIR [--reward DIR --prompts FILE] [--dataset FILE]`` would (speed_vs_trl's
``_user_context`` = ``make_context``; models load before any timer), for 1 warm-up + ``--reps`` iterations,
checkpoints off, CPU, fp32, ``--threads`` torch threads.

What is timed: each iteration of the plugin's loop, from one metrics row to the next (an ``on_iteration_end``
hook registered for the run), with the run's phase timers (``RunContext.phase``) read at the same moments,
so every iteration splits into the plugin's phases (dpo: train; ppo: generate, score, train) and the rest
(metrics, rewards, bookkeeping). The first iteration (warm-up: optimiser state allocated, critic loaded,
caches filled) is discarded; a point's figure is the median of the others.

  dpo  one iteration = one optimiser step on a batch of B pairs (chosen and rejected in one forward of 2B
       rows of 64 + R tokens, sigmoid loss, backward, clip, AdamW). The reference log-probs of the run's pairs
       are computed once before the loop (``reference`` phase, batches of 256 pairs); its share per batch of
       B pairs is reported beside the iteration (not inside it: the loop never runs the reference).
  ppo  one iteration = rollout of B prompts (sample R tokens with the KV cache; score: reference forward,
       reward-model forward, KL-shaped rewards) + update (critic values, GAE, ``--ppo-epochs`` x
       ``--ppo-minibatches`` clipped policy steps and value steps of the separate critic). Default 1 x 1 (one
       policy step and one critic step per rollout), so the grid fits the time budget: the plugin's
       default 4 x 4 does 4 passes over the rollout and 16 optimiser steps of each network; the optimiser
       step's own cost is measured on its own (`optimizer_seconds`) to extrapolate.

Fits: for each series (one factor varied around the base point: batch B, response cap R, parameters) and
each timing column, least squares time = a + b x and R^2; a is the time the line gives at x = 0, the part
of an iteration that does not grow with that factor, also as a fraction of the base point's time.

FLOPs of the training step (`forward_flops`, `train_flops`; the standard dense-transformer count, bias
and norm FLOPs ignored, the optimiser excluded):

    forward  = 2 N tokens + 4 L d W tokens + 2 d V head_positions
    training = 3 x forward (+ 2 d V head_positions when the backward recomputes the head's logits)

N = parameters of the decoder blocks and final norm (everything but the token embedding, which the tied
LM head shares: its cost is the 2 d V term), tokens = rows x W, W = the row width (prompt + response), L
layers, d width, V vocabulary; attention scores and weighted sum cost 4 L d W per token (the whole row,
not halved for causality, as PaLM's appendix B counts). Where the LM head runs follows
`rlhf_zoo.ops.logprobs`: at every position of the (rows, W) block when its fp32 logits fit in
``CHUNK_BYTES`` (naive path), else at the response tokens only, chunked, with the logits recomputed in the
backward. dpo's step: one training pass of 2B rows; ppo's train phase: a forward of the critic over the
rollout, then epochs x (a training pass of the policy and one of the critic, whose head is d -> 1) over the
rollout's rows. The response width is the cap R (a random-weight 32k-vocabulary model almost never samples
EOS early; the measured mean length is in the JSON). GFLOP/s = FLOPs / median train-phase seconds, against
the peak of ``torch.matmul`` on fp32 square matrices (best of several, at the same thread count, measured
at the start and the end of the run).

Grid (defaults): batch 2, 4, 8, 16; response cap 16, 32, 64, 128; layers 2, 4, 8, 12 (22.8M-55.0M parameters);
base point batch 8, response 64, 8 layers: 10 points per algorithm; dpo 1 + 3 iterations per point, ppo 1 + 2.
About 10 minutes on a quiet 2-core machine with one thread (estimated from a partial run under load; the
tokenizer and models take ~20 s of it, ppo about half of the rest):

    OMP_NUM_THREADS=1 RLHF_ZOO_CACHE=/tmp/zoo-cache python benchmarks/scaling.py --threads 1
        # -> benchmarks/results/scaling.json and scaling.md
    OMP_NUM_THREADS=1 python benchmarks/scaling.py --quick      # a tiny model, 2 points per series, 1 rep (~10 s)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_zoo.hookspecs import hookimpl

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALGORITHMS = ("dpo", "ppo")
FACTORS = ("batch", "response", "parameters")
#: the base point: speed_vs_trl's realistic work (dpo batch 8 pairs; ppo 8 prompts), responses of 64, 8 layers
BASE = {"batch": 8, "response": 64, "layers": 8}
#: the series, one factor varied at a time around BASE (the model-size series varies the layers)
GRID = {"dpo": {"batch": [2, 4, 8, 16], "response": [16, 32, 64, 128], "layers": [2, 4, 8, 12]},
        "ppo": {"batch": [2, 4, 8, 16], "response": [16, 32, 64, 128], "layers": [2, 4, 8, 12]}}
REPS = {"dpo": 3, "ppo": 2}
#: --quick: a tiny model (speed_vs_trl's "mini" shape), two points per series, one counted repetition
QUICK_BASE = {"batch": 4, "response": 8, "layers": 2}
QUICK_GRID = {a: {"batch": [2, 4], "response": [4, 8], "layers": [1, 2]} for a in ALGORITHMS}
PPO_EPOCHS, PPO_MINIBATCHES = 1, 1
MATMUL_SIZES = (1024, 2048)
QUICK_MATMUL_SIZES = (256, 512)


# --- pure functions (tests/test_scaling_fit.py) -------------------------------------------------------
def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least squares y = a + b x.  -> {"a", "b", "r2"}; R^2 = 1 - SS_res / SS_tot (1 when the ys are all
    equal and the line passes through them). Needs two distinct xs."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError(f"fit_line needs at least two (x, y) pairs, got {n} xs and {len(ys)} ys")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_line needs at least two distinct x values")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-24 else float("nan"))
    return {"a": a, "b": b, "r2": r2}


def qwen2_block_parameters(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """Parameters of a Qwen2's decoder blocks and final norm (everything but the embedding and the LM head):
    per layer q, k, v projections with biases, o without, the gated MLP's three matrices, two RMSNorms."""
    kv = kv_heads * (hidden // heads)
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden
    return layers * (attention + 3 * hidden * intermediate + 2 * hidden) + hidden


@dataclass(frozen=True)
class Dims:
    """What the FLOP count needs of a model: N (block parameters), d, L, and the head's outputs V."""

    block_parameters: int
    hidden: int
    layers: int
    vocab: int


def forward_flops(m: Dims, rows: int, width: int, head_positions: int) -> float:
    """2 N per token + 4 L d W per token (attention over the row's W positions) + 2 d V per head position."""
    tokens = rows * width
    return 2.0 * m.block_parameters * tokens + 4.0 * m.layers * m.hidden * width * tokens \
        + 2.0 * m.hidden * m.vocab * head_positions


def train_flops(m: Dims, rows: int, width: int, head_positions: int, recompute_head: bool = False) -> float:
    """Forward + backward (twice the forward's matmuls: gradients of the inputs and of the weights), plus
    one more head forward where the backward recomputes the logits (the chunked log-probs)."""
    return 3.0 * forward_flops(m, rows, width, head_positions) + (2.0 * m.hidden * m.vocab * head_positions
                                                                   if recompute_head else 0.0)


def lm_head_plan(rows: int, width: int, response_tokens: int, vocab: int, chunk_bytes: int) -> tuple[int, bool]:
    """Where the log-probs' LM head runs (`rlhf_zoo.ops.logprobs`, ``auto``): (positions, recomputed in the
    backward). Naive when the (rows, width, vocab) fp32 logits fit in ``chunk_bytes``: every position, no
    recompute; chunked otherwise: the ``response_tokens`` real response tokens only, recomputed."""
    if rows * width * vocab * 4 <= chunk_bytes:
        return rows * width, False
    return response_tokens, True


def dpo_step_flops(m: Dims, batch: int, prompt: int, response: int, chunk_bytes: int) -> float:
    """One dpo step: a training pass of 2B rows (chosen and rejected) of prompt + response tokens."""
    rows, width = 2 * batch, prompt + response
    positions, recompute = lm_head_plan(rows, width, rows * response, m.vocab, chunk_bytes)
    return train_flops(m, rows, width, positions, recompute)


def dpo_reference_flops(m: Dims, batch: int, prompt: int, response: int, chunk_bytes: int,
                        reference_pairs: int) -> float:
    """The reference log-probs of B pairs (a forward of 2B rows), computed in forwards of
    ``reference_pairs`` pairs (the head's path is decided per forward)."""
    rows, width = 2 * batch, prompt + response
    plan_rows = 2 * reference_pairs
    positions, _ = lm_head_plan(plan_rows, width, plan_rows * response, m.vocab, chunk_bytes)
    per_row = positions / plan_rows
    return forward_flops(m, rows, width, 0) + 2.0 * m.hidden * m.vocab * per_row * rows


def ppo_train_flops(policy: Dims, critic: Dims, batch: int, prompt: int, response: int, epochs: int,
                    minibatches: int, chunk_bytes: int) -> float:
    """ppo's train phase: the critic's values over the rollout (forward), then each epoch a training pass of
    the policy (log-probs; the head's path decided per minibatch) and one of the critic (a d -> 1 head at
    the response positions) over all B rows."""
    width = prompt + response
    mb_rows = math.ceil(batch / minibatches)
    positions, recompute = lm_head_plan(mb_rows, width, mb_rows * response, policy.vocab, chunk_bytes)
    policy_pass = train_flops(policy, batch, width, positions * batch / mb_rows, recompute)
    critic_pass = train_flops(critic, batch, width, batch * response)
    return forward_flops(critic, batch, width, batch * response) + epochs * (policy_pass + critic_pass)


def matmul_flops(n: int) -> float:
    """An (n, n) x (n, n) matmul: n^2 outputs of n multiply-adds."""
    return 2.0 * n ** 3


# --- measurement ---------------------------------------------------------------------------------------
def _svt() -> Any:
    """benchmarks/speed_vs_trl.py (its setup builder and helpers), imported on first use."""
    if "speed_vs_trl" not in sys.modules:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("speed_vs_trl")


def matmul_peak(sizes: Sequence[int], repeats: int = 5) -> dict[str, Any]:
    """Best GFLOP/s of torch.matmul on fp32 (n, n) matrices for each n, at torch's current thread count."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    for n in sizes:
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        torch.matmul(a, b)  # warm-up
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - start)
        out[str(n)] = matmul_flops(n) / best / 1e9
    return {"gflops_by_size": out, "peak_gflops": max(out.values()), "repeats": repeats,
            "threads": torch.get_num_threads()}


def optimizer_seconds(policy_dir: Path, steps: int = 3) -> dict[str, Any]:
    """One AdamW step (gradient-norm clip, step, zero_grad: `rlhf_zoo.training.optimizer_step`) on the base
    policy's parameters with random gradients, torch's default (foreach) and fused implementations; best of
    ``steps`` after a warm-up step. An iteration does one per optimiser step of each trained network."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_zoo.training import optimizer_step

    model = AutoModelForCausalLM.from_pretrained(policy_dir, use_safetensors=True)
    params = list(model.parameters())
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in params)}
    for name, kwargs in (("adamw_foreach", {}), ("adamw_fused", {"fused": True})):
        try:
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **kwargs)
        except (RuntimeError, TypeError) as e:
            out[name] = f"unavailable: {e}"
            continue
        best = math.inf
        for i in range(steps + 1):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            start = time.perf_counter()
            optimizer_step(None, opt, 1.0, "optimizer benchmark")
            if i:
                best = min(best, time.perf_counter() - start)
        out[name] = best
        del opt
    del model, params
    gc.collect()
    return out


class IterationClock:
    """An ``on_iteration_end`` hook: each iteration's wall time (from the previous metrics row) and the
    run's phase timers' growth over it."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.iterations: list[dict[str, Any]] = []
        self._last = time.perf_counter()
        self._phases = dict(ctx.phase_seconds)

    @hookimpl
    def on_iteration_end(self, run: Any, iteration: int, metrics: dict[str, Any]) -> None:
        if run is not self.ctx:
            return
        now, phases = time.perf_counter(), dict(run.phase_seconds)
        self.iterations.append({"iteration": iteration, "seconds": now - self._last,
                                "phases": {k: v - self._phases.get(k, 0.0) for k, v in phases.items()
                                           if v - self._phases.get(k, 0.0) > 0},
                                "response_length": metrics.get("response_length")})
        self._last, self._phases = now, phases


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10)
        return out.stdout.rstrip("\n") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Setup:
    """The built model directories (one per layer count) and data files, and each model's dims."""

    def __init__(self, root: Path, shape: dict[str, int], layers: Sequence[int]) -> None:
        svt = _svt()
        self.root, self.shape = root, shape
        built = svt.build_user_setup(root / f"layers-{shape['layers']}", shape)
        self.build_seconds = {"base (tokenizer, models, data)": built["seconds"],
                              "tokenizer": built["tokenizer_seconds"]}
        self.vocab = built["vocab_size"]
        base = built["paths"]
        self.data = {k: base[k] for k in ("prefs", "prompts")}
        self.models: dict[int, dict[str, Any]] = {shape["layers"]: {"policy": base["policy"], "rm": base["rm"],
                                                                    "parameters": built["parameters"]}}
        for n in sorted(set(layers) - {shape["layers"]}):
            start = time.perf_counter()
            self.models[n] = self._variant(base, n)
            self.build_seconds[f"{n} layers (policy, reward model)"] = time.perf_counter() - start
        for n, m in self.models.items():
            m["block_parameters"] = qwen2_block_parameters(shape["hidden"], n, shape["intermediate"], shape["heads"],
                                                           shape["heads"])
            # tied embeddings: everything else is the V x d embedding the head shares
            m["formula_matches_model"] = m["parameters"] == m["block_parameters"] + self.vocab * shape["hidden"]

    def _variant(self, base: dict[str, Path], layers: int) -> dict[str, Any]:
        """The base policy and reward model with ``layers`` decoder layers (same config otherwise, same seed)."""
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        d = self.root / f"layers-{layers}"
        base_config = AutoConfig.from_pretrained(base["policy"])
        cfg = base_config.to_dict()
        cfg.pop("layer_types", None)  # one entry per layer: rebuilt for the new count
        cfg["num_hidden_layers"] = layers
        config = type(base_config).from_dict(cfg)
        tok = AutoTokenizer.from_pretrained(base["policy"])
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(config)
        policy.generation_config.eos_token_id = tok.eos_token_id
        policy.generation_config.pad_token_id = tok.pad_token_id
        policy.save_pretrained(d / "policy")
        tok.save_pretrained(d / "policy")
        config.num_labels = 1
        rm = AutoModelForSequenceClassification.from_config(config)
        rm.save_pretrained(d / "rm")
        tok.save_pretrained(d / "rm")
        n = sum(p.numel() for p in policy.parameters())
        del policy, rm
        return {"policy": d / "policy", "rm": d / "rm", "parameters": n}

    def paths(self, layers: int) -> dict[str, Path]:
        m = self.models[layers]
        return {"policy": m["policy"], "rm": m["rm"], **self.data}

    def dims(self, layers: int, vocab: int | None = None) -> Dims:
        return Dims(self.models[layers]["block_parameters"], self.shape["hidden"], layers,
                    self.vocab if vocab is None else vocab)


def algorithm_options(algo: str, paths: dict[str, Path], point: dict[str, int], iterations: int,
                      args: argparse.Namespace) -> dict[str, Any]:
    svt = _svt()
    B, R = point["batch"], point["response"]
    if algo == "dpo":  # speed_vs_trl's dpo settings: one epoch of exactly `iterations` batches
        opts = svt.user_zoo_options("dpo", {"response_tokens": R}, {"pairs": B * iterations, "batch": B})
        opts["dataset"] = str(paths["prefs"])
        return opts
    return {"iterations": iterations, "batch_prompts": B, "epochs": args.ppo_epochs, "minibatches": args.ppo_minibatches,
            "learning_rate": svt.USER_LR, "critic_learning_rate": svt.USER_LR, "beta": svt.USER_BETA, "clip": 0.2,
            "value_clip": 0.2, "max_new_tokens": R}


def measure_point(algo: str, setup: Setup, point: dict[str, int], reps: int, args: argparse.Namespace,
                  tmp: Path) -> dict[str, Any]:
    """1 warm-up + ``reps`` iterations of the plugin's train on fresh models; the per-iteration record."""
    svt = _svt()
    paths = setup.paths(point["layers"])
    iterations = 1 + reps
    out = tmp / f"{algo}-b{point['batch']}-r{point['response']}-l{point['layers']}"
    opts = algorithm_options(algo, paths, point, iterations, args)
    start = time.perf_counter()
    ctx = svt._user_context(algo, paths, out, opts, online=algo == "ppo")
    load_seconds = time.perf_counter() - start
    clock = IterationClock(ctx)
    manager = ctx.registry.manager
    manager.register(clock, name=f"scaling-clock-{id(clock)}")
    try:
        ctx.algorithm.train(ctx, ctx.config)
    finally:
        manager.unregister(clock)
    its = clock.iterations
    if len(its) != iterations:
        raise RuntimeError(f"{algo} {point}: {len(its)} iterations logged, expected {iterations}")
    counted = its[1:]
    phase_names = sorted({k for it in counted for k in it["phases"]})
    columns: dict[str, list[float]] = {"iteration": [it["seconds"] for it in counted]}
    for p in phase_names:
        columns[p] = [it["phases"].get(p, 0.0) for it in counted]
    columns["other"] = [it["seconds"] - sum(it["phases"].values()) for it in counted]
    r: dict[str, Any] = {**point, "parameters": setup.models[point["layers"]]["parameters"],
                         "median": {k: statistics.median(v) for k, v in columns.items()}, "per_iteration": columns,
                         "warmup_seconds": its[0]["seconds"], "load_seconds": load_seconds, "load_average": svt._load()}
    if algo == "dpo":  # the precomputed reference log-probs, before the loop: their share per batch
        r["median"]["reference per batch"] = ctx.phase_seconds.get("reference", 0.0) / iterations
    lengths = [it["response_length"] for it in counted if it["response_length"] is not None]
    if lengths:
        r["mean_response_length"] = sum(lengths) / len(lengths)
    r["flops"] = point_flops(algo, setup, point, reps, args)
    train = r["median"].get("train")
    if train:
        r["train_gflops_per_second"] = r["flops"]["train"] / train / 1e9
    del ctx
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return r


def point_flops(algo: str, setup: Setup, point: dict[str, int], reps: int, args: argparse.Namespace) -> dict[str, float]:
    from rlhf_zoo.ops.logprobs import CHUNK_BYTES

    B, R, P = point["batch"], point["response"], setup.shape["prompt_tokens"]
    policy = setup.dims(point["layers"])
    if algo == "dpo":
        dpo = sys.modules[_registry().algorithm("dpo").train.__module__]
        pairs = B * (1 + reps)  # the run's pairs, in forwards of at most REFERENCE_BATCH
        return {"train": dpo_step_flops(policy, B, P, R, CHUNK_BYTES),
                "reference per batch": dpo_reference_flops(policy, B, P, R, CHUNK_BYTES,
                                                           min(pairs, dpo.REFERENCE_BATCH))}
    critic = setup.dims(point["layers"], vocab=1)
    return {"train": ppo_train_flops(policy, critic, B, P, R, args.ppo_epochs, args.ppo_minibatches, CHUNK_BYTES)}


def _registry() -> Any:
    from rlhf_zoo.registry import get_registry

    return get_registry()


def series_points(grid: dict[str, list[int]], base: dict[str, int]) -> dict[str, list[dict[str, int]]]:
    """Each factor's points, the others at the base value (the model-size series varies the layers)."""
    out: dict[str, list[dict[str, int]]] = {}
    for factor, key in (("batch", "batch"), ("response", "response"), ("parameters", "layers")):
        out[factor] = [{**base, key: v} for v in grid[key]]
    return out


def _key(p: dict[str, int]) -> tuple[int, int, int]:
    return p["batch"], p["response"], p["layers"]


def x_of(factor: str, point: dict[str, Any]) -> float:
    return {"batch": point["batch"], "response": point["response"], "parameters": point["parameters"] / 1e6}[factor]


def fit_series(factor: str, points: list[dict[str, Any]], base: dict[str, Any],
               no_layers_x: float | None = None) -> dict[str, Any]:
    """For every timing column of the points: the line, and its intercept as a fraction of the base point's.
    The model-size series varies the decoder layers only, so its x = 0 lies below the smallest model (the
    V x d embedding that the head shares stays): ``no_layers_x`` (that embedding's size, M parameters) adds
    the line's value there, what an iteration costs besides the decoder blocks."""
    xs = [x_of(factor, p) for p in points]
    fits: dict[str, Any] = {}
    for col in points[0]["median"]:
        if col == "other":  # (metrics, bookkeeping: milliseconds; in the point tables)
            continue
        ys = [p["median"][col] for p in points]
        if len(set(xs)) < 2:
            continue
        f = fit_line(xs, ys)
        ref = base["median"].get(col)
        f["a_fraction_of_base"] = f["a"] / ref if ref else None
        if no_layers_x is not None:
            f["at_no_layers"] = f["a"] + f["b"] * no_layers_x
            f["at_no_layers_fraction_of_base"] = f["at_no_layers"] / ref if ref else None
        fits[col] = f
    return {"x": xs, "points": [_key(p) for p in points], "fits": fits}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    svt = _svt()
    torch.set_num_threads(args.threads)
    svt._quiet()
    t0 = time.perf_counter()
    load_start = svt._load()
    base = dict(QUICK_BASE if args.quick else BASE)
    grid = {a: {k: list(v) for k, v in (QUICK_GRID if args.quick else GRID)[a].items()} for a in args.algorithms}
    for a in args.algorithms:
        for key, values in (("batch", args.batches), ("response", args.responses), ("layers", args.layers)):
            if values:
                grid[a][key] = values
    reps = {a: (args.reps or (1 if args.quick else REPS[a])) for a in args.algorithms}
    shape = dict(svt.USER_SHAPES["mini" if args.quick else "realistic"])
    shape["layers"] = base["layers"]
    longest = max([base["response"], *(r for g in grid.values() for r in g["response"])])
    widest = max([base["batch"], *(b for g in grid.values() for b in g["batch"])])
    shape["response_tokens"] = longest
    shape["rows"] = max(shape["rows"], widest * (1 + max(reps.values())), 64 if not args.quick else 16)
    peak_sizes = QUICK_MATMUL_SIZES if args.quick else MATMUL_SIZES
    print(f"scaling: threads {torch.get_num_threads()}, load {load_start}; matmul peak ...", flush=True)
    peak_start = matmul_peak(peak_sizes)
    print(f"  {peak_start['peak_gflops']:.1f} GFLOP/s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="zoo-scaling-"))
    setup_root = args.setup_dir or tmp / "setup"
    try:
        layers = sorted({base["layers"], *(n for g in grid.values() for n in g["layers"])})
        print(f"building the setup (shape {shape}, layers {layers}) in {setup_root}", flush=True)
        setup = Setup(setup_root, shape, layers)
        opt = optimizer_seconds(setup.models[base["layers"]]["policy"], steps=1 if args.quick else 3)
        print(f"  optimiser step: {opt}", flush=True)
        algorithms: dict[str, Any] = {}
        for algo in args.algorithms:
            series = series_points(grid[algo], base)
            todo = {_key(p): p for ps in series.values() for p in ps}
            todo.setdefault(_key(base), base)
            measured: dict[tuple[int, int, int], dict[str, Any]] = {}
            for k, p in todo.items():
                print(f"{algo} batch {p['batch']} response {p['response']} layers {p['layers']} ...", flush=True)
                measured[k] = measure_point(algo, setup, p, reps[algo], args, tmp)
                m = measured[k]
                print("  " + ", ".join(f"{c} {v:.3f}" for c, v in m["median"].items()) + f" s; load {m['load_average']}",
                      flush=True)
            base_point = measured[_key(base)]
            embedding = setup.vocab * shape["hidden"] / 1e6
            fits = {f: fit_series(f, [measured[_key(p)] for p in ps], base_point,
                                  embedding if f == "parameters" else None) for f, ps in series.items()}
            algorithms[algo] = {"reps": reps[algo], "points": list(measured.values()), "base": base_point,
                                "series": fits}
        peak_end = matmul_peak(peak_sizes)
    finally:
        if not args.keep_setup and args.setup_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    peak = max(peak_start["peak_gflops"], peak_end["peak_gflops"])
    for a in algorithms.values():
        for p in a["points"]:
            if "train_gflops_per_second" in p:
                p["fraction_of_peak"] = p["train_gflops_per_second"] / peak
    load_end = svt._load()
    loads = [x for x in [load_start, load_end, *(p["load_average"] for a in algorithms.values() for p in a["points"])]
             if x]
    under_load = any(x[0] > svt.LOAD_QUIET for x in loads)
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    machine = svt._machine()
    machine["load_average_at_start"] = load_start
    return {"benchmark": "scaling", "command": " ".join(["benchmarks/scaling.py", *sys.argv[1:]]), "quick": args.quick,
            "machine": machine, "versions": svt._versions(), "git_commit": _git("rev-parse", "HEAD"),
            "uncommitted_files": [line[3:] for line in (dirty or "").splitlines()],
            "torch_threads": torch.get_num_threads(), "load_average_start": load_start, "load_average_end": load_end,
            "load_quiet_threshold": svt.LOAD_QUIET, "measured_under_load": under_load,
            "shape": shape, "base": base, "grid": grid, "ppo_epochs": args.ppo_epochs,
            "ppo_minibatches": args.ppo_minibatches,
            "models": {str(n): {k: v for k, v in m.items() if k not in ("policy", "rm")} for n, m in setup.models.items()},
            "build_seconds": setup.build_seconds, "matmul": {"start": peak_start, "end": peak_end, "peak_gflops": peak},
            "optimizer_step_seconds": opt, "algorithms": algorithms, "seconds": time.perf_counter() - t0}


# --- report --------------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


UNITS = {"batch": {"dpo": "s per pair", "ppo": "s per prompt"}, "response": "s per response token",
         "parameters": "s per M parameters"}
X_NAMES = {"batch": "batch", "response": "response cap R", "parameters": "parameters (M)"}


def markdown(r: dict[str, Any]) -> str:
    m, v = r["machine"], r["versions"]
    lines = [f"# Where the time goes: one iteration of dpo and ppo against batch, response length and model size"
             f"{' (QUICK: tiny model, not a measurement)' if r['quick'] else ''}", "",
             f"`{r['command']}` (written by benchmarks/scaling.py; its docstring says exactly what is timed).", ""]
    if r["measured_under_load"]:
        lines += [f"**MEASURED UNDER LOAD: the 1-minute load average exceeded {r['load_quiet_threshold']} on this "
                  f"{m['usable_cpus']}-core machine (start {r['load_average_start']}, end {r['load_average_end']}); "
                  "other processes stretched these times. Redo on a quiet machine before quoting them.**", ""]
    lines += [f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), "
              f"torch threads {r['torch_threads']} (OMP_NUM_THREADS={m['OMP_NUM_THREADS']}), CPU fp32; load average "
              f"(1, 5, 15 min) {r['load_average_start']} at the start, {r['load_average_end']} at the end. Versions: "
              + ", ".join(f"{k} {x}" for k, x in v.items()) + f". Commit {r['git_commit']}"
              + (f" with uncommitted changes in {', '.join(r['uncommitted_files'])}" if r["uncommitted_files"] else "")
              + f". Total {r['seconds']:.0f} s.", ""]
    s, b = r["shape"], r["base"]
    mm = r["matmul"]
    lines += [f"Setup: Qwen2, width {s['hidden']}, {s['heads']} heads, MLP {s['intermediate']}, vocabulary "
              f"{s['vocab_size']} (byte-level BPE, tied embeddings, random weights), reward model and critic of the same "
              f"architecture; prompts of {s['prompt_tokens']} tokens. Base point: batch {b['batch']} (dpo pairs, ppo "
              f"prompts), response cap {b['response']}, {b['layers']} layers. Models by layer count: "
              + ", ".join(f"{n} layers {x['parameters'] / 1e6:.3g}M" for n, x in sorted(r["models"].items(), key=lambda t: int(t[0])))
              + f". ppo: {r['ppo_epochs']} epoch(s) x {r['ppo_minibatches']} minibatch(es) per iteration (the plugin's "
              "default is 4 x 4).", "",
              f"Matmul peak (torch.matmul, fp32 square, best of {mm['start']['repeats']}, {mm['start']['threads']} "
              "thread(s)): " + ", ".join(f"n={n} {g:.1f}" for n, g in mm["start"]["gflops_by_size"].items())
              + " GFLOP/s at the start, " + ", ".join(f"n={n} {g:.1f}" for n, g in mm["end"]["gflops_by_size"].items())
              + f" at the end: peak **{mm['peak_gflops']:.1f} GFLOP/s**.", ""]
    o = r["optimizer_step_seconds"]
    lines += [f"One optimiser step (clip + AdamW + zero_grad) on the base policy's {o['parameters'] / 1e6:.3g}M "
              f"parameters: foreach {_f(o.get('adamw_foreach'))} s, fused {_f(o.get('adamw_fused'))} s (an iteration "
              "has one per step of each trained network: dpo 1, ppo 2 x epochs x minibatches).", ""]
    for algo, a in r["algorithms"].items():
        bp = a["base"]
        lines += [f"## {algo}", "", f"Median of {a['reps']} iteration(s) per point after one warm-up iteration; seconds.", ""]
        it = bp["median"]["iteration"]
        shares = ", ".join(f"{c} {100 * x / it:.0f}%" for c, x in bp["median"].items()
                           if c not in ("iteration", "reference per batch"))
        lines += [f"Base point (B {bp['batch']}, R {bp['response']}, L {bp['layers']}): one iteration {it:.3f} s = {shares}"
                  + (f"; the reference log-probs precomputed before the loop add {bp['median']['reference per batch']:.3f} s "
                     "per batch of pairs" if "reference per batch" in bp["median"] else "") + ".", ""]
        cols = list(bp["median"])
        lines += ["| point | parameters (M) | " + " | ".join(cols) + " | train GFLOP | train GFLOP/s | of peak | load |",
                  "|---" * (len(cols) + 6) + "|"]
        for p in a["points"]:
            lines.append(f"| B {p['batch']}, R {p['response']}, L {p['layers']} | {p['parameters'] / 1e6:.3g} | "
                         + " | ".join(_f(p["median"][c]) for c in cols)
                         + f" | {p['flops']['train'] / 1e9:.3g} | {_f(p.get('train_gflops_per_second'), 1)} | "
                         f"{_f(100 * p['fraction_of_peak'], 1) + '%' if 'fraction_of_peak' in p else '-'} | "
                         f"{p['load_average']} |")
        lines += ["", "Fitted lines, time = a + b x (least squares over the series' points; a, the time at x = 0, "
                  "also as a fraction of the base point's time of the same column). The model-size series varies "
                  "the layers only: its x = 0 is below the smallest model, so the last column gives the line at no "
                  f"decoder layers (x = the {r['shape']['vocab_size']} x {r['shape']['hidden']} embedding the head "
                  "shares): what an iteration costs besides the blocks.", "",
                  "| series | x | column | a (s) | a / base | b | R^2 | at no layers (s, / base) |",
                  "|---|---|---|---|---|---|---|---|"]
        for factor, fs in a["series"].items():
            unit = UNITS[factor][algo] if isinstance(UNITS[factor], dict) else UNITS[factor]
            for col, f in fs["fits"].items():
                nl = (f"{_f(f['at_no_layers'])}, {_f(f['at_no_layers_fraction_of_base'], 2)}"
                      if "at_no_layers" in f else "-")
                lines.append(f"| {factor} | {X_NAMES[factor]} = {', '.join(f'{x:.3g}' for x in fs['x'])} | {col} | "
                             f"{_f(f['a'])} | {_f(f['a_fraction_of_base'], 2)} | {f['b']:.4g} {unit} | "
                             f"{_f(f['r2'], 4)} | {nl} |")
        if "train_gflops_per_second" in bp:
            lines += ["", f"**Training step at the base point: {bp['flops']['train'] / 1e9:.3g} GFLOP in "
                      f"{bp['median']['train']:.3f} s = {bp['train_gflops_per_second']:.1f} GFLOP/s, "
                      f"{100 * bp['fraction_of_peak']:.1f}% of the matmul peak.**"]
        lines.append("")
    lines += ["## FLOP count", "",
              "forward = 2 N tokens + 4 L d W tokens + 2 d V head_positions; training = 3 x forward, + 2 d V "
              "head_positions where the backward recomputes the head (chunked log-probs). N = decoder-block "
              "parameters (all but the tied V x d embedding), tokens = rows x W, W = prompt + response cap, L "
              "layers, d width, V vocabulary; the head runs at every position when the (rows, W, V) fp32 logits fit "
              "in rlhf_zoo.ops.logprobs.CHUNK_BYTES, else at the response tokens only. dpo step: 2B rows; ppo train "
              "phase: a critic forward, then epochs x (policy pass + critic pass, head d -> 1) over B rows. The "
              "optimiser's elementwise work is not counted. The block-parameter formula matches the built models: "
              + ", ".join(f"{n} layers {'yes' if x['formula_matches_model'] else 'NO'}" for n, x in r["models"].items())
              + ".", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads); default 1")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 points per series, 1 repetition (a smoke run)")
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    p.add_argument("--reps", type=int, default=None, help="counted iterations per point (default: dpo 3, ppo 2)")
    p.add_argument("--batches", type=int, nargs="+", help="batch series (default 2 4 8 16)")
    p.add_argument("--responses", type=int, nargs="+", help="response-length series (default 16 32 64 128)")
    p.add_argument("--layers", type=int, nargs="+", help="model-size series, decoder layers (default 2 4 8 12)")
    p.add_argument("--ppo-epochs", type=int, default=PPO_EPOCHS, help="ppo epochs per iteration (default 1)")
    p.add_argument("--ppo-minibatches", type=int, default=PPO_MINIBATCHES, help="ppo minibatches per epoch (default 1)")
    p.add_argument("--setup-dir", type=Path, default=None, help="build the models and data here (kept)")
    p.add_argument("--keep-setup", action="store_true", help="keep the temporary setup directory")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/scaling.json; --quick: a temporary file)")
    p.add_argument("--md", type=Path, default=None, help="markdown path (default: --out with .md)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "zoo-scaling-quick.json" if args.quick else RESULTS / "scaling.json"
    if args.md is None:
        args.md = args.out.with_suffix(".md")
    for name in ("batches", "responses", "layers"):
        if getattr(args, name) and len(set(getattr(args, name))) < 2:
            p.error(f"--{name} needs at least two distinct values for a fit")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    r = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1, default=str) + "\n")
    args.md.write_text(markdown(r) + "\n")
    print(f"wrote {args.out} and {args.md} ({r['seconds']:.0f} s)", flush=True)
    return r


if __name__ == "__main__":
    main()
