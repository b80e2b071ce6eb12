"""benchmarks/scaling.py's arithmetic on hand-computed cases: the least-squares line and its R^2, the Qwen2
block-parameter count, the FLOP counts of a forward, a training pass, a dpo step, dpo's reference share and
ppo's train phase, and where the LM head runs (naive or chunked log-probs). No model is trained."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def sc():
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("scaling", None)


def test_an_exact_line_is_recovered(sc):
    f = sc.fit_line([1, 2, 4, 8], [3 + 2 * x for x in (1, 2, 4, 8)])
    assert f["a"] == pytest.approx(3.0)
    assert f["b"] == pytest.approx(2.0)
    assert f["r2"] == pytest.approx(1.0)


def test_a_line_through_scattered_points(sc):
    # x 0, 1, 2; y 0, 1, 1: mean x 1, mean y 2/3; Sxy = 1, Sxx = 2 -> b = 1/2, a = 2/3 - 1/2 = 1/6;
    # residuals -1/6, 1/3, -1/6 -> SS_res = 1/6; SS_tot = 4/9 + 1/9 + 1/9 = 2/3 -> R^2 = 1 - 1/4
    f = sc.fit_line([0, 1, 2], [0, 1, 1])
    assert f["a"] == pytest.approx(1 / 6)
    assert f["b"] == pytest.approx(0.5)
    assert f["r2"] == pytest.approx(0.75)


def test_flat_series_and_bad_input(sc):
    f = sc.fit_line([1, 2, 3], [5.0, 5.0, 5.0])
    assert (f["a"], f["b"], f["r2"]) == (pytest.approx(5.0), pytest.approx(0.0), 1.0)
    with pytest.raises(ValueError, match="two"):
        sc.fit_line([1], [1])
    with pytest.raises(ValueError, match="distinct"):
        sc.fit_line([2, 2], [1, 3])


def test_qwen2_block_parameters_by_hand(sc):
    # width 8, 2 heads (head dim 4), 1 kv head (kv width 4), MLP 16, 2 layers:
    # q 8*8+8, k and v 8*4+4 each, o 8*8 -> 208; MLP 3*8*16 = 384; two norms 16 -> 608 per layer; final norm 8
    assert sc.qwen2_block_parameters(8, 2, 16, 2, 1) == 2 * 608 + 8
    # the realistic shape (8 x 512, MLP 1408, 8 heads) with its 32000 x 512 tied embedding: speed_vs_trl's 42,095,104
    assert sc.qwen2_block_parameters(512, 8, 1408, 8, 8) + 32000 * 512 == 42_095_104


def test_qwen2_block_parameters_match_transformers(sc):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert sc.qwen2_block_parameters(16, 3, 40, 4, 2) == total - 50 * 16


def test_forward_and_training_flops_by_hand(sc):
    m = sc.Dims(block_parameters=1000, hidden=4, layers=2, vocab=10)
    # 3 rows x 5 positions = 15 tokens: 2*1000*15 + 4*2*4*5*15 + 2*4*10*15 = 30000 + 2400 + 1200
    assert sc.forward_flops(m, 3, 5, 15) == 33600
    assert sc.train_flops(m, 3, 5, 15) == 3 * 33600
    assert sc.train_flops(m, 3, 5, 15, recompute_head=True) == 3 * 33600 + 1200
    assert sc.matmul_flops(1024) == 2 * 1024 ** 3


def test_where_the_head_runs(sc):
    # (2, 4, 8) fp32 logits are 256 bytes: naive at 256 (every position), chunked below (response tokens, recomputed)
    assert sc.lm_head_plan(2, 4, 6, 8, chunk_bytes=256) == (8, False)
    assert sc.lm_head_plan(2, 4, 6, 8, chunk_bytes=255) == (6, True)


def test_dpo_and_ppo_counts_by_hand(sc):
    policy = sc.Dims(1000, 4, 2, 10)
    critic = sc.Dims(1000, 4, 2, 1)
    big = 1 << 40
    # dpo, 1 pair, prompt 3 + response 2: 2 rows x 5. Naive: head at 10 positions:
    # forward 2*1000*10 + 4*2*4*5*10 + 2*4*10*10 = 20000 + 1600 + 800 = 22400; training x3
    assert sc.dpo_step_flops(policy, 1, 3, 2, big) == 67200
    # chunked: head at the 4 response tokens (320), plus its recompute: 3 * 21920 + 320
    assert sc.dpo_step_flops(policy, 1, 3, 2, 0) == 66080
    # reference share: the same forward as the step's, once
    assert sc.dpo_reference_flops(policy, 1, 3, 2, big, reference_pairs=4) == 22400
    # ppo, 2 prompts, 1 epoch x 1 minibatch: critic forward 20000 + 1600 + 2*4*1*4 = 21632; the policy pass as
    # dpo's naive step (67200); the critic's training pass 3 * 21632
    assert sc.ppo_train_flops(policy, critic, 2, 3, 2, 1, 1, big) == 21632 + 67200 + 3 * 21632
    assert sc.ppo_train_flops(policy, critic, 2, 3, 2, 2, 2, big) == 21632 + 2 * (67200 + 3 * 21632)


def test_series_vary_one_factor_around_the_base(sc):
    base = {"batch": 8, "response": 64, "layers": 8}
    s = sc.series_points({"batch": [2, 8], "response": [16, 64], "layers": [2, 8]}, base)
    assert s["batch"] == [{**base, "batch": 2}, base]
    assert s["response"] == [{**base, "response": 16}, base]
    assert s["parameters"] == [{**base, "layers": 2}, base]
    p = {**base, "parameters": 42_095_104}
    assert sc.x_of("parameters", p) == pytest.approx(42.095104)
    assert math.isclose(sc.x_of("batch", p), 8)
