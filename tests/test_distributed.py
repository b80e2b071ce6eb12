"""Data parallelism: 2 ranks (gloo, CPU) take the same step as 1 rank with the whole batch, for ``dpo``
and ``ppo``; gradient accumulation 1 x 8 equals 8 x 1; ``zoo run --nproc 2`` records world_size 2.

The ranks run `tests/distributed_worker.py` under torch's elastic launcher; the single-rank references
run the same functions in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as w
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhf_zoo.distributed import SINGLE, Dist
from rlhf_zoo.rollout import collect, draw_prompts

HERE = Path(__file__).resolve().parent
# same math, different summation order: gradients agree to float32 rounding; parameters after Adam steps
# of ~1e-2 agree to 1e-5 (Adam divides by the gradient's own scale, which magnifies rounding on tiny ones)
GRAD_ATOL, PARAM_ATOL = 1e-6, 1e-5


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, atol: float = PARAM_ATOL) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"{what}: largest difference {worst:.3g}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every case on 2 ranks once; returns (results dir, rollout path)."""
    out = tmp_path_factory.mktemp("dp")
    ctx = w._ctx("ppo", out / "rollout-ctx", w.PPO)
    r = collect(ctx, ctx.make_env(8), ctx.policy, draw_prompts(np.random.default_rng(5), len(ctx.task.prompts("train")), 8))
    w.save_rollout(r, out / "rollout.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "distributed_worker.py"), str(out), str(out / "rollout.safetensors")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_shards_cover_the_batch_exactly_once():
    for n in (0, 1, 7, 8, 9):
        for world in (1, 2, 3):
            parts = [Dist(r, world).shard(torch.arange(n)) for r in range(world)]
            assert torch.equal(torch.cat(parts), torch.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            rows = torch.tensor([5, 0, 8, 3, 1]) % max(n, 1)
            owned = [Dist(r, world).owned(rows, n) + Dist(r, world).bounds(n)[0] for r in range(world)]
            assert sorted(torch.cat(owned).tolist()) == sorted(rows.tolist()) if n else True


def test_dpo_two_ranks_give_the_whole_batch_gradient(two_ranks, tmp_path):
    _close(load_file(str(two_ranks / "dpo_gradients.safetensors")), w.dpo_gradients(tmp_path), "DPO gradients",
           GRAD_ATOL)


def test_dpo_two_ranks_take_the_whole_batch_step(two_ranks, tmp_path):
    single = w.dpo_step(tmp_path, 0)
    _close(load_file(str(two_ranks / "dpo_step.safetensors")), single, "DPO step, 2 ranks")
    _close(load_file(str(two_ranks / "dpo_step_micro1.safetensors")), single, "DPO step, 2 ranks x 3-4 micro-batches")


def test_gradient_accumulation_1x8_equals_8x1(tmp_path):
    one = w.dpo_step(tmp_path, 8)  # the batch of 7 in one micro-batch
    many = w.dpo_step(tmp_path, 1)  # 7 micro-batches of 1
    _close(one, many, "DPO step, 1 x 7 vs 7 x 1")
    start = w._ctx("dpo", tmp_path / "start", w.DPO).policy
    moved = max((one[n] - p).abs().max().item() for n, p in start.named_parameters())
    assert moved > 1e-4  # the step did something


def test_ppo_two_ranks_take_the_whole_batch_steps(two_ranks, tmp_path):
    single = w.ppo_update(tmp_path, two_ranks / "rollout.safetensors")
    _close(load_file(str(two_ranks / "ppo_update.safetensors")), single, "PPO update (2 minibatches x 2 epochs)")


def test_a_two_rank_run_resumed_from_a_checkpoint_is_the_uninterrupted_run(two_ranks):
    """Each rank's sampling stream and token counts are in the checkpoint, so a multi-process resume is
    exact too."""
    weights = load_file(str(two_ranks / "ppo_resume.safetensors"))
    full = {k[5:]: v for k, v in weights.items() if k.startswith("full.")}
    resumed = {k[8:]: v for k, v in weights.items() if k.startswith("resumed.")}
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    a, b = json.loads((two_ranks / "ppo_resume.json").read_text())
    for key in ("gold_reward", "kl_to_ref", "kl_to_optimum", "generated_tokens", "trained_tokens"):
        assert a[key] == b[key], key
    assert a["generated_tokens"] > 0 and a["trained_tokens"] > 0


def test_single_process_is_not_distributed():
    from rlhf_zoo.distributed import current

    assert current() == SINGLE and not SINGLE.active


@pytest.mark.parametrize("algo", ["dpo", "ppo"])
def test_zoo_run_nproc_2_records_world_size(tmp_path, algo):
    opts = ["--steps", "3", "--batch-size", "16"] if algo == "dpo" else ["--iterations", "2", "--batch-prompts", "8"]
    proc = subprocess.run([sys.executable, "-m", "rlhf_zoo", "run", algo, "--task", "exact", "--preset", "smoke",
                           *opts, "--nproc", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["world_size"] == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trained_tokens"] > 0 and np.isfinite(summary["gold_reward"])
    assert proc.stdout.count("run directory:") == 1  # only rank 0 reports


def test_algorithms_that_do_not_shard_refuse_nproc(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_zoo", "run", "rrhf", "--task", "exact", "--preset", "smoke",
                           "--nproc", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "zoo: error: algorithm 'rrhf' does not shard its batches over processes" in proc.stderr
