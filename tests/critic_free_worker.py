"""The rloo / grpo update on a fixed rollout, runnable in one process (the reference) or in every rank of a
job launched by torch's elastic launcher (``tests/test_critic_free.py``):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/critic_free_worker.py OUT_DIR ROLLOUT

Rank 0 writes each algorithm's parameters after the update to OUT_DIR/ALGO.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from distributed_worker import ROLLOUT_FIELDS
from safetensors.torch import load_file, save_file

from rlhf_zoo.distributed import init_from_env
from rlhf_zoo.rollout import Rollout
from rlhf_zoo.runner import make_context
from rlhf_zoo_plugins.critic_free import (
    GRPOConfig,
    grpo_sequence_advantages,
    rloo_sequence_advantages,
    update,
)

# 5 prompts x k = 3: 2 ranks hold 3 and 2 groups, and 2 minibatches split them unevenly between the ranks
OPTIONS = {"iterations": 1, "prompts_per_iteration": 5, "k": 3, "epochs": 2, "minibatches": 2,
           "learning_rate": 1e-2, "eval_prompts": 2, "eval_samples": 1}
CASES = {"rloo": {}, "grpo": {}, "dr_grpo": {"loss_type": "dr_grpo"}}


def update_on_rollout(case: str, out: Path, rollout_path: Path) -> dict[str, torch.Tensor]:
    """Policy parameters after the plugin's advantages and update on a fixed rollout, each rank holding
    its prompt groups of it."""
    algo = "rloo" if case == "rloo" else "grpo"
    ctx = make_context(algo, task="exact", seed=0, out=out / case, device="cpu", options={**OPTIONS, **CASES[case]},
                       progress=False, checkpoint_every=0)
    cfg = ctx.config
    t = load_file(str(rollout_path))
    full = Rollout(*(t[f] for f in ROLLOUT_FIELDS), prompt_index=t["prompt_index"].numpy())
    lo, hi = ctx.dist.bounds(cfg.prompts_per_iteration)
    r = full.select(torch.arange(lo * cfg.k, hi * cfg.k))
    advantages = grpo_sequence_advantages if isinstance(cfg, GRPOConfig) else rloo_sequence_advantages
    adv, _ = advantages(ctx, cfg, r)
    opt = torch.optim.AdamW(ctx.policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    ctx.policy.train()
    update(ctx, cfg, ctx.policy, opt, r, adv)
    return {n: p.detach().clone() for n, p in ctx.policy.named_parameters()}


def main(out: Path, rollout_path: Path) -> None:
    dist = init_from_env("cpu")
    torch.set_num_threads(1)
    results = {case: update_on_rollout(case, out, rollout_path) for case in CASES}
    if dist.is_main:
        for case, tensors in results.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{case}.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
