"""Chunked log-probs (`rlhf_zoo.ops.logprobs`, issue 15 item 3) against the naive full-logits computation:
values and the gradients of every parameter, on tiny Llama and GPT-2 models built from config (fp32, CPU),
through LoRA, with the fallback for structures the chunked path does not know, and through DPO's code."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from rlhf_zoo.ops import logprobs as L
from rlhf_zoo.ops.logprobs import (
    chunked_token_logprobs,
    lm_parts,
    logprob_strategy,
    logprobs_from_logits,
    response_logprobs,
    sequence_logprobs,
    shifted_logprobs,
)

V = 1000
SUPPRESS = (0, 1)  # pad and bos, say: -inf in both paths
TEMPERATURE = 0.7
TOL = {"atol": 1e-5, "rtol": 1e-4}


def tiny(arch: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    elif arch == "llama-untied":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, **extra)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def batch(seed: int = 0, B: int = 5, P: int = 7, T: int = 6):
    """Left-padded prompts, right-padded responses, with a suppressed id inside one response (its log-prob
    is -inf in both paths) and a row whose response is a single token."""
    g = torch.Generator().manual_seed(seed)
    p_ids = torch.randint(3, V, (B, P), generator=g)
    p_mask = torch.ones(B, P, dtype=torch.long)
    p_mask[0, :3] = 0
    p_mask[1, :1] = 0
    p_ids[p_mask == 0] = 0
    r_ids = torch.randint(3, V, (B, T), generator=g)
    r_mask = torch.ones(B, T, dtype=torch.long)
    r_mask[2, 4:] = 0
    r_mask[3, 1:] = 0
    r_ids[r_mask == 0] = 0
    return p_ids, p_mask, r_ids, r_mask


def run(model, mode: str, fn, chunk_rows: int | None = 3, chunked: bool | None = None):
    """fn(model) -> (values, loss); returns values and every parameter's gradient under ``mode``, checking
    that the chunked function ran exactly when expected (``chunked``; default: in ``chunked`` mode on a
    model `lm_parts` recognises)."""
    model.zero_grad(set_to_none=True)
    calls, original = [], L.chunked_token_logprobs

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    L.chunked_token_logprobs = spy
    try:
        with logprob_strategy(mode, chunk_rows=chunk_rows):
            values, loss = fn(model)
    finally:
        L.chunked_token_logprobs = original
    expected = (mode == "chunked" and lm_parts(model) is not None) if chunked is None else chunked
    assert bool(calls) == expected
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return values.detach(), grads


def assert_same(a, b, **tol):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, **(tol or TOL))
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **(tol or TOL), msg=lambda m, n=name: f"{n}: {m}")


def response_fn(temperature=TEMPERATURE, suppress=SUPPRESS, **kw):
    p_ids, p_mask, r_ids, r_mask = batch(**kw)

    def fn(model):
        lp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, temperature, suppress)
        w = torch.linspace(-1.0, 2.0, lp.numel()).view_as(lp)  # weights that differ per token
        return lp, (lp * w).sum() / r_mask.sum()

    return fn


# --- the autograd function itself -------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_chunked_token_logprobs_equal_naive_with_bias(chunk_rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 4, generator=g, requires_grad=True)
    w = torch.randn(9, 4, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True)
    t = torch.tensor([2, 3, 4, 8, 5, 2, 0])  # the last target is suppressed: -inf in both
    weights = torch.tensor([0.5, -1.0, 2.0, 1.0, 0.0, 3.0, 0.0])
    lp = chunked_token_logprobs(h, w, b, t, 0.7, (0, 1), chunk_rows=chunk_rows)
    naive = logprobs_from_logits(torch.nn.functional.linear(h, w, b), t, 0.7, (0, 1))
    assert lp.dtype == torch.float32 and lp[-1] == float("-inf")
    torch.testing.assert_close(lp, naive, **TOL)
    got = torch.autograd.grad((lp[:-1] * weights[:-1]).sum(), (h, w, b))
    ref = torch.autograd.grad((naive[:-1] * weights[:-1]).sum(), (h, w, b))
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, **TOL)
    assert got[1][:2].abs().sum() == 0 and got[2][:2].abs().sum() == 0  # suppressed rows of the head: no gradient


def test_frozen_head_gets_no_gradient_buffer():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(9, 4)  # frozen (LoRA: the head is not trained)
    lp = chunked_token_logprobs(h, w, None, torch.tensor([1, 2, 3, 4, 5]), chunk_rows=2)
    (gh,) = torch.autograd.grad(lp.sum(), (h,))
    ref = torch.autograd.grad(logprobs_from_logits(h @ w.T, torch.tensor([1, 2, 3, 4, 5])).sum(), (h,))[0]
    torch.testing.assert_close(gh, ref, **TOL)


# --- through the models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "llama-untied", "gpt2"])
def test_response_logprobs_chunked_equal_naive_values_and_every_gradient(arch):
    model = tiny(arch)
    assert lm_parts(model) is not None
    fn = response_fn()
    naive, chunked = run(model, "naive", fn), run(model, "chunked", fn)
    assert torch.isinf(naive[0]).sum() == 0  # no suppressed target in the responses here
    assert_same(naive, chunked)
    if arch == "llama":  # tied: the embedding's gradient has both its input and its head part
        assert "lm_head.weight" not in naive[1] and naive[1]["model.embed_tokens.weight"].abs().sum() > 0


@pytest.mark.parametrize("temperature,suppress", [(1.0, ()), (1.3, (0,)), (0.5, (0, 1, 2, 999))])
def test_temperature_and_suppressed_ids_match(temperature, suppress):
    model = tiny("llama", seed=1)
    fn = response_fn(temperature, suppress, seed=3)
    assert_same(run(model, "naive", fn), run(model, "chunked", fn, chunk_rows=1))


def test_suppressed_target_gives_minus_inf_in_both_paths():
    model = tiny("gpt2")
    p_ids, p_mask, r_ids, r_mask = batch()
    r_ids[0, 2] = 1  # a suppressed id inside a response
    with torch.no_grad():
        with logprob_strategy("naive"):
            naive = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, TEMPERATURE, SUPPRESS)
        with logprob_strategy("chunked", chunk_rows=4):
            chunked = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, TEMPERATURE, SUPPRESS)
    assert naive[0, 2] == chunked[0, 2] == float("-inf")
    torch.testing.assert_close(naive, chunked, **TOL)


def test_sequence_logprobs_match_on_the_mask():
    model = tiny("llama")
    p_ids, p_mask, r_ids, r_mask = batch(seed=2)
    ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)

    def fn(model):
        lp = sequence_logprobs(model, ids, mask, p_ids.shape[1], TEMPERATURE, SUPPRESS)
        lp = torch.where(r_mask.bool(), lp, 0.0)  # values off the mask are meaningless
        return lp, lp.sum()

    assert_same(run(model, "naive", fn), run(model, "chunked", fn, chunk_rows=4))


def test_lm_loss_chunked_equals_naive():
    from rlhf_zoo.training import collate_lm, lm_loss, lm_row

    model = tiny("gpt2", seed=2)
    g = torch.Generator().manual_seed(0)
    rows = [lm_row(torch.randint(3, V, (p,), generator=g).tolist(), torch.randint(3, V, (c,), generator=g).tolist())
            for p, c in [(3, 5), (1, 9), (6, 2)]]
    b = collate_lm(rows, pad_id=0)

    def fn(model):
        loss = lm_loss(model, b, suppress_ids=SUPPRESS)
        return loss.detach(), loss

    assert_same(run(model, "naive", fn), run(model, "chunked", fn, chunk_rows=5))
    with logprob_strategy("chunked"):
        lp = shifted_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert (lp[~b["loss_mask"][:, 1:]] == 0).all()  # only the counted tokens are computed


def test_training_mode_with_gradient_checkpointing():
    model = tiny("llama", seed=4)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # newer transformers 5.x (the old name warns)
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    fn = response_fn(seed=5)
    assert_same(run(model, "naive", fn), run(model, "chunked", fn))


def test_bf16_autocast_stays_close_and_fp32():
    model = tiny("llama", seed=6)
    fn = response_fn(seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive, chunked = run(model, "naive", fn), run(model, "chunked", fn)
    assert chunked[0].dtype == torch.float32
    torch.testing.assert_close(naive[0], chunked[0], atol=0.05, rtol=0.02)  # bf16 matmuls on both sides
    for name in naive[1]:
        assert chunked[1][name].dtype == torch.float32
        torch.testing.assert_close(naive[1][name], chunked[1][name], atol=0.05, rtol=0.1)


# --- LoRA ---------------------------------------------------------------------------------------------------
def _lora(arch: str, **setup):
    pytest.importorskip("peft")
    from rlhf_zoo.adapters import prepare_policy

    policy, reference = prepare_policy(tiny(arch, seed=7), {"lora_r": 4, **setup}, None)
    with torch.no_grad():  # B starts at 0: give the adapter an effect, so that disabling it shows
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return policy, reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_policy_and_its_adapter_disabled_reference(arch):
    policy, reference = _lora(arch)
    assert lm_parts(policy) is not None and lm_parts(reference) is not None
    fn = response_fn(seed=8)
    naive, chunked = run(policy, "naive", fn), run(policy, "chunked", fn)
    assert all("lora_" in n for n in naive[1])
    assert_same(naive, chunked)
    with torch.no_grad():
        ref_naive = run_values(reference, "naive", fn)
        ref_chunked = run_values(reference, "chunked", fn)
    torch.testing.assert_close(ref_naive, ref_chunked, **TOL)
    assert (ref_chunked - chunked[0]).abs().max() > 1e-3  # the reference really runs without the adapter


def run_values(model, mode, fn):
    with logprob_strategy(mode, chunk_rows=3):
        return fn(model)[0]


def test_lora_on_the_head_falls_back_to_naive():
    policy, _ = _lora("llama-untied", lora_target_modules="q_proj,v_proj,lm_head")
    assert lm_parts(policy) is None
    fn = response_fn(seed=9)
    naive, chunked = run(policy, "naive", fn), run(policy, "chunked", fn)
    assert torch.equal(naive[0], chunked[0])  # the same (naive) computation


# --- fallback ---------------------------------------------------------------------------------------------
class ScaledLlama(AutoModelForCausalLM._model_mapping[LlamaConfig]):
    """A user's subclass that changes the logits after the head: the chunked path must not take it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def _softcapped():
    from transformers import Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("make", [
    _softcapped,
    lambda: (torch.manual_seed(0), ScaledLlama(tiny("llama").config).eval())[1],
    lambda: Wrapper(tiny("gpt2")),
], ids=["gemma2-softcapping", "subclass-scaling-logits", "unknown-wrapper"])
def test_unrecognised_structures_take_the_naive_path(make):
    model = make()
    assert lm_parts(model) is None
    fn = response_fn(seed=10)
    naive, chunked = run(model, "naive", fn), run(model, "chunked", fn)
    assert torch.equal(naive[0], chunked[0])
    for name in naive[1]:
        assert torch.equal(naive[1][name], chunked[1][name])


def test_hooked_model_takes_the_naive_path():
    model = tiny("llama")
    handle = model.register_forward_hook(lambda *a: None)
    try:
        assert lm_parts(model) is None
    finally:
        handle.remove()
    assert lm_parts(model) is not None


def test_auto_mode_chunks_above_the_threshold_and_env_override(monkeypatch):
    model = tiny("llama")
    monkeypatch.delenv(L.MODE_ENV, raising=False)
    assert L._plan(model, 5, 13) is None  # 5 x 13 x 1000 x 4 bytes: far below CHUNK_BYTES
    monkeypatch.setattr(L, "CHUNK_BYTES", 5 * 13 * V * 4 - 1)
    assert L._plan(model, 5, 13) is not None
    monkeypatch.setenv(L.MODE_ENV, "naive")
    assert L._plan(model, 5, 13) is None
    with logprob_strategy("chunked"):
        assert L._plan(model, 1, 1) is not None
    monkeypatch.setenv(L.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="fast"):
        L._plan(model, 1, 1)
    with pytest.raises(ValueError):
        with logprob_strategy("fast"):
            pass
    # auto mode with even the response tokens' logits above the threshold gives the chunked values
    monkeypatch.setenv(L.MODE_ENV, "auto")
    monkeypatch.setattr(L, "CHUNK_BYTES", V * 4)  # one row of logits per chunk
    fn = response_fn(seed=11)
    assert_same(run(model, "naive", fn), run(model, "auto", fn, chunk_rows=None, chunked=True))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_auto_mode_runs_the_head_on_response_positions_only_above_gather_min_flops(monkeypatch, kind):
    """Logits that fit in CHUNK_BYTES but a head whose work passes GATHER_MIN_FLOPS: one plain forward of
    the head on the response tokens (no chunked function), the naive values and gradients, and the head
    fed as many rows as there are response tokens (not B x L)."""
    model = tiny(kind, seed=21)
    monkeypatch.delenv(L.MODE_ENV, raising=False)
    p_ids, p_mask, r_ids, r_mask = batch(seed=21)
    width = int((p_mask.sum(-1) + r_mask.sum(-1)).max())
    flops = 2 * p_ids.shape[0] * width * model.get_output_embeddings().weight.shape[1] * V
    monkeypatch.setattr(L, "GATHER_MIN_FLOPS", flops + 1)
    assert L._plan(model, p_ids.shape[0], width) is None  # just below: the naive path
    monkeypatch.setattr(L, "GATHER_MIN_FLOPS", flops)
    assert L._plan(model, p_ids.shape[0], width) is not None
    shapes, original = [], L.logprobs_from_logits  # (a hook on the head would turn the fast paths off)

    def spy(logits, *args, **kwargs):
        shapes.append(tuple(logits.shape))
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(L, "logprobs_from_logits", spy)
    fn = response_fn(seed=21)
    gathered = run(model, "auto", fn, chunk_rows=None, chunked=False)
    assert shapes == [(int(r_mask.sum()), V)]  # the response tokens' logits, nothing else
    monkeypatch.setattr(L, "logprobs_from_logits", original)
    assert_same(run(model, "naive", fn), gathered)


# --- DPO's code path -----------------------------------------------------------------------------------------
def test_dpo_loss_and_gradient_identical_through_pair_logprobs():
    from rlhf_zoo_plugins.dpo import Pairs, dpo_loss, pair_logprobs

    model = tiny("llama", seed=12)
    p_ids, p_mask, c_ids, c_mask = batch(seed=12, B=4)
    _, _, x_ids, x_mask = batch(seed=13, B=4)
    pairs = Pairs(p_ids, p_mask, c_ids, c_mask, x_ids, x_mask)
    ref_c, ref_x = torch.randn(4, generator=torch.Generator().manual_seed(0)) - 30, torch.full((4,), -31.0)

    def fn(model):
        chosen, rejected, _ = pair_logprobs(model, pairs, torch.arange(4), SUPPRESS)
        loss, _, _ = dpo_loss(chosen, rejected, ref_c, ref_x, beta=0.1)
        return torch.cat([chosen, rejected, loss[None]]).detach(), loss

    naive, chunked = run(model, "naive", fn), run(model, "chunked", fn)
    assert_same(naive, chunked)
