"""The GPU path on CPU: roofline formulas (hand-computed), autocast and fp32 log-probs, the decode meter,
and benchmarks/gpu_bench.py end to end with a tiny model (the acceptance test of issue 6)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_zoo import accel
from rlhf_zoo.generation import sample
from rlhf_zoo.models import new_causal_lm, tiny_llama_config
from rlhf_zoo.ops.logprobs import sequence_logprobs

PAD, BOS, EOS = 0, 1, 2
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = tiny_llama_config(32, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, hidden_size=32,
                            num_layers=2, num_heads=4, max_positions=64)
    return new_causal_lm(cfg, seed=0)


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts, width 4."""
    ids = torch.tensor([[PAD, PAD, BOS, 5], [BOS, 6, 7, 8], [PAD, BOS, 9, 10]])
    return ids, (ids != PAD).long()


# --- formulas ------------------------------------------------------------------------------------------------
def test_mfu_hand_computed():
    # 6 * 1e8 params * 1000 tokens = 6e11 FLOPs in 2 s = 3e11 FLOP/s, over a 1e12 peak
    assert accel.mfu(100_000_000, 1000, 2.0, 1e12) == pytest.approx(0.3)
    assert accel.mfu(10, 5, 1.0, 300.0) == pytest.approx(1.0)


def test_kv_cache_bytes_hand_computed():
    # 2 (K, V) * 16 layers * 12 heads * 64 dims * 29 positions * 64 rows * 2 bytes
    assert accel.kv_cache_bytes(16, 12, 64, 29, 64, 2) == 91_226_112
    assert accel.kv_cache_bytes(1, 1, 1, 1, 1, 4) == 8


def test_mbu_hand_computed():
    # (188 MB of weights + 12 MB of KV cache) in 1 ms = 200 GB/s, over 2 TB/s
    assert accel.mbu(188e6, 12e6, 1e-3, 2e12) == pytest.approx(0.1)


@pytest.mark.parametrize("fn, args", [(accel.mfu, (1, 1, 0.0, 1.0)), (accel.mbu, (1.0, 1.0, 1.0, 0.0))])
def test_roofline_ratios_reject_zero_time_or_peak(fn, args):
    with pytest.raises(ValueError, match="must be > 0"):
        fn(*args)


def test_kv_geometry_from_config_grouped_query_attention():
    cfg = tiny_llama_config(32, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, hidden_size=64,
                            num_layers=3, num_heads=8)
    cfg.num_key_value_heads = 2
    g = accel.KVGeometry.of(cfg)
    assert (g.layers, g.kv_heads, g.head_dim) == (3, 2, 8)
    assert g.bytes(10, 4, 2) == 2 * 3 * 2 * 8 * 10 * 4 * 2


def test_measured_peaks_positive_finite_on_cpu():
    flops = accel.measure_peak_flops("cpu", torch.float32, size=64, reps=2)
    bw = accel.measure_bandwidth("cpu", nbytes=2**20, reps=2)
    assert math.isfinite(flops) and flops > 0
    assert math.isfinite(bw) and bw > 0


# --- autocast and fp32 log-probs ------------------------------------------------------------------------------
def test_autocast_is_a_no_op_on_cpu_and_bf16_when_forced():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with accel.autocast("cpu"):
        assert accel.autocast_dtype("cpu") is None
        assert lin(x).dtype == torch.float32
    with accel.autocast("cpu", enabled=True):
        assert accel.autocast_dtype("cpu") == torch.bfloat16
        assert lin(x).dtype == torch.bfloat16


def test_autocast_sees_weight_updates_inside_the_region():
    """With autocast's weight-cast cache on, a forward after an in-place update would reuse the old bf16
    weights; `accel.autocast` turns the cache off so a whole training loop can run inside it."""
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with accel.autocast("cpu", enabled=True):
        before = lin(x)
        with torch.no_grad():
            lin.weight.mul_(0.0)
            lin.bias.zero_()
        after = lin(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, torch.zeros_like(after))


@torch.no_grad()
def test_sequence_logprobs_under_bf16_autocast_are_fp32_and_close(tiny_lm):
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9, EOS], [PAD, BOS, 10, 11, 12, 13, EOS]])
    mask = (ids != PAD).long()
    exact = sequence_logprobs(tiny_lm, ids, mask, 3, temperature=0.7, suppress_ids=(PAD, BOS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sequence_logprobs(tiny_lm, ids, mask, 3, temperature=0.7, suppress_ids=(PAD, BOS))
        logits = tiny_lm(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16  # the forward did run in bf16
    assert low.dtype == torch.float32
    assert torch.allclose(low, exact, atol=0.05)  # bf16 forward: ~3 significant digits in the logits


@torch.no_grad()
def test_sample_under_autocast_fp32_logprobs_and_no_stale_weight_casts(tiny_lm):
    """`sample` caches weight casts for its own loop only: after a weight update inside the same autocast
    region, the next call samples from the new weights, exactly as a call in a fresh region does."""
    model = new_causal_lm(tiny_lm.config, seed=1)  # weights require grad: autocast caches their casts
    ids, mask = _prompts()
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, suppress_ids=(PAD, BOS))

    def draw() -> torch.Tensor:
        return sample(model, ids, mask, 6, generator=torch.Generator().manual_seed(3), **kw).logprobs

    with accel.autocast("cpu", enabled=True):
        first = draw()
        assert first.dtype == torch.float32
        model.lm_head.weight.mul_(3.0)  # tied with the embeddings: changes every logit
        second = draw()
    with accel.autocast("cpu", enabled=True):
        fresh = draw()
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)


# --- decode meter -------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_decode_meter_counts_steps_and_bytes(tiny_lm):
    ids, mask = _prompts()  # B = 3, P = 4
    T = 5
    with accel.DecodeMeter([tiny_lm], "cpu", weight_bytes_per_param=4, kv_bytes_per_element=4) as meter:
        # EOS suppressed: every row runs to T tokens, so 1 prefill + (T - 1) decode forwards
        sample(tiny_lm, ids, mask, T, eos_token_id=EOS, pad_token_id=PAD, suppress_ids=(PAD, BOS, EOS))
        sequence_logprobs(tiny_lm, torch.cat([ids, ids], 1), torch.cat([mask, mask], 1), 4)  # no cache: ignored
    params = sum(p.numel() for p in tiny_lm.parameters())
    g = accel.KVGeometry(layers=2, kv_heads=4, head_dim=8)
    assert (meter.prefills, meter.steps, meter.sampled_tokens) == (1, T - 1, 3 * T)
    assert meter.weight_bytes == (T - 1) * params * 4
    # step t (1-based) reads the K, V of the P prompt positions and the t response tokens fed so far
    assert meter.kv_bytes == sum(g.bytes(4 + t, 3, 4) for t in range(1, T))
    assert meter.seconds > 0 and meter.prefill_seconds > 0
    assert meter.mbu(1e9) == pytest.approx(meter.bytes / meter.seconds / 1e9)
    assert not tiny_lm._forward_hooks and not tiny_lm._forward_pre_hooks  # removed on exit


# --- the benchmark script, end to end on CPU ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_default_algorithms_are_the_policy_algorithms(bench):
    algos = set(bench.default_algorithms())
    assert {"ppo", "ppo-ptx", "dpo", "rrhf", "rejection-sampling", "best-of-n"} <= algos
    assert not algos & {"sft", "reward-model"}


def test_gpu_bench_runs_on_cpu_with_a_tiny_model(bench, tmp_path):
    out = tmp_path / "bench"
    bench.main(["--device", "cpu", "--size", "tiny", "--algos", "dpo,best-of-n", "--rollout-batch", "4",
                "--reps", "1", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith("# GPU benchmark: CPU")
    assert res["device"] == "cpu" and "git_commit" in res and res["versions"]["torch"] == torch.__version__
    assert res["peaks"]["flops"] > 0 and res["peaks"]["bandwidth"] > 0
    assert res["model"]["vocab_size"] == 45 and res["model"]["params"] == sum(
        p.numel() for p in bench.build_models(_task(), "tiny", torch.device("cpu"), 0)["policy"].parameters())
    runs = {r["algorithm"]: r for r in res["algorithms"]}
    assert set(runs) == {"dpo", "best-of-n"}
    for r in runs.values():
        tps = r["tokens_per_second"]["overall"]
        assert math.isfinite(tps) and tps > 0
        assert r["phase_seconds"] and all(v > 0 for v in r["phase_seconds"].values())
        assert r["peak_memory_mb"] > 0
    dpo, bon = runs["dpo"], runs["best-of-n"]
    assert {"reference", "train"} <= set(dpo["phase_seconds"]) and dpo["trained_tokens"] > 0
    assert 0 < dpo["train_mfu"] <= 1
    assert dpo["decode"]["steps"] == 0 and dpo["decode"]["mbu"] is None  # DPO samples nothing
    assert "inference" in bon["phase_seconds"] and bon["train_mfu"] is None
    assert bon["decode"]["steps"] > 0 and bon["decode"]["mbu"] > 0 and bon["generated_tokens"] > 0
    ro = res["rollout"]["methods"]
    assert set(ro) == {"sample", "generate"}  # the static-cache generate runs on CUDA only
    assert ro["generate"]["ratio_vs_generate"] == 1.0 and ro["sample"]["ratio_vs_generate"] > 0
    assert ro["sample"]["decode"]["mbu"] > 0 and ro["generate"]["decode"]["mbu"] > 0


def _task():
    from rlhf_zoo.registry import get_registry

    return get_registry().task("sentiment").load(progress=False)


@pytest.mark.slow
def test_gpu_bench_rollout_with_the_static_paths_on_cpu(bench):
    """``--static-generate on``: generate's static cache and the zoo sampler's static and compiled caches
    join the rollout comparison (torch.compile on CPU: tens of seconds)."""
    task = _task()
    models = bench.build_models(task, "tiny", torch.device("cpu"), 0)
    ro = bench.rollout_comparison(task, models, torch.device("cpu"), 4, 1, 0, {"flops": 1e9, "bandwidth": 1e9},
                                  static=True)
    assert ro["errors"] == {}
    assert set(ro["methods"]) == {"sample", "generate", "generate_static", "sample_static", "sample_compiled"}
    for m in ro["methods"].values():
        assert math.isfinite(m["tokens_per_second"]) and m["tokens_per_second"] > 0 and m["ratio_vs_generate"] > 0
