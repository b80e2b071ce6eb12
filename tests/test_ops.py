"""The shared math in `rlhf_zoo.ops`, against hand-computed numbers, and the padding / sampling parity of
log-probs on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_zoo.generation import sample
from rlhf_zoo.models import new_causal_lm, tiny_llama_config
from rlhf_zoo.ops import (
    kl_penalty,
    last_true_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    per_token_rewards,
    position_ids_from_mask,
    sequence_logprobs,
)
from rlhf_zoo.ops.ranking import pair_accuracy, pair_indices, ranking_loss
from rlhf_zoo.ops.rewards import LLAMA2_SAFETY_THRESHOLD, llama2_combine

NEG_INF = float("-inf")
PAD, BOS, EOS = 0, 1, 2


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- masking --------------------------------------------------------------------------------------------
def test_position_ids_from_mask_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_position_ids_from_mask_right_padding_same_positions_for_real_tokens():
    right = torch.tensor([[1, 1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1]])
    pos_right, pos_left = position_ids_from_mask(right), position_ids_from_mask(left)
    assert pos_right[0, :3].tolist() == [0, 1, 2]
    assert pos_right[right.bool()].tolist() == pos_left[left.bool()].tolist()
    assert pos_right.dtype == torch.long and int(pos_right.min()) >= 0


def test_position_ids_from_mask_gap_in_middle():
    # a finished row during sampling: [prompt | tokens | masked pad | ...] keeps counting real tokens only
    mask = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    assert position_ids_from_mask(mask)[0, [1, 2, 4]].tolist() == [0, 1, 2]


def test_masked_mean_ignores_inf_in_masked_positions():
    x = torch.tensor([[1.0, 2.0, NEG_INF], [3.0, NEG_INF, NEG_INF], [NEG_INF, float("nan"), 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    per_row = masked_mean(x, mask, dim=-1)
    assert torch.isfinite(per_row).all()
    assert per_row.tolist() == [1.5, 3.0, 5.0]
    naive = sum(v for v, m in zip(x.flatten().tolist(), mask.flatten().tolist(), strict=True) if m) / int(mask.sum())
    assert masked_mean(x, mask).item() == pytest.approx(naive)  # (1 + 2 + 3 + 5) / 4
    assert masked_sum(x, mask).item() == 11.0


def test_masked_mean_empty_row_is_zero_and_gradient_finite():
    x = torch.tensor([[NEG_INF, NEG_INF], [2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[0, 0], [1, 1]])
    out = masked_mean(x, mask, dim=-1)
    assert out.tolist() == [0.0, 3.0]
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.tolist() == [[0.0, 0.0], [0.5, 0.5]]


def test_last_true_index_rows_including_none():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_true_index(mask).tolist() == [2, -1, 3, 1]
    assert last_true_index(mask.bool()).tolist() == [2, -1, 3, 1]


# --- KL estimators --------------------------------------------------------------------------------------
def test_kl_penalty_estimators_hand_computed():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])  # d = [0.5, -1.0, 0.0]
    assert kl_penalty(lp, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert kl_penalty(lp, ref, "k2").tolist() == pytest.approx([0.125, 0.5, 0.0])
    expected_k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]  # [0.10653, 0.71828, 0]
    assert kl_penalty(lp, ref, "k3").tolist() == pytest.approx(expected_k3, abs=1e-6)
    assert kl_penalty(lp, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])  # default k1


def test_kl_penalty_k2_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    assert (kl_penalty(lp, ref, "k2") >= 0).all()
    assert (kl_penalty(lp, ref, "k1") < 0).any()


def test_kl_penalty_k1_k3_expectations_equal_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):  # unbiased: E_p[k] = KL(p || q), computed exactly over the support
        assert float((p * kl_penalty(p.log(), q.log(), est)).sum()) == pytest.approx(kl, rel=1e-12)


def test_kl_penalty_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


# --- per-token rewards ----------------------------------------------------------------------------------
def test_per_token_rewards_score_on_last_real_token_only():
    lp = torch.tensor([[-1.0, -2.0, -0.5, NEG_INF], [-0.1, -0.2, -0.3, -0.4], [NEG_INF] * 4])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -3.0], [-0.1, -0.4, -0.1, -0.9], [-1.0] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 7.0])
    r = per_token_rewards(lp, ref, scores, mask, beta=0.1)
    expected = [
        [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0, 0.0],
        [0.0, -0.1 * 0.2, -0.1 * -0.2, -0.1 * 0.5 - 1.0],
        [0.0, 0.0, 0.0, 0.0],  # empty response: no token carries its score
    ]
    assert r.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert torch.isfinite(r).all()
    assert r.dtype == torch.float32


def test_per_token_rewards_k3_and_beta_zero():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[1, 1]])
    r = per_token_rewards(lp, ref, torch.tensor([1.0]), mask, beta=0.5, estimator="k3")
    k3 = [math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]
    assert r.tolist()[0] == pytest.approx([-0.5 * k3[0], -0.5 * k3[1] + 1.0], abs=1e-6)
    r0 = per_token_rewards(lp, ref, torch.tensor([1.0]), mask, beta=0.0)
    assert r0.tolist() == [[0.0, 1.0]]


def test_per_token_rewards_sum_equals_score_minus_beta_kl():
    g = torch.Generator().manual_seed(1)
    lp, ref = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]])
    scores = torch.tensor([0.3, -0.7, 1.1, 2.0])
    r = per_token_rewards(lp, ref, scores, mask, beta=0.2)
    expected = scores - 0.2 * masked_sum(lp - ref, mask, dim=-1)
    assert torch.allclose(r.sum(-1), expected, atol=1e-6)


# --- log-probs ------------------------------------------------------------------------------------------
def test_logprobs_from_logits_matches_naive_log_softmax_at_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    T = 0.7
    got = logprobs_from_logits(logits, ids, temperature=T)
    for b in range(2):
        for t in range(3):
            z = logits[b, t].double() / T
            naive = z[ids[b, t]] - torch.logsumexp(z, 0)
            assert got[b, t].item() == pytest.approx(naive.item(), abs=1e-5)


def test_logprobs_from_logits_suppressed_ids_are_neg_inf_and_renormalised():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5]).expand(1, 4, 4)  # the same row at 4 positions
    lp = logprobs_from_logits(logits, torch.tensor([[0, 1, 2, 3]]), suppress_ids=[0, 3])[0]  # id t at position t
    assert lp[0].item() == NEG_INF and lp[3].item() == NEG_INF
    z = torch.tensor([2.0, 3.0])
    assert lp[1:3].tolist() == pytest.approx((z - torch.logsumexp(z, 0)).tolist(), abs=1e-6)
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_logprobs_from_logits_half_precision_input_gives_fp32():
    logits = torch.randn(1, 2, 5).half()
    out = logprobs_from_logits(logits, torch.tensor([[1, 4]]))
    assert out.dtype == torch.float32


# --- ranking loss ---------------------------------------------------------------------------------------
def test_ranking_pair_indices_order():
    assert pair_indices(2) == ([0], [1])
    assert pair_indices(3) == ([0, 0, 1], [1, 2, 2])
    assert len(pair_indices(4)[0]) == 6


def test_ranking_loss_k2_is_minus_logsigmoid_of_difference():
    scores = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    expected = (-logsig(1.5) - logsig(-1.0)) / 2
    assert ranking_loss(scores).item() == pytest.approx(expected, abs=1e-6)
    assert ranking_loss(scores[:1]).item() == pytest.approx(0.2014133, abs=1e-6)  # -log sigmoid(1.5)


def test_ranking_loss_k3_is_mean_of_its_three_pairs():
    scores = torch.tensor([[3.0, 1.0, 0.0]])  # pairs (0,1): 2, (0,2): 3, (1,2): 1
    expected = -(logsig(2.0) + logsig(3.0) + logsig(1.0)) / 3
    assert expected == pytest.approx(0.1629259, abs=1e-6)
    assert ranking_loss(scores).item() == pytest.approx(expected, abs=1e-6)


def test_ranking_loss_each_prompt_counts_once():
    a, b = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    both = ranking_loss(torch.cat([a, b]))
    assert both.item() == pytest.approx((ranking_loss(a).item() + ranking_loss(b).item()) / 2, abs=1e-6)


def test_ranking_loss_margins_shift_difference():
    scores = torch.tensor([[2.0, 0.5]])
    assert ranking_loss(scores, torch.tensor([[0.5]])).item() == pytest.approx(-logsig(1.0), abs=1e-6)
    margins3 = torch.tensor([[1.0, 0.0, 2.0]])
    expected = -(logsig(3.0 - 1.0 - 1.0) + logsig(3.0 - 0.0) + logsig(1.0 - 0.0 - 2.0)) / 3
    assert ranking_loss(torch.tensor([[3.0, 1.0, 0.0]]), margins3).item() == pytest.approx(expected, abs=1e-6)
    # a margin makes the loss larger for a correctly ordered pair
    assert ranking_loss(scores, torch.tensor([[1.0]])) > ranking_loss(scores)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ranking_loss_equal_scores_is_ln2(k):
    assert ranking_loss(torch.full((4, k), 0.37)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_ranking_loss_gradient_direction():
    scores = torch.zeros(1, 2, requires_grad=True)
    ranking_loss(scores).backward()
    assert scores.grad[0].tolist() == pytest.approx([-0.5, 0.5])  # raise the better, lower the worse


def test_pair_accuracy_strict():
    assert pair_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])) == 0.5


# --- Llama 2 reward combination -------------------------------------------------------------------------
def test_llama2_combine_picks_safety_when_flagged_or_unsafe():
    threshold_logit = math.log(LLAMA2_SAFETY_THRESHOLD / (1 - LLAMA2_SAFETY_THRESHOLD))  # -1.7346
    helpful = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    safety = torch.tensor([5.0, -2.0, -1.0, threshold_logit + 0.03, threshold_logit - 0.03])
    flagged = torch.tensor([True, False, False, False, False])
    out = llama2_combine(helpful, safety, flagged)
    # flagged -> safety; sigmoid(-2) = 0.119 < 0.15 -> safety; sigmoid(-1) = 0.269 -> helpful;
    # just above the threshold -> helpful; just below -> safety
    assert out.tolist() == pytest.approx([5.0, -2.0, 3.0, 4.0, threshold_logit - 0.03])


def test_llama2_combine_custom_threshold_and_int_flags():
    out = llama2_combine(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0, 0]), threshold=0.6)
    assert out.tolist() == [0.0, 0.0]  # sigmoid(0) = 0.5 < 0.6
    out = llama2_combine(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1, 0]))
    assert out.tolist() == [0.0, 1.0]


# --- parity on a tiny Llama -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm():
    cfg = tiny_llama_config(32, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, hidden_size=32,
                            num_layers=2, num_heads=4, max_positions=64)
    return new_causal_lm(cfg, seed=0)


def _pack(prompts: list[list[int]], responses: list[list[int]], prompt_width: int | None = None):
    """[prompt left-padded to P | response right-padded to T] rows and their mask."""
    P = prompt_width or max(len(p) for p in prompts)
    T = max(len(r) for r in responses)
    ids = torch.full((len(prompts), P + T), PAD)
    mask = torch.zeros((len(prompts), P + T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        mask[i, P - len(p) : P] = 1
        ids[i, P : P + len(r)] = torch.tensor(r)
        mask[i, P : P + len(r)] = 1
    return ids, mask, P


@torch.no_grad()
def test_sequence_logprobs_padding_invariant(tiny_lm):
    prompts = [[BOS, 5, 6], [BOS, 7, 8, 9, 10]]
    responses = [[11, 12, 13, EOS], [14, EOS]]
    kw = dict(temperature=0.7, suppress_ids=(PAD, BOS))
    alone = []
    for p, r in zip(prompts, responses, strict=True):
        ids, mask, P = _pack([p], [r])
        assert mask.all()  # no padding at all
        alone.append(sequence_logprobs(tiny_lm, ids, mask, P, **kw)[0])
    for width in (None, 8):  # padded to the longest prompt, and with extra left padding
        ids, mask, P = _pack(prompts, responses, prompt_width=width)
        batch = sequence_logprobs(tiny_lm, ids, mask, P, **kw)
        assert batch.shape == (2, 4)
        assert torch.allclose(batch[0], alone[0], atol=1e-5)
        assert torch.allclose(batch[1, :2], alone[1], atol=1e-5)
    assert torch.isfinite(alone[0]).all() and (alone[0] < 0).all()


@torch.no_grad()
def test_sequence_logprobs_equals_naive_full_forward(tiny_lm):
    ids, mask, P = _pack([[BOS, 5, 6, 7]], [[8, 9, EOS]])
    lp = sequence_logprobs(tiny_lm, ids, mask, P, temperature=1.3)
    logits = tiny_lm(input_ids=ids).logits[0].double() / 1.3
    naive = [float(torch.log_softmax(logits[t - 1], -1)[ids[0, t]]) for t in range(P, ids.shape[1])]
    assert lp[0].tolist() == pytest.approx(naive, abs=1e-5)


@torch.no_grad()
def test_sample_logprobs_equal_sequence_logprobs_at_temperature(tiny_lm):
    T = 0.7
    suppress = (PAD, BOS)
    prompts = [[BOS, 5], [BOS, 6, 7, 8], [BOS, 9, 10], [BOS, 3, 4, 5, 6, 7]]
    P = max(len(p) for p in prompts)
    p_ids = torch.full((len(prompts), P), PAD)
    p_mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        p_ids[i, P - len(p) :] = torch.tensor(p)
        p_mask[i, P - len(p) :] = 1
    # make EOS likely so some rows finish early and others run to the cap
    head = tiny_lm.get_output_embeddings().weight
    saved = head[EOS].clone()
    head[EOS] = saved * 3
    try:
        s = sample(tiny_lm, p_ids, p_mask, 12, eos_token_id=EOS, pad_token_id=PAD, temperature=T,
                   suppress_ids=suppress, generator=torch.Generator().manual_seed(0))
        ids = torch.cat([p_ids, s.response_ids], 1)
        mask = torch.cat([p_mask, s.response_mask], 1)
        lp = sequence_logprobs(tiny_lm, ids, mask, P, temperature=T, suppress_ids=suppress)
    finally:
        head[EOS] = saved
    m = s.response_mask.bool()
    assert torch.allclose(torch.where(m, lp, 0.0), s.logprobs, atol=1e-5)
    assert (s.logprobs[~m] == 0).all()
    assert (s.response_ids[~m] == PAD).all()
    assert not torch.isin(s.response_ids[m], torch.tensor(suppress)).any()
    # the EOS of a finished row is its last real token; unfinished rows fill the cap
    for row in range(len(prompts)):
        n = int(s.lengths[row])
        assert bool(s.finished[row]) == (s.response_ids[row, n - 1].item() == EOS)
        if not s.finished[row]:
            assert n == s.response_ids.shape[1]
    assert s.finished.any(), "expected at least one row to finish (seeded)"


def test_pack_rows_moves_real_tokens_to_the_front_and_trims():
    from rlhf_zoo.ops.logprobs import pack_rows

    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [0, 8, 9, 4, 0, 0], [3, 2, 1, 4, 5, 6]])
    mask = (ids != 0).long()
    mask[2] = torch.tensor([1, 1, 1, 1, 0, 0])  # ids where the mask is 0 are padding, whatever their value
    packed, pmask, start = pack_rows(ids, mask)
    assert start.tolist() == [2, 1, 0]
    assert pmask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert packed[pmask.bool()].tolist() == [5, 6, 7, 8, 9, 4, 3, 2, 1, 4]


def test_packed_response_logprobs_equal_the_padded_layout(exact_task):
    """response_logprobs runs on packed rows; the log-probs must be those of [left-padded prompt |
    right-padded response] rows, token for token."""
    from rlhf_zoo.models import load_policy
    from rlhf_zoo.ops.logprobs import response_logprobs, sequence_logprobs

    model = load_policy(exact_task.path / "sft")
    pairs = exact_task.dataset("pairs")
    p_ids, p_mask = exact_task.encode_prompts(pairs["prompt"][:32], "cpu")
    r_ids, r_mask = exact_task.encode_responses(pairs["chosen"][:32], max_len=exact_task.max_new_tokens, device="cpu")
    packed = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, 0.7, exact_task.suppress_ids)
    padded = sequence_logprobs(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1],
                               0.7, exact_task.suppress_ids)
    padded = torch.where(r_mask.bool(), padded, torch.zeros(()))
    assert torch.allclose(packed, padded, atol=1e-6) and (packed[r_mask.bool()] < 0).all()
