"""What LoRA saves on a model as large as the machine fits: trainable parameters, peak memory, time.

Builds a Llama-architecture causal LM from config (random weights, nothing downloaded) with a BPE
tokenizer and conversational preference pairs (`rlhf_zoo.fixtures`), then runs the same DPO job
(``--preset smoke``: 2 steps of 8 pairs, evaluation on 2 prompts) twice, each in a fresh process:
full fine-tuning, and LoRA (``--lora-r 16`` on every linear layer). Full fine-tuning holds the policy,
its gradients and two AdamW moments (16 bytes per parameter in fp32) plus a separate reference copy;
LoRA holds one copy of the base weights (the reference is the base with the adapter disabled) and
trains only the adapter.

    python benchmarks/lora_savings.py --out benchmarks/results/lora_savings.json --md benchmarks/results/lora_savings.md

Peak memory is the process's peak resident set (CPU) or torch's peak allocation (CUDA), as summary.json
reports it. The two runs go one after the other, never beside another job.
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

SIZES = {  # name -> Llama shape (hidden, layers, intermediate, heads, vocab)
    "tiny": (64, 2, 128, 4, 1000),
    "0.5B": (1536, 16, 4096, 12, 32000),
}


def build(model_dir: Path, data_dir: Path, size: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_zoo.fixtures import LLAMA_CHAT_TEMPLATE, bpe_tokenizer, corpus, write_datasets

    hidden, layers, inter, heads, vocab = SIZES[size]
    tok = bpe_tokenizer(corpus(2000), vocab_size=400, special={"bos": "<s>", "eos": "</s>"}, add_bos=True,
                        chat_template=LLAMA_CHAT_TEMPLATE)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    write_datasets(data_dir, n=32)
    return n_params


def run(model_dir: Path, data_dir: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlhf_zoo", "run", "dpo", "--model", str(model_dir), "--dataset",
           str(data_dir / "conv.jsonl"), "--preset", "smoke", "--max-new-tokens", "16", "--quiet", "--out", str(out),
           *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"command": " ".join(["zoo", *cmd[3:]]), "process_seconds": round(time.perf_counter() - start, 1),
            "train_seconds": summary["train_seconds"], "peak_memory_mb": summary["peak_memory_mb"],
            "trainable_parameters": summary["trainable_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5B")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    from rlhf_zoo.bench.harness import machine_info
    from rlhf_zoo.runner import _git_commit, versions

    with tempfile.TemporaryDirectory(prefix="zoo-lora-") as tmp:
        tmp = Path(tmp)
        n_params = build(tmp / "model", tmp / "data", args.size)
        full = run(tmp / "model", tmp / "data", tmp / "full", [])
        lora = run(tmp / "model", tmp / "data", tmp / "lora", ["--lora-r", str(args.lora_r)])
    result = {"model": {"architecture": "LlamaForCausalLM", "size": args.size, "parameters": n_params,
                        "shape": dict(zip(("hidden", "layers", "intermediate", "heads", "vocab"), SIZES[args.size],
                                          strict=True))},
              "job": "dpo --preset smoke (2 steps x 8 pairs, chosen and rejected in one forward) + evaluation",
              "full": full, "lora": {**lora, "r": args.lora_r, "target_modules": "all-linear"},
              "ratios": {"trainable_parameters": lora["trainable_parameters"] / full["trainable_parameters"],
                         "peak_memory": lora["peak_memory_mb"] / full["peak_memory_mb"],
                         "train_seconds": lora["train_seconds"] / full["train_seconds"]},
              "machine": {k: v for k, v in machine_info([]).items() if k != "load_average"} | {
                  "load_average": os.getloadavg()},
              "versions": versions(), "git_commit": _git_commit()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.md:
        r = result
        args.md.write_text(
            f"# LoRA against full fine-tuning, {r['model']['size']} Llama ({r['model']['parameters'] / 1e6:.0f}M "
            f"parameters)\n\n{r['job']}; commit {r['git_commit']}, {r['versions'].get('torch')} torch, "
            f"{r['versions'].get('transformers')} transformers, peft r={args.lora_r} on every linear layer.\n\n"
            "| | trainable parameters | peak memory (MB) | train seconds |\n|---|---|---|---|\n"
            f"| full | {full['trainable_parameters']:,} | {full['peak_memory_mb']:.0f} | {full['train_seconds']:.1f} |\n"
            f"| LoRA | {lora['trainable_parameters']:,} | {lora['peak_memory_mb']:.0f} | {lora['train_seconds']:.1f} |\n"
            f"| LoRA / full | {r['ratios']['trainable_parameters']:.4f} | {r['ratios']['peak_memory']:.2f} | "
            f"{r['ratios']['train_seconds']:.2f} |\n")


if __name__ == "__main__":
    main()
