"""The decode loop's static KV cache (issue 15 item 4, `rlhf_zoo.ops.kv_cache.IncrementalDecoder`): with the
same generator seed, ``sample(..., cache="static")`` and ``cache="compiled"`` draw the tokens the dynamic
cache draws, with the same log-probs up to float rounding, on left-padded prompts with rows that end early
and rows that run to the last step; ``$RLHF_ZOO_KV_CACHE`` chooses the cache, and models the static layout
does not describe fall back to the dynamic cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rlhf_zoo.generation import sample
from rlhf_zoo.ops import kv_cache
from rlhf_zoo.ops.kv_cache import IncrementalDecoder, kv_cache_mode
from rlhf_zoo.ops.logprobs import sequence_logprobs

PAD, BOS, EOS = 0, 1, 2
V = 24  # few tokens: EOS is drawn often (about 1 in 22 per step), so rows end at different steps
T = 20
LOGPROB_TOL = 1e-5


def tiny(arch: str, attn: str = "sdpa", **extra) -> torch.nn.Module:
    """A 2-layer model from config, grouped-query attention (4 query heads, 2 key-value heads). Weights drawn
    with std 0.3, not transformers' 0.02: the next-token distributions are peaked (mean log-prob of a
    sampled token about -1.6, uniform would be -3.2) and depend on the context, so a wrong mask or position
    changes them."""
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                  eos_token_id=EOS, initializer_range=0.3)
    common.update(extra)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Six prompts left-padded to 6: no padding, one token, and everything between."""
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9],
                        [PAD, PAD, PAD, PAD, PAD, BOS],
                        [PAD, PAD, BOS, 10, 11, 3],
                        [PAD, BOS, 4, 4, 4, 4],
                        [PAD, PAD, PAD, BOS, 9, 8],
                        [BOS, 3, 4, 5, 6, 7]])
    return ids, (ids != PAD).long()


def draw(model, cache: str, seed: int = 3, temperature: float = 0.8, **kw):
    ids, mask = prompts()
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    s = sample(model, ids, mask, T, eos_token_id=EOS, pad_token_id=PAD, temperature=temperature,
               suppress_ids=(PAD, BOS), generator=torch.Generator().manual_seed(seed),
               on_token=lambda tok, lp: steps.append((tok.clone(), lp.clone())), cache=cache, **kw)
    return s, steps


def assert_same_draws(a, b) -> None:
    (sa, steps_a), (sb, steps_b) = a, b
    assert torch.equal(sa.response_ids, sb.response_ids)
    assert torch.equal(sa.response_mask, sb.response_mask)
    assert torch.equal(sa.finished, sb.finished)
    assert (sa.logprobs - sb.logprobs).abs().max().item() <= LOGPROB_TOL
    assert len(steps_a) == len(steps_b)
    for (ta, la), (tb, lb) in zip(steps_a, steps_b, strict=True):
        assert torch.equal(ta, tb)
        assert (la - lb).abs().max().item() <= LOGPROB_TOL


@pytest.mark.parametrize("arch, attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa"), ("qwen2", "eager")])
@pytest.mark.parametrize("seed", [3, 11])
def test_static_cache_samples_what_the_dynamic_cache_samples(arch, attn, seed):
    model = tiny(arch, attn)
    dynamic, static = draw(model, "dynamic", seed), draw(model, "static", seed)
    assert_same_draws(dynamic, static)
    lengths = dynamic[0].lengths
    # the case that matters for left padding: rows end at different steps, some never (T tokens, no EOS)
    assert dynamic[0].finished.any() and not dynamic[0].finished.all()
    assert lengths.min() < lengths.max() == T
    assert (static[0].logprobs[static[0].response_mask == 0] == 0).all()


def test_the_comparison_sees_a_wrong_mask(monkeypatch):
    """The parity above is not vacuous: a static decoder that leaves the fed tokens' mask columns at 0 (they
    become invisible to later steps) is caught by the same comparison."""
    model = tiny("llama", "eager")
    dynamic = draw(model, "dynamic")[0]
    real = IncrementalDecoder.step
    monkeypatch.setattr(IncrementalDecoder, "step", lambda self, tok, alive: real(self, tok, alive * 0))
    broken = draw(model, "static")[0]
    both = dynamic.response_mask.bool() & broken.response_mask.bool()
    assert not torch.equal(dynamic.response_ids, broken.response_ids) or \
        (dynamic.logprobs - broken.logprobs)[both].abs().max().item() > 100 * LOGPROB_TOL


def test_static_logprobs_are_the_full_forwards_logprobs():
    """The recorded log-probs are those of one forward over [prompt | response] (what trainers compute)."""
    model = tiny("qwen2")
    ids, mask = prompts()
    s, _ = draw(model, "static", temperature=0.8)
    full = sequence_logprobs(model, torch.cat([ids, s.response_ids], 1), torch.cat([mask, s.response_mask], 1),
                             ids.shape[1], temperature=0.8, suppress_ids=(PAD, BOS))
    on = s.response_mask.bool()
    assert (full[on] - s.logprobs[on]).abs().max().item() <= LOGPROB_TOL


def test_static_cache_holds_prompt_plus_max_new_tokens_and_feeds_the_mask():
    model = tiny("llama")
    ids, mask = prompts()
    dec = IncrementalDecoder(model, ids, mask, T, "static")
    assert dec.mode == "static" and dec.attn.shape == (6, 6 + T)
    assert torch.equal(dec.attn[:, :6], mask) and not dec.attn[:, 6:].any()
    with torch.no_grad():
        logits = dec.prefill()
        assert logits.shape == (6, V)
        dec.step(torch.full((6,), 7), torch.tensor([1, 1, 0, 1, 1, 1]))
    assert dec.attn[:, 6].tolist() == [1, 1, 0, 1, 1, 1] and not dec.attn[:, 7:].any()
    assert dec.next_pos.squeeze(-1).tolist() == (mask.sum(-1) + 1).tolist()
    assert int(dec.cache.get_seq_length()) == 7


def test_the_environment_variable_chooses_the_cache(monkeypatch):
    model = tiny("llama")
    ids, mask = prompts()
    monkeypatch.delenv(kv_cache.KV_CACHE_ENV, raising=False)
    assert kv_cache_mode() == "dynamic" == kv_cache.DEFAULT_KV_CACHE
    monkeypatch.setenv(kv_cache.KV_CACHE_ENV, "static")
    assert kv_cache_mode() == "static" and kv_cache_mode("dynamic") == "dynamic"  # an explicit choice wins
    seen = []
    real = IncrementalDecoder.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self.mode)

    monkeypatch.setattr(IncrementalDecoder, "__init__", spy)
    sample(model, ids, mask, 4, eos_token_id=EOS, pad_token_id=PAD)
    assert seen == ["static"]
    monkeypatch.setenv(kv_cache.KV_CACHE_ENV, "paged")
    with pytest.raises(ValueError, match=r"\$RLHF_ZOO_KV_CACHE='paged'; known: dynamic, static, compiled"):
        sample(model, ids, mask, 4, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="kv cache='fast'"):
        kv_cache_mode("fast")


def test_unsupported_models_fall_back_to_the_dynamic_cache():
    ids, mask = prompts()
    # sliding-window layers (static ring buffers): the dynamic cache, bit for bit the dynamic draws
    sliding = tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert sliding.config.layer_types == ["full_attention", "sliding_attention"]
    assert IncrementalDecoder(sliding, ids, mask, T, "static").mode == "dynamic"
    a, b = draw(sliding, "dynamic")[0], draw(sliding, "static")[0]
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.response_ids, b.response_ids)
    # a model class that does not declare static-cache / compile support
    model = tiny("llama")
    model.__class__ = type("NoStatic", (type(model),), {"_can_compile_fullgraph": False})
    assert IncrementalDecoder(model, ids, mask, T, "compiled").mode == "dynamic"


@pytest.mark.slow
def test_compiled_decode_step_samples_what_the_dynamic_cache_samples():
    """torch.compile of the decode step (inductor on CPU: tens of seconds to compile)."""
    model = tiny("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        first = draw(model, "compiled")
        again = draw(model, "compiled", seed=11)  # the same shapes: no recompilation, a new cache
    assert_same_draws(draw(model, "dynamic"), first)
    assert_same_draws(draw(model, "dynamic", seed=11), again)
    dec = IncrementalDecoder(model, *prompts(), T, "compiled")
    assert dec.mode == "compiled" and dec.attn.shape[1] == kv_cache.COMPILED_LENGTH_MULTIPLE  # 6 + 20 rounded up
