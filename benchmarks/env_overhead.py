"""Env overhead: a batched rollout through the vector environments vs plain `generate` + RM scoring.

Side by side in one process, on the same prompts, model, reward model and batch:

  plain      transformers `model.generate` (sampling, KV cache) + one reward-model forward
  response   our sampler + `ResponseGen` vector env `step_tensors` (one reference forward, one RM forward,
             per-token KL-shaped rewards)
  token      our sampler driving the `TokenGen` vector env one `step` per token (incremental reference
             log-probs with a KV cache, RM forward at the end)

The environments do strictly more work than `plain` (reference log-probs and rewards); the ratio says
what that costs. Methods are interleaved (A B C A B C ...) and medians reported.

    python benchmarks/env_overhead.py --task sentiment --batch 64 --reps 9 --out benchmarks/results/env_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import gymnasium
import torch

import rlhf_zoo  # noqa: F401  (registers the environment ids)
from rlhf_zoo.generation import sample
from rlhf_zoo.models import reward_scores
from rlhf_zoo.registry import get_registry
from rlhf_zoo.runner import versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = get_registry().task(args.task).load(progress=True)
    policy = task.load_policy()
    rm = task.load_reward_model(task.reward_models[0])
    T = task.max_new_tokens
    idx = list(range(args.batch))
    prompts = [task.prompts("train")[i] for i in idx]
    p_ids, p_mask = task.encode_prompts(prompts)
    renv = gymnasium.make_vec("rlhf_zoo/ResponseGen-v0", num_envs=args.batch, task=task, reward="proxy")
    tenv = gymnasium.make_vec("rlhf_zoo/TokenGen-v0", num_envs=args.batch, task=task, reward="proxy")
    gen = torch.Generator().manual_seed(0)
    tokens = {"n": 0}

    @torch.no_grad()
    def plain() -> None:
        out = policy.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True, max_new_tokens=T,
                              top_k=None, top_p=None, temperature=1.0, eos_token_id=task.eos_token_id,
                              pad_token_id=task.pad_token_id, suppress_tokens=task.suppress_ids)
        resp = out[:, p_ids.shape[1]:]
        is_eos = (resp == task.eos_token_id).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # (B, T') positions after the first EOS
        mask = torch.cat([p_mask, (~after_eos).long()], 1)
        reward_scores(rm, out, mask)
        tokens["n"] += int((~after_eos).sum())

    def response() -> None:
        renv.reset(options={"prompt_indices": idx})
        s = sample(policy, renv.prompt_ids, renv.prompt_mask, T, eos_token_id=task.eos_token_id,
                   pad_token_id=task.pad_token_id, suppress_ids=task.suppress_ids, generator=gen)
        renv.step_tensors(s.response_ids, s.response_mask, s.logprobs)

    def token() -> None:
        tenv.reset(options={"prompt_indices": idx})
        sample(policy, p_ids, p_mask, T, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
               suppress_ids=task.suppress_ids, generator=gen,
               on_token=lambda tok, lp: tenv.step({"token": tok, "logprob": lp}))

    methods = {"plain": plain, "response": response, "token": token}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "task": args.task, "batch": args.batch, "max_new_tokens": T, "reps": args.reps,
        "threads": torch.get_num_threads(), "median_seconds": med,
        "ratio_response_vs_plain": med["response"] / med["plain"],
        "ratio_token_vs_plain": med["token"] / med["plain"],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "versions": versions(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
