"""Peak memory of a DPO step and a PPO step with naive and with chunked log-probs (issue 15 item 3).

The model is a small Llama built from config (2 layers, width 256, random weights, nothing downloaded):
the vocabulary decides the size of the (B, L, V) logits, not the depth. Two vocabularies, 32k and 150k.

    DPO step   8 pairs (16 rows: chosen and rejected in one forward), prompts of 48-64 tokens left-padded
               to 64, responses of 40-64 tokens right-padded to 64: `rlhf_zoo_plugins.dpo.pair_logprobs` and
               `dpo_loss` (sigmoid, beta 0.1) on fixed reference log-probs, then backward.
    PPO step   16 rollouts of the same shapes: `response_logprobs` at temperature 0.7, the clipped surrogate
               (`rlhf_zoo.ops.policy_losses.clipped_policy_loss`, clip 0.2) on fixed old log-probs and
               advantages, then backward (the policy part of ppo's minibatch step; the critic is separate).

Each measurement runs in a fresh process (``--child``). On CPU the figure is the step's peak resident set
above the process's resident set just before it: a warm-up step on one row (libraries loaded lazily), the
gradients dropped, ``malloc_trim(0)`` (freed heap back to the system), then the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs`` 5) and VmHWM read after the step. It counts every byte the
step touches: logits, activations, the parameters' gradients (the same in both modes). On CUDA (when
available) the figure is ``torch.cuda.max_memory_allocated`` above the allocation before the step, under
bf16 autocast as the zoo trains there. Parity (loss and every parameter's gradient, naive vs chunked)
is checked in another fresh process per vocabulary.

    python benchmarks/logprob_memory.py --out benchmarks/results/logprob_memory.json \\
        --md benchmarks/results/logprob_memory.md

Runs its processes one after the other; memory figures only (no timing).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SHAPE = {"hidden": 256, "layers": 2, "intermediate": 512, "heads": 4}
VOCABS = (32_000, 150_000)
PAIRS, PPO_ROWS, PROMPT, RESPONSE = 8, 16, 64, 64
SUPPRESS = (0, 1)  # pad and bos, as a task suppresses them
PPO_TEMPERATURE = 0.7
MODES = ("naive", "chunked")
STEPS = ("dpo", "ppo")


# --- the work -------------------------------------------------------------------------------------------
def build_model(vocab: int, device: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                         num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["heads"], max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(device).train()


def rows(n: int, vocab: int, seed: int, device: str):
    """n left-padded prompts (48-64 tokens, width 64), n right-padded responses (40-64 tokens, width 64)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(48, PROMPT + 1, (n,), generator=g)
    r_len = torch.randint(40, RESPONSE + 1, (n,), generator=g)
    p_mask = (torch.arange(PROMPT) >= PROMPT - p_len[:, None]).long()
    r_mask = (torch.arange(RESPONSE) < r_len[:, None]).long()
    p_ids = torch.randint(3, vocab, (n, PROMPT), generator=g) * p_mask
    r_ids = torch.randint(3, vocab, (n, RESPONSE), generator=g) * r_mask
    p_ids[torch.arange(n), PROMPT - p_len] = 1  # bos
    return [t.to(device) for t in (p_ids, p_mask, r_ids, r_mask)]


def make_step(step: str, vocab: int, n: int, device: str):
    """A closure running one step's forward and backward on n pairs (DPO) or n rows (PPO); -> the loss."""
    import torch

    if step == "dpo":
        from rlhf_zoo_plugins.dpo import Pairs, dpo_loss, pair_logprobs

        p_ids, p_mask, c_ids, c_mask = rows(n, vocab, 0, device)
        _, _, x_ids, x_mask = rows(n, vocab, 1, device)
        pairs = Pairs(p_ids, p_mask, c_ids, c_mask, x_ids, x_mask)
        g = torch.Generator().manual_seed(2)
        ref_c = (-11.0 * c_mask.sum(-1) + torch.randn(n, generator=g).to(device)).float()
        ref_x = (-11.0 * x_mask.sum(-1) + torch.randn(n, generator=g).to(device)).float()

        def run(model):
            chosen, rejected, _ = pair_logprobs(model, pairs, torch.arange(n, device=device), SUPPRESS)
            loss, _, _ = dpo_loss(chosen, rejected, ref_c, ref_x, beta=0.1)
            loss.backward()
            return loss.detach()

        return run
    from rlhf_zoo.ops import response_logprobs
    from rlhf_zoo.ops.policy_losses import clipped_policy_loss

    p_ids, p_mask, r_ids, r_mask = rows(n, vocab, 3, device)
    g = torch.Generator().manual_seed(4)
    old = (-11.0 + torch.randn(n, RESPONSE, generator=g)).to(device) * r_mask
    adv = torch.randn(n, RESPONSE, generator=g).to(device) * r_mask

    def run(model):
        lp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, PPO_TEMPERATURE, SUPPRESS)
        loss = clipped_policy_loss(lp, old, adv, r_mask, 0.2, normalizer=r_mask.sum().float()).loss
        loss.backward()
        return loss.detach()

    return run


# --- measuring (in the child) ---------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline may then include freed heap, which only lowers the figure
        pass


def measure(step: str, vocab: int, mode: str, device: str) -> dict:
    import torch

    from rlhf_zoo.ops.logprobs import logprob_strategy

    torch.set_num_threads(1)
    model = build_model(vocab, device)
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    n = PAIRS if step == "dpo" else PPO_ROWS
    warm, run = make_step(step, vocab, 1, device), make_step(step, vocab, n, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else _null()
    with logprob_strategy(mode), autocast:
        warm(model)  # loads what the step loads lazily
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = run(model)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            step_mb, base_mb = (peak - before) / 2**20, before / 2**20
        else:
            _trim()
            before = _status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
            loss = run(model)
            peak = _status_kb("VmHWM")
            step_mb, base_mb = (peak - before) / 1024, before / 1024
    return {"step": step, "vocab": vocab, "mode": mode, "device": device, "step_peak_mb": step_mb,
            "process_before_mb": base_mb, "parameters_mb": params_mb, "loss": float(loss)}


def parity(vocab: int) -> dict:
    """Loss and every gradient of both steps, naive against chunked, in one process."""
    import torch

    from rlhf_zoo.ops.logprobs import logprob_strategy

    torch.set_num_threads(1)
    model = build_model(vocab, "cpu")
    out = {}
    for step in STEPS:
        run = make_step(step, vocab, PAIRS if step == "dpo" else PPO_ROWS, "cpu")
        res = {}
        for mode in MODES:
            model.zero_grad(set_to_none=True)
            with logprob_strategy(mode):
                loss = run(model)
            res[mode] = (float(loss), {k: p.grad.clone() for k, p in model.named_parameters()})
        (ln, gn), (lc, gc_) = res["naive"], res["chunked"]
        worst = max(((gn[k] - gc_[k]).abs().max() / gn[k].abs().max().clamp(min=1e-30)).item() for k in gn)
        abs_diff = max((gn[k] - gc_[k]).abs().max().item() for k in gn)
        close = all(torch.allclose(gc_[k], gn[k], atol=1e-5, rtol=1e-4) for k in gn)
        out[step] = {"loss_naive": ln, "loss_chunked": lc, "loss_abs_diff": abs(ln - lc),
                     "grad_max_abs_diff": abs_diff, "grad_max_diff_over_max_abs": worst,
                     "grads_allclose_atol1e-5_rtol1e-4": close, "parameters": len(gn)}
        del res, gn, gc_
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --- the parent -------------------------------------------------------------------------------------------------
def child(args: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dirty() -> bool | None:
    """Whether the working tree differs from the commit (the figures are then of the commit plus those changes)."""
    try:
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def naive_logits_mb(step: str, vocab: int) -> float:
    """One (B, L, V) fp32 tensor at the step's packed width (about prompt + response: 128)."""
    rows_ = 2 * PAIRS if step == "dpo" else PPO_ROWS
    return rows_ * (PROMPT + RESPONSE) * vocab * 4 / 2**20


def markdown(r: dict) -> str:
    lines = [
        "# Peak memory of a DPO and a PPO step: naive against chunked log-probs",
        "",
        f"Llama from config: {SHAPE['layers']} layers, width {SHAPE['hidden']} (untied head). DPO: {PAIRS} pairs "
        f"({2 * PAIRS} rows); PPO: {PPO_ROWS} rows; prompts 48-64 tokens (width {PROMPT}), responses 40-64 "
        f"(width {RESPONSE}). Figure: {r['method']}",
        "",
        f"Commit {r['git_commit']}" + (" plus uncommitted changes" if r.get("uncommitted_changes") else "")
        + f"; torch {r['versions'].get('torch')}, transformers "
        f"{r['versions'].get('transformers')}; {r['machine'].get('processor')}, {r['machine'].get('cpu_count')} CPUs"
        + (f", {r['machine']['cuda_device']}" if r["machine"].get("cuda_device") else "") + ".",
        "",
        "| device | step | vocab | parameters (MB) | one (B, L, V) fp32 tensor (MB) | naive peak (MB) | chunked peak (MB) "
        "| chunked / naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["table"]:
        lines.append(f"| {row['device']} | {row['step']} | {row['vocab']:,} | {row['parameters_mb']:.0f} | "
                     f"{row['naive_logits_tensor_mb']:.0f} | {row['naive_mb']:.0f} | {row['chunked_mb']:.0f} | "
                     f"{row['ratio']:.3f} |")
    lines += ["", "Parity (CPU, fp32, the same step naive then chunked in one process):", "",
              "| vocab | step | loss naive | loss chunked | abs diff | max grad abs diff | max grad diff / max abs grad "
              "| allclose (atol 1e-5, rtol 1e-4) |", "|---|---|---|---|---|---|---|---|"]
    for vocab, steps in r["parity"].items():
        for step, p in steps.items():
            lines.append(f"| {int(vocab):,} | {step} | {p['loss_naive']:.7f} | {p['loss_chunked']:.7f} | "
                         f"{p['loss_abs_diff']:.1e} | {p['grad_max_abs_diff']:.1e} | "
                         f"{p['grad_max_diff_over_max_abs']:.1e} | {p['grads_allclose_atol1e-5_rtol1e-4']} |")
    a = r["acceptance"]
    lines += ["", f"Acceptance (DPO step at vocabulary 150k, chunked peak <= half the naive one's, identical loss and "
              f"gradients): ratio {a['dpo_150k_ratio']:.3f}, parity {a['dpo_150k_parity']} -> "
              f"**{'met' if a['met'] else 'not met'}**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(parity(spec["vocab"]) if spec.get("parity") else measure(**spec)))
        return

    import torch

    from rlhf_zoo.bench.harness import machine_info
    from rlhf_zoo.runner import _git_commit, versions

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table, raw = [], []
    for device in devices:
        for vocab in args.vocab:
            for step in STEPS:
                got = {mode: child({"step": step, "vocab": vocab, "mode": mode, "device": device}) for mode in MODES}
                raw += got.values()
                row = {"device": device, "step": step, "vocab": vocab, "parameters_mb": got["naive"]["parameters_mb"],
                       "naive_logits_tensor_mb": naive_logits_mb(step, vocab),
                       "naive_mb": got["naive"]["step_peak_mb"], "chunked_mb": got["chunked"]["step_peak_mb"]}
                row["ratio"] = row["chunked_mb"] / row["naive_mb"]
                table.append(row)
                print(json.dumps(row), flush=True)
    par = {str(vocab): child({"parity": True, "vocab": vocab}) for vocab in args.vocab}
    dpo150 = next((r for r in table if r["device"] == "cpu" and r["step"] == "dpo" and r["vocab"] == 150_000), None)
    p150 = par.get("150000", {}).get("dpo", {})
    acceptance = {"dpo_150k_ratio": dpo150["ratio"] if dpo150 else float("nan"),
                  "dpo_150k_parity": bool(p150.get("grads_allclose_atol1e-5_rtol1e-4")) and
                  p150.get("loss_abs_diff", 1.0) < 1e-5}
    acceptance["met"] = bool(dpo150) and acceptance["dpo_150k_ratio"] <= 0.5 and acceptance["dpo_150k_parity"]
    method = ("CPU: the step's peak resident set (VmHWM after resetting it with /proc/self/clear_refs) above the "
              "resident set just before the step, after a one-row warm-up step, dropped gradients and malloc_trim; "
              "a fresh process per figure; it includes the parameters' gradients (the same in both modes). CUDA: "
              "torch.cuda.max_memory_allocated above the allocation before the step, bf16 autocast.")
    result = {"method": method, "shape": SHAPE, "pairs": PAIRS, "ppo_rows": PPO_ROWS, "prompt_width": PROMPT,
              "response_width": RESPONSE, "table": table, "measurements": raw, "parity": par,
              "acceptance": acceptance,
              "machine": {k: v for k, v in machine_info([]).items() if k != "devices"} | {
                  "load_average": os.getloadavg(), "devices": devices},
              "versions": versions(), "git_commit": _git_commit(), "uncommitted_changes": _dirty()}
    md = markdown(result)
    print(md)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        args.md.write_text(md)


if __name__ == "__main__":
    main()
