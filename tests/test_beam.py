"""rlhf_zoo.beam: beam search returns the most probable responses (a hand-made model whose probabilities
are known, and brute-force enumeration of ``exact``'s response space), its log-probs are the trainer's,
batch rows are independent, EOS ends a hypothesis, and diverse beam search's groups differ."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_zoo.beam import beam_search
from rlhf_zoo.models import new_causal_lm, tiny_llama_config
from rlhf_zoo.ops import response_logprobs

PAD, BOS, EOS, A, B, C, P = range(7)  # the hand-made model's vocabulary; P is the prompt token
WORDS = (A, B, C)


class MarkovLM(torch.nn.Module):
    """A hand-made causal LM: the next token's logits are ``table[last token]``, so every response's
    probability is a product of table entries. It takes (and ignores) the KV cache."""

    def __init__(self, probs: dict[int, dict[int, float]]) -> None:
        super().__init__()
        table = torch.zeros(7, 7)  # tokens without a row: uniform
        for prev, row in probs.items():
            table[prev] = torch.tensor([math.log(row[t]) if row.get(t) else float("-inf") for t in range(7)])
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, cache=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])

    def logprob(self, response: tuple[int, ...]) -> float:
        lp, prev = 0.0, P
        for t in response:
            lp += float(torch.log_softmax(self.table[prev], -1)[t])
            prev = t
        return lp


def search(model, prompts, T, **kw):
    kw = {"eos_token_id": EOS, "pad_token_id": PAD, "suppress_ids": (PAD, BOS, P), **kw}
    ids = torch.tensor(prompts)
    return beam_search(model, ids, (ids != PAD).long(), T, **kw)


def responses(beams, row: int) -> list[tuple[int, ...]]:
    return [tuple(ids[m.bool()].tolist()) for ids, m in zip(beams.response_ids[row], beams.response_mask[row],
                                                             strict=True)]


def every_response(T: int) -> list[tuple[int, ...]]:
    """All responses of at most T tokens: words then EOS (< T words), or T words cut off."""
    out = []
    for n in range(T + 1):
        for words in itertools.product(WORDS, repeat=n):
            out.append((*words, EOS) if n < T else words)
    return out


GREEDY_TRAP = {P: {A: 0.6, B: 0.4}, A: {A: 0.25, B: 0.25, C: 0.25, EOS: 0.25}, B: {EOS: 1.0}, C: {EOS: 1.0}}


def test_beam_search_finds_the_most_probable_responses_where_greedy_does_not():
    model = MarkovLM(GREEDY_TRAP)
    # P(B EOS) = 0.4 is the most probable response, but greedy takes A (0.6) first: every A... is <= 0.15
    beams = search(model, [[P]], 3, num_beams=2)
    assert responses(beams, 0) == [(B, EOS), (A, EOS)]
    assert beams.scores[0].tolist() == pytest.approx([math.log(0.4), math.log(0.15)], abs=1e-6)
    assert beams.finished[0].tolist() == [True, True]
    greedy = search(model, [[P]], 3, num_beams=1)
    assert responses(greedy, 0)[0][0] == A


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_enough_beams_equals_brute_force_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    probs = {}
    for prev in (P, *WORDS):
        p = torch.rand(4, generator=gen) + 0.05
        p = (p / p.sum()).tolist()
        probs[prev] = dict(zip((A, B, C, EOS), p, strict=True))
    model = MarkovLM(probs)
    T = 3
    space = every_response(T)  # 1 + 3 + 9 with EOS, 27 cut off: 40
    truth = sorted(space, key=model.logprob, reverse=True)
    beams = search(model, [[P]], T, num_beams=len(space))  # 27 live prefixes at most: exhaustive
    assert responses(beams, 0) == truth
    assert beams.scores[0].tolist() == pytest.approx([model.logprob(r) for r in truth], abs=1e-5)
    assert beams.finished[0].tolist() == [r[-1] == EOS for r in truth]
    top = search(model, [[P]], T, num_beams=12, num_return=5)
    assert responses(top, 0) == truth[:5]


def test_beam_search_on_exact_equals_the_enumerated_response_space(exact_task):
    from rlhf_zoo_envs.tasks.exact import policy_logprobs

    task, model = exact_task, exact_task.load_policy().eval()
    prompts = task.prompts("eval")
    space = task.space
    exact = policy_logprobs(model, task, prompts, space)  # (X, R) log pi(y|x) of every response
    ids, mask = task.encode_prompts(prompts, "cpu")
    kw = {"eos_token_id": task.eos_token_id, "pad_token_id": task.pad_token_id, "suppress_ids": task.suppress_ids}
    # 27 beams keep every live prefix of exact's 3 words up to the last step: the top 10 are exact
    for num_beams, n in ((27, 10), (len(space.texts), len(space.texts))):
        beams = beam_search(model, ids, mask, task.max_new_tokens, num_beams=num_beams, num_return=n, **kw)
        top = exact.topk(n, dim=-1)
        index = {t: i for i, t in enumerate(space.texts)}
        for x in range(len(prompts)):
            texts = task.decode(beams.response_ids[x], beams.response_mask[x])
            # the n best responses in order; two whose log-probs are within float rounding (gaps of 1e-6
            # occur among the 40) may come in either order, so the check is on each rank's log-prob
            assert len(set(texts)) == n and all(t in index for t in texts)
            assert exact[x, [index[t] for t in texts]].tolist() == pytest.approx(top.values[x].tolist(), abs=1e-5)
            assert beams.scores[x].double().tolist() == pytest.approx(top.values[x].tolist(), abs=1e-4)
    # fewer beams: a heuristic, but every hypothesis is a real response with its exact log-prob, best first
    beams = beam_search(model, ids, mask, task.max_new_tokens, num_beams=3, **kw)
    for x in range(len(prompts)):
        texts = task.decode(beams.response_ids[x], beams.response_mask[x])
        assert len(set(texts)) == 3
        want = [float(exact[x, space.texts.index(t)]) for t in texts]
        assert beams.scores[x].tolist() == pytest.approx(want, abs=1e-4)
        assert beams.scores[x].tolist() == sorted(beams.scores[x].tolist(), reverse=True)
        assert texts[0] == space.texts[int(exact[x].argmax())]


def test_beam_search_ends_hypotheses_at_eos_and_cuts_off_at_the_length_cap():
    model = MarkovLM({P: {A: 0.5, EOS: 0.5}, A: {A: 0.9, EOS: 0.1}})
    for pad in (PAD, EOS):  # pad == eos (GPT-2): the mask, never id == pad, says what is real
        beams = search(model, [[P]], 4, num_beams=3, pad_token_id=pad, suppress_ids=(BOS, P, *(() if pad == EOS else (PAD,))))
        assert responses(beams, 0) == [(EOS,), (A, A, A, A), (A, EOS)]  # 0.5, 0.5 * 0.9^3 (cut off), 0.5 * 0.1
        assert beams.response_mask[0].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
        assert beams.finished[0].tolist() == [True, False, True]
        assert (beams.response_ids[0][beams.response_mask[0] == 0] == pad).all()
        assert (beams.logprobs[0][beams.response_mask[0] == 0] == 0).all()
        assert torch.allclose(beams.logprobs.sum(-1), beams.scores, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = tiny_llama_config(32, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, hidden_size=32,
                            num_layers=2, num_heads=4, max_positions=64)
    return new_causal_lm(cfg, seed=0)


def left_pad(prompts: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


PROMPTS = [[BOS, 5, 6], [BOS, 7, 8, 9, 10], [BOS, 11]]
LM_KW = {"eos_token_id": EOS, "pad_token_id": PAD, "suppress_ids": (PAD, BOS), "temperature": 0.7}


@pytest.mark.parametrize("groups", [1, 2])
def test_beam_search_batch_rows_are_independent(tiny_lm, groups):
    kw = {**LM_KW, "num_beams": 4, "num_groups": groups, "diversity_penalty": 0.5}
    alone = [beam_search(tiny_lm, *left_pad([p]), 6, **kw) for p in PROMPTS]
    for width in (None, 8):  # padded to the longest prompt, and with extra left padding
        batch = beam_search(tiny_lm, *left_pad(PROMPTS, width), 6, **kw)
        for i, one in enumerate(alone):
            assert torch.equal(batch.response_ids[i], one.response_ids[0])
            assert torch.equal(batch.response_mask[i], one.response_mask[0])
            assert torch.allclose(batch.logprobs[i], one.logprobs[0], atol=1e-5)
            assert torch.allclose(batch.scores[i], one.scores[0], atol=1e-5)


def test_beam_logprobs_equal_the_trainers_forward_at_the_temperature(tiny_lm):
    ids, mask = left_pad(PROMPTS)
    beams = beam_search(tiny_lm, ids, mask, 6, num_beams=4, num_groups=2, diversity_penalty=1.0, **LM_KW)
    B, n, T = beams.response_ids.shape
    lp = response_logprobs(tiny_lm, ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0),
                           beams.response_ids.view(B * n, T), beams.response_mask.view(B * n, T),
                           LM_KW["temperature"], LM_KW["suppress_ids"])
    assert torch.allclose(lp.view(B, n, T), beams.logprobs, atol=1e-5)
    assert torch.allclose(beams.logprobs.sum(-1), beams.scores, atol=1e-5)
    assert not (beams.response_ids[beams.response_mask.bool()] == BOS).any()  # suppressed


def test_diverse_beam_search_hamming_penalty_hand_computed():
    model = MarkovLM({P: {A: 0.6, B: 0.4}, A: {EOS: 1.0}, B: {EOS: 1.0}})
    # one beam per group: group 0 takes A; group 1 pays lambda for A, so it takes B once lambda > log(0.6/0.4)
    threshold = math.log(0.6 / 0.4)
    same = search(model, [[P]], 3, num_beams=2, num_groups=2, diversity_penalty=threshold - 0.05)
    assert responses(same, 0) == [(A, EOS), (A, EOS)]
    differ = search(model, [[P]], 3, num_beams=2, num_groups=2, diversity_penalty=threshold + 0.05)
    assert responses(differ, 0) == [(A, EOS), (B, EOS)]
    assert differ.scores[0].tolist() == pytest.approx([math.log(0.6), math.log(0.4)], abs=1e-6)  # plain log-probs


def test_diverse_beam_search_groups_differ(exact_task, tiny_lm):
    task, model = exact_task, exact_task.load_policy().eval()
    ids, mask = task.encode_prompts(task.prompts("eval"), "cpu")
    kw = {"eos_token_id": task.eos_token_id, "pad_token_id": task.pad_token_id, "suppress_ids": task.suppress_ids}
    plain = beam_search(model, ids, mask, task.max_new_tokens, num_beams=2, **kw)
    # no penalty: every group is the plain beam search of its width
    same = beam_search(model, ids, mask, task.max_new_tokens, num_beams=6, num_groups=3, diversity_penalty=0.0, **kw)
    for g in range(3):
        assert torch.equal(same.response_ids[:, 2 * g : 2 * g + 2], plain.response_ids)
    # a large penalty: group 1 avoids the tokens group 0 took at each step, so its hypothesis starts
    # differently; group 0 is still the plain search of its width (one beam each: exact has only 4 tokens)
    greedy = beam_search(model, ids, mask, task.max_new_tokens, num_beams=1, **kw)
    diverse = beam_search(model, ids, mask, task.max_new_tokens, num_beams=2, num_groups=2, diversity_penalty=50.0,
                          **kw)
    assert torch.equal(diverse.response_ids[:, :1], greedy.response_ids)
    for x in range(ids.shape[0]):
        texts = task.decode(diverse.response_ids[x], diverse.response_mask[x])
        assert (texts[0].split() or [""])[0] != (texts[1].split() or [""])[0], texts
    # and on a real model with a larger vocabulary
    lm_ids, lm_mask = left_pad(PROMPTS)
    d = beam_search(tiny_lm, lm_ids, lm_mask, 6, num_beams=4, num_groups=4, diversity_penalty=50.0, **LM_KW)
    for x in range(len(PROMPTS)):
        assert len({int(d.response_ids[x, j, 0]) for j in range(4)}) == 4


def test_beam_search_rejects_bad_sizes_and_too_few_responses():
    model = MarkovLM(GREEDY_TRAP)
    with pytest.raises(ValueError, match="num_groups"):
        search(model, [[P]], 3, num_beams=3, num_groups=2)
    with pytest.raises(ValueError, match="num_return"):
        search(model, [[P]], 3, num_beams=2, num_return=3)
    with pytest.raises(ValueError, match="non-zero probability"):
        search(model, [[P]], 1, num_beams=4)  # one token: only A or B (cut off) have probability > 0
