"""The computations the data-parallel equivalence tests compare, runnable in one process (the reference)
or in every rank of a job launched by torch's elastic launcher (``tests/test_distributed.py``):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR ROLLOUT

Rank 0 writes each case's result to OUT_DIR/CASE.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_zoo.distributed import all_reduce_gradients, init_from_env
from rlhf_zoo.ops import per_token_rewards
from rlhf_zoo.rollout import Rollout
from rlhf_zoo.runner import make_context
from rlhf_zoo_plugins.dpo import dpo_loss, encode_pairs, load_pairs, pair_logprobs, reference_logprobs

# 7 pairs: 2 ranks hold 4 and 3, so averaging per-rank means would differ from the whole-batch mean
DPO = {"steps": 1, "batch_size": 7, "max_pairs": 7, "warmup_steps": 0, "learning_rate": 1e-2, "rpo_alpha": 0.5}
PPO = {"iterations": 1, "batch_prompts": 8, "minibatches": 2, "epochs": 2, "eval_prompts": 2, "eval_samples": 1}
ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "ref_logprobs",
                  "rewards", "scores")


def _ctx(algo: str, out: Path, options: dict):
    return make_context(algo, task="exact", seed=0, out=out, device="cpu", options=options, progress=False,
                        checkpoint_every=0)


def dpo_gradients(out: Path) -> dict[str, torch.Tensor]:
    """The gradient of one DPO (+ RPO) batch: this rank's shard, averaged over the ranks."""
    ctx = _ctx("dpo", out / "dpo-grad", DPO)
    cfg, task = ctx.config, ctx.task
    pairs, _ = encode_pairs(task, load_pairs(task, cfg), ctx.max_new_tokens, ctx.device)
    ref_c, ref_r = reference_logprobs(ctx.reference, pairs, task.suppress_ids)
    idx = torch.arange(len(pairs))
    local = ctx.dist.shard(idx)
    chosen, rejected, _ = pair_logprobs(ctx.policy, pairs, local, task.suppress_ids)
    losses, _, _ = dpo_loss(chosen, rejected, ref_c[local], ref_r[local], ctx.beta, reduction="none")
    loss = ctx.dist.mean_loss(losses.sum(), len(idx))
    loss = loss + cfg.rpo_alpha * ctx.dist.mean_loss(-chosen.sum(), pairs.chosen_mask[idx].sum())
    loss.backward()
    params = list(ctx.policy.parameters())
    all_reduce_gradients(params)
    return {n: p.grad.clone() for n, p in ctx.policy.named_parameters()}


def dpo_step(out: Path, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """Parameters after one step of the ``dpo`` plugin (sharded over the ranks, in micro-batches)."""
    ctx = _ctx("dpo", out / f"dpo-step-{micro_batch_size}", {**DPO, "micro_batch_size": micro_batch_size})
    result = ctx.algorithm.train(ctx, ctx.config)
    return {n: p.detach().clone() for n, p in result.model.named_parameters()}


def save_rollout(r: Rollout, path: Path) -> None:
    save_file({f: getattr(r, f).contiguous() for f in ROLLOUT_FIELDS}
              | {"prompt_index": torch.from_numpy(r.prompt_index.astype(np.int64))}, str(path))


def ppo_update(out: Path, rollout_path: Path) -> dict[str, torch.Tensor]:
    """Policy and critic parameters after the ppo plugin's update on a fixed rollout, each rank holding
    its rows of it."""
    from rlhf_zoo.models import load_reward_model
    from rlhf_zoo_plugins.ppo import update

    ctx = _ctx("ppo", out / "ppo", PPO)
    cfg, task = ctx.config, ctx.task
    t = load_file(str(rollout_path))
    full = Rollout(*(t[f] for f in ROLLOUT_FIELDS), prompt_index=t["prompt_index"].numpy())
    lo, hi = ctx.dist.bounds(len(full.scores))
    r = full.select(torch.arange(lo, hi))
    rewards = per_token_rewards(r.logprobs, r.ref_logprobs, r.scores, r.response_mask, ctx.beta)
    critic = load_reward_model(task.path / task.reward_models[0], ctx.device).train()
    opt = torch.optim.AdamW(ctx.policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate, weight_decay=0.0)
    ctx.policy.train()
    update(ctx, cfg, ctx.policy, critic, opt, critic_opt, r, rewards, None, len(full.scores))
    return {**{f"policy.{n}": p.detach().clone() for n, p in ctx.policy.named_parameters()},
            **{f"critic.{n}": p.detach().clone() for n, p in critic.named_parameters()}}


def ppo_resume(out: Path) -> dict[str, torch.Tensor]:
    """A 2-rank ppo run, and the same run resumed from its first checkpoint (as after a crash right after
    it): final policies of both, and their summaries in OUT/ppo_resume.json (rank 0)."""
    import json
    import shutil

    from rlhf_zoo.distributed import current
    from rlhf_zoo.runner import run

    full, resumed = out / "resume-full", out / "resume-resumed"
    opts = {**PPO, "iterations": 3}
    kwargs = dict(task="exact", seed=0, device="cpu", options=opts, progress=False, checkpoint_every=1,
                  keep_checkpoints=10)
    summaries = [run("ppo", out=full, **kwargs)]
    d = current()
    if d.is_main:
        (resumed / "checkpoints").mkdir(parents=True)
        for name in ("config.json", "metrics.jsonl"):
            shutil.copy(full / name, resumed / name)
        shutil.copytree(full / "checkpoints" / "iter-000001", resumed / "checkpoints" / "iter-000001")
    d.barrier()
    summaries.append(run("ppo", out=resumed, resume=True, **kwargs))
    if not d.is_main:
        return {}
    (out / "ppo_resume.json").write_text(json.dumps(summaries))
    return {f"{tag}.{k}": v for tag, path in (("full", full), ("resumed", resumed))
            for k, v in load_file(str(path / "policy" / "model.safetensors")).items()}


def main(out: Path, rollout_path: Path) -> None:
    dist = init_from_env("cpu")
    torch.set_num_threads(1)
    results = {"dpo_gradients": dpo_gradients(out), "dpo_step": dpo_step(out, 0),
               "dpo_step_micro1": dpo_step(out, 1), "ppo_update": ppo_update(out, rollout_path),
               "ppo_resume": ppo_resume(out)}
    if dist.is_main:
        for name, tensors in results.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
