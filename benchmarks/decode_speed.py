"""Decode speed (issue 15 item 4): the zoo's sampler against transformers' ``generate``, generated tokens per
second, with a dynamic and a static KV cache and with ``torch.compile``.

The model, tokenizer and prompts are the realistic shape of benchmarks/speed_vs_trl.py, built by its
``build_user_setup`` (imported, not copied): a byte-level BPE of 32k tokens, a Qwen2 of 8 layers x 512 (42M
parameters, tied embeddings, random weights, transformers' default attention), prompts of exactly 64 tokens;
responses of 64 tokens. ``--shapes tiny`` (or ``mini``) runs the same builder at a small size. The build
takes about 40 s at the realistic shape: ``--setup-dir DIR`` keeps it (``DIR/SHAPE/``) and reuses it on
the next run (a directory whose model is not the shape's is refused).

Methods, each sampling one response per prompt of a batch (``--batches``), fp32 on ``--device``:

  sample             `rlhf_zoo.generation.sample` with the dynamic cache (the zoo's default)
  sample_static      the same with ``cache="static"`` (`rlhf_zoo.ops.kv_cache.IncrementalDecoder`)
  sample_compiled    the same with ``cache="compiled"`` (static + a torch.compile'd decode step)
  generate           ``model.generate(**inputs, generation_config=...)``: the `GenerationConfig` that
                     `rlhf_zoo.generation.generation_config` gives (do_sample, temperature 1, top_k=0,
                     top_p=1, suppress_tokens) and transformers' default DynamicCache
  generate_static    the same with ``cache_implementation="static"``
  generate_compiled  the same with a `CompileConfig` (mode ``default`` on CPU, transformers' default
                     ``reduce-overhead`` on CUDA) and its ``_compile_all_devices`` flag set, without which
                     ``generate`` compiles on CUDA/XPU only

Every method runs the full ``max_new_tokens`` on every row: EOS is suppressed in both (the zoo's
``suppress_ids`` and ``generate``'s ``suppress_tokens`` both hold the pad and EOS ids; the EOS id is still
given to both, so both still check for it every step), so both draw from the same distribution and
generate the same number of tokens, B x T per call (checked). Work the two sides do differently: the zoo
also records each token's log-prob and a response mask; ``generate`` drops an all-ones attention mask (the
prompts here are all 64 tokens, so nothing is padded), the zoo always passes it; the zoo's dynamic prefill
computes the logits of every prompt position (kept so for bit-identical task builds), its static prefill
and ``generate``'s only the last one's.

Timing: one process, one warm-up round per batch size (not counted; it includes torch.compile's
compilation, reported as ``warmup_seconds``), then ``--reps`` rounds in which every method runs once, the
order rotated each round; wall time (``time.perf_counter``) and the process's CPU time per call. Reported:
median seconds, tokens/s = B x T / median seconds, and each method's ratio to ``generate`` in the same round
(per-pair) as a median with its min-max spread. The first counted round's tokens of the static and
compiled samplers are compared with the dynamic sampler's (same generator seed). The 1-minute load average
at start and end is recorded; above `LOAD_QUIET` the report says, loudly, that it was measured under load.

    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py --threads 1 --setup-dir /tmp/decode-setup \\
        --out benchmarks/results/decode_speed.json          # and decode_speed.md next to it
    python benchmarks/decode_speed.py --quick --out /tmp/decode.json   # tiny shape, 1 rep: runs end to end
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlhf_zoo import accel
from rlhf_zoo.generation import generation_config, sample
from rlhf_zoo.ops.kv_cache import static_cache_supported
from rlhf_zoo.runner import _git_commit, versions

HERE = Path(__file__).resolve().parent
METHODS = ("sample", "sample_static", "sample_compiled", "generate", "generate_static", "generate_compiled")
ZOO_CACHE = {"sample": "dynamic", "sample_static": "static", "sample_compiled": "compiled"}
BASELINE = "generate"
DEFAULTS = {"shapes": "realistic", "batches": "8,32", "reps": 5}
QUICK = {"shapes": "tiny", "batches": "4", "reps": 1}


def speed_vs_trl() -> Any:
    """benchmarks/speed_vs_trl.py as a module: its `build_user_setup`, `USER_SHAPES` and `LOAD_QUIET`."""
    spec = importlib.util.spec_from_file_location("speed_vs_trl", HERE / "speed_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- setup ---------------------------------------------------------------------------------------------------
def setup(shape_name: str, setup_dir: Path | None, tmp: Path) -> tuple[dict[str, Any], Path, float | None]:
    """The shape's built policy directory: reused from ``setup_dir/SHAPE`` when it is there, else built.
    -> (shape, policy dir, build seconds or None when reused)"""
    svt = speed_vs_trl()
    shape = svt.USER_SHAPES[shape_name]
    where = (setup_dir or tmp) / shape_name
    policy = where / "policy"
    if (policy / "config.json").exists() and (where / "prompts.jsonl").exists():
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(policy)
        built = (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size)
        want = (shape["vocab_size"], shape["layers"], shape["hidden"])
        if built != want:
            raise SystemExit(f"--setup-dir {where} holds a model of (vocab, layers, hidden) {built}, "
                             f"not the {shape_name} shape's {want}: give another directory")
        return shape, where, None
    print(f"[decode_speed] building the {shape_name} shape in {where}", file=sys.stderr, flush=True)
    return shape, where, svt.build_user_setup(where, shape)["seconds"]


def load(where: Path, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(where / "policy", use_safetensors=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(where / "policy")
    return model, tok


def prompt_batch(where: Path, tok: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch`` prompts of the setup's prompts.jsonl (repeated if there are fewer), left-padded."""
    rows = [json.loads(line)["prompt"] for line in (where / "prompts.jsonl").read_text().splitlines() if line.strip()]
    texts = [rows[i % len(rows)] for i in range(batch)]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def suppressed_ids(tok: Any) -> list[int]:
    """What the zoo suppresses on a user setup (bos, unk, pad when it is not EOS), plus EOS: full-length
    responses from the same distribution on both sides."""
    ids = {tok.bos_token_id, tok.unk_token_id, tok.pad_token_id, tok.eos_token_id}
    return sorted(i for i in ids if i is not None)


# --- methods -------------------------------------------------------------------------------------------------
def make_methods(model: Any, tok: Any, ids: torch.Tensor, mask: torch.Tensor, T: int, names: Sequence[str],
                 seed: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each method -> a call returning the (B, T) response ids it sampled (seeded: zoo methods by their own
    generator, generate by the global RNG)."""
    from transformers import CompileConfig

    suppress = suppressed_ids(tok)
    world = SimpleNamespace(suppress_ids=suppress, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            tokenizer=SimpleNamespace(bos_token_id=tok.bos_token_id))
    base = generation_config(world, 1.0, T)

    def config(**changes: Any) -> Any:
        cfg = copy.deepcopy(base)
        for k, v in changes.items():
            setattr(cfg, k, v)
        return cfg

    compile_config = CompileConfig(mode="default") if ids.device.type != "cuda" else CompileConfig()
    compile_config._compile_all_devices = True  # generate compiles on CUDA/XPU only without it
    configs = {"generate": config(), "generate_static": config(cache_implementation="static"),
               "generate_compiled": config(cache_implementation="static", compile_config=compile_config)}

    def zoo(cache: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            s = sample(model, ids, mask, T, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       suppress_ids=suppress, generator=torch.Generator(device=ids.device).manual_seed(seed), cache=cache)
            return s.response_ids
        return run

    def hf(cfg: Any) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            return out[:, ids.shape[1]:]
        return run

    return {n: zoo(ZOO_CACHE[n]) if n in ZOO_CACHE else hf(configs[n]) for n in names}


def time_batch(methods: dict[str, Callable[[], torch.Tensor]], reps: int, device: torch.device, B: int, T: int,
               pad_id: int) -> dict[str, Any]:
    """One warm-up round, then ``reps`` rounds (order rotated each round); every call checked to generate
    B x T tokens."""
    names = list(methods)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    warm: dict[str, float] = {}
    first: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for rnd in range(reps + 1):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for n in order:
            if n in errors:
                continue
            accel.synchronize(device)
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                out = methods[n]()
            except Exception as e:  # an optional path (a compile) may not work on this machine
                if n in ("sample", BASELINE):
                    raise
                errors[n] = f"{type(e).__name__}: {e}"
                continue
            accel.synchronize(device)
            w, c = time.perf_counter() - w0, time.process_time() - c0
            generated = int((out != pad_id).sum())
            if out.shape != (B, T) or generated != B * T:
                raise RuntimeError(f"{n} generated {generated} tokens in a {tuple(out.shape)} tensor, not {B} x {T}")
            if rnd == 0:
                warm[n] = w
            else:
                wall[n].append(w)
                cpu[n].append(c)
                first.setdefault(n, out.cpu())
    res: dict[str, Any] = {"batch": B, "max_new_tokens": T, "tokens_per_call": B * T, "reps": reps,
                           "methods": {}, "errors": errors}
    base = wall.get(BASELINE)
    for n in names:
        if n in errors:
            continue
        med = statistics.median(wall[n])
        r: dict[str, Any] = {"median_seconds": med, "tokens_per_second": B * T / med,
                             "median_cpu_seconds": statistics.median(cpu[n]), "seconds": wall[n],
                             "cpu_seconds": cpu[n], "warmup_seconds": warm[n]}
        if base:
            per_pair = [a / b for a, b in zip(wall[n], base, strict=True)]  # seconds vs generate's, same round
            r["time_ratio_vs_generate"] = {"median": statistics.median(per_pair), "min": min(per_pair),
                                           "max": max(per_pair), "per_round": per_pair}
            r["speedup_vs_generate"] = 1.0 / r["time_ratio_vs_generate"]["median"]
        if n in ZOO_CACHE and n != "sample" and "sample" in first:
            r["tokens_identical_to_sample"] = bool(torch.equal(first[n], first["sample"]))
        res["methods"][n] = r
    return res


# --- report ------------------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Decode speed: the zoo's sampler vs `generate`", "",
        f"`{' '.join(res['argv'])}`, commit `{res['git_commit']}`, torch {res['versions'].get('torch')}, "
        f"transformers {res['versions'].get('transformers')}, Python {res['versions'].get('python')}.", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {res['threads']} torch thread(s), device `{res['device']}`. "
        f"Load average (1, 5, 15 min) at start {res['load_average']['start']}, at end {res['load_average']['end']}.",
        "",
    ]
    if res["under_load"]:
        lines += [f"**MEASURED UNDER LOAD: the 1-minute load average exceeded {res['load_quiet']} on this machine; "
                  "other processes stretched these timings. Rerun on a quiet machine before drawing conclusions.**", ""]
    lines += ["Every call generates B x T tokens (EOS suppressed on both sides, see the script's docstring); "
              "tokens/s = B x T / median seconds; `x generate` = generate's seconds / the method's, median of "
              "the per-round ratios, with their min-max; warm-up = the uncounted first call (compilation "
              "included).", ""]
    for s in res["shapes"]:
        sh = s["shape"]
        lines += [f"## {s['name']}: {s['parameters'] / 1e6:.1f}M parameters ({sh['layers']} layers x {sh['hidden']}, "
                  f"vocab {s['vocab_size']}, attention `{s['attn_implementation']}`), prompts {sh['prompt_tokens']} "
                  f"tokens, {s['max_new_tokens']} new tokens", ""]
        if s.get("zoo_static_supported") is False:
            lines += ["The model does not support a static cache: the zoo's static methods ran the dynamic cache.", ""]
        for b in s["batches"]:
            lines += [f"Batch {b['batch']}, {b['reps']} counted rounds:", "",
                      "| method | tokens/s | median s | CPU s | x generate (min-max) | warm-up s | tokens = sample's |",
                      "|---|---|---|---|---|---|---|"]
            for n, r in b["methods"].items():
                tr = r.get("time_ratio_vs_generate")
                ratio = (f"{1 / tr['median']:.2f} ({1 / tr['max']:.2f}-{1 / tr['min']:.2f})" if tr else "-")
                same = r.get("tokens_identical_to_sample")
                lines.append(f"| {n} | {r['tokens_per_second']:.4g} | {r['median_seconds']:.4g} | "
                             f"{r['median_cpu_seconds']:.4g} | {ratio} | {r['warmup_seconds']:.3g} | "
                             f"{'-' if same is None else ('yes' if same else 'NO')} |")
            for n, err in b["errors"].items():
                lines.append(f"\n`{n}` failed: {err}")
            lines.append("")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help=f"comma-separated: realistic, tiny, mini (default {DEFAULTS['shapes']})")
    ap.add_argument("--batches", default=None, help=f"comma-separated batch sizes (default {DEFAULTS['batches']})")
    ap.add_argument("--reps", type=int, default=None, help=f"counted rounds after one warm-up (default {DEFAULTS['reps']})")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: the shape's response length")
    ap.add_argument("--setup-dir", type=Path, default=None, help="keep / reuse the built shapes here (DIR/SHAPE/)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shape, batch 4, 1 round: checks it runs end to end")
    ap.add_argument("--out", type=Path, default=None, help="results JSON; the report goes next to it as .md")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    args.shapes = args.shapes or preset["shapes"]
    args.batches = [int(b) for b in (args.batches or preset["batches"]).split(",") if b.strip()]
    args.reps = args.reps if args.reps is not None else preset["reps"]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        ap.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if BASELINE not in args.methods:
        args.methods.append(BASELINE)  # the ratios are per round against it
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import tempfile

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    svt = speed_vs_trl()
    load_start = load_average()
    shapes = []
    with tempfile.TemporaryDirectory(prefix="decode-speed-") as tmp:
        for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            if name not in svt.USER_SHAPES:
                raise SystemExit(f"--shapes: unknown {name!r}; known: {', '.join(svt.USER_SHAPES)}")
            shape, where, build_s = setup(name, args.setup_dir, Path(tmp))
            model, tok = load(where, device)
            T = args.max_new_tokens or shape["response_tokens"]
            entry: dict[str, Any] = {
                "name": name, "shape": shape, "setup_dir": str(where), "build_seconds": build_s,
                "parameters": accel.count_params(model), "vocab_size": model.config.vocab_size,
                "attn_implementation": model.config._attn_implementation, "max_new_tokens": T,
                "zoo_static_supported": static_cache_supported(model), "batches": []}
            for B in args.batches:
                ids, mask = prompt_batch(where, tok, B, device)
                print(f"[decode_speed] {name} batch {B}: {', '.join(args.methods)}; load {load_average()}",
                      file=sys.stderr, flush=True)
                methods = make_methods(model, tok, ids, mask, T, args.methods, args.seed)
                with torch.no_grad():
                    r = time_batch(methods, args.reps, device, B, T, tok.pad_token_id)
                r["prompt_tokens"] = ids.shape[1]
                r["load_average"] = load_average()
                entry["batches"].append(r)
            shapes.append(entry)
            del model
    load_end = load_average()
    peak_load = max((x[0] for x in [load_start, load_end, *(b["load_average"] for s in shapes for b in s["batches"])]
                     if x), default=0.0)
    res = {
        "argv": ["benchmarks/decode_speed.py", *(sys.argv[1:] if argv is None else argv)],
        "git_commit": _git_commit(), "versions": versions(), "device": str(device), "threads": torch.get_num_threads(),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "device_name": accel.device_name(device)},
        "load_average": {"start": load_start, "end": load_end}, "load_quiet": svt.LOAD_QUIET,
        "under_load": peak_load > svt.LOAD_QUIET, "methods": args.methods, "shapes": shapes,
    }
    md = markdown(res)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(md)
    return res


if __name__ == "__main__":
    main()
