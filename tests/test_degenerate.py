"""Degenerate batches give finite losses and finite gradients: a batch of one, an empty response, all-equal
rewards, a row with every token masked. Each loss is checked on the values it should take, not only
on being finite."""

from __future__ import annotations

import math

import pytest
import torch

from plugins.dpo import dpo_loss
from plugins.rrhf import rrhf_loss
from rlhf_zoo.ops import masked_mean, masked_sum, per_token_rewards, response_logprobs
from rlhf_zoo.ops.advantages import gae, whiten
from rlhf_zoo.ops.policy_losses import clipped_policy_loss, clipped_value_loss
from rlhf_zoo.ops.ranking import ranking_loss
from rlhf_zoo.training import collate_lm, lm_loss, lm_row


def _finite_with_grads(loss: torch.Tensor, *leaves: torch.Tensor) -> None:
    assert torch.isfinite(loss), loss
    loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def _ppo_losses(logprobs, old, ref, values, scores, mask):
    """The PPO chain as the plugin runs it: rewards, GAE, whitening, clipped losses."""
    rewards = per_token_rewards(old, ref, scores, mask, beta=0.1)
    adv, returns = gae(rewards, values.detach(), mask, 1.0, 1.0)
    adv = whiten(adv, mask)
    pl = clipped_policy_loss(logprobs, old, adv, mask, 0.2)
    vl, _ = clipped_value_loss(values, values.detach(), returns, mask, 0.2)
    return pl, vl, adv


@pytest.mark.parametrize("case", ["batch_of_one", "empty_response", "all_equal_rewards", "all_masked"])
def test_ppo_losses_are_finite_on_degenerate_batches(case):
    B, T = (1, 4) if case == "batch_of_one" else (3, 4)
    mask = torch.ones(B, T)
    scores = torch.tensor([1.0, -2.0, 0.5])[:B]
    if case == "empty_response":
        mask[1] = 0
    if case == "all_equal_rewards":
        scores = torch.full((B,), 0.7)
    if case == "all_masked":
        mask.zero_()
    old = torch.full((B, T), -1.0)
    ref = torch.full((B, T), -1.2)
    logprobs = old.clone().requires_grad_(True)
    values = torch.zeros(B, T, requires_grad=True)
    pl, vl, adv = _ppo_losses(logprobs, old, ref, values, scores, mask)
    _finite_with_grads(pl.loss + vl, logprobs, values)
    assert torch.all(adv[mask == 0] == 0)  # nothing leaks into masked positions
    if case == "all_masked":
        assert pl.loss.item() == 0 and vl.item() == 0
    if case == "batch_of_one":  # one sequence: advantages are centred (mean 0) over its tokens
        assert abs(masked_mean(adv, mask).item()) < 1e-6
    # at ratio 1 the clipped surrogate is -mean(advantage) over counted tokens
    assert pl.loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-6)


def test_dpo_loss_batch_of_one_and_equal_logprobs():
    lp = torch.tensor([-3.0], requires_grad=True)
    loss, rc, rr = dpo_loss(lp, lp.detach().clone(), torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    _finite_with_grads(loss, lp)
    assert loss.item() == pytest.approx(math.log(2))  # h = 0: -log sigmoid(0)
    for loss_type, expected in (("ipo", (1 / 0.2) ** 2), ("hinge", 1.0)):
        loss, _, _ = dpo_loss(lp, lp.detach(), lp.detach(), lp.detach(), 0.1, loss_type)
        assert loss.item() == pytest.approx(expected)


def test_ranking_loss_all_equal_scores_is_log2():
    scores = torch.zeros(2, 4, requires_grad=True)
    loss = ranking_loss(scores)
    _finite_with_grads(loss, scores)
    assert loss.item() == pytest.approx(math.log(2))


def test_rrhf_loss_empty_candidate_all_equal_scores_and_all_masked():
    logprobs = torch.full((2, 3, 4), -1.0, requires_grad=True)
    mask = torch.ones(2, 3, 4)
    mask[0, 1] = 0  # an empty candidate
    scores = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5]])  # second prompt: all equal (no pairs)
    loss, stats = rrhf_loss(logprobs, mask, scores)
    _finite_with_grads(loss, logprobs)
    # prompt 0: p = (-1, 0 [empty: masked mean 0], -1); pairs r_i < r_j: (1,0), (1,2), (0,2):
    # relu(p_i - p_j) = 1, 1, 0 -> rank 2; prompt 1: no pair, rank 0. ft: -mean log-prob of the best = 1 each.
    assert stats["rank_loss"].item() == pytest.approx(1.0)
    assert stats["ft_loss"].item() == pytest.approx(1.0)
    assert stats["pairs"].item() == 3
    empty = torch.zeros(1, 2, 4)
    loss, _ = rrhf_loss(logprobs[:1, :2], empty, torch.tensor([[1.0, 2.0]]))
    assert loss.item() == 0


def test_lm_loss_with_an_all_masked_row_and_response_logprobs_of_an_empty_response(exact_task):
    from rlhf_zoo.models import load_policy

    model = load_policy(exact_task.path / "sft", "cpu")
    bos, eos = exact_task.tokenizer.bos_token_id, exact_task.eos_token_id
    rows = [lm_row([bos, 5, 6], [4, eos]), lm_row([bos, 5], [])]  # the second row counts no token
    batch = collate_lm(rows, exact_task.pad_token_id)
    both = lm_loss(model, batch)
    only_first = lm_loss(model, collate_lm(rows[:1], exact_task.pad_token_id))
    assert torch.isfinite(both) and both.item() == pytest.approx(only_first.item(), rel=1e-5)
    only_empty = lm_loss(model, collate_lm(rows[1:], exact_task.pad_token_id))
    assert only_empty.item() == 0
    pairs = exact_task.dataset("pairs")
    p_ids, p_mask = exact_task.encode_prompts(pairs["prompt"][:2], "cpu")
    r_ids, r_mask = exact_task.encode_responses(pairs["chosen"][:2], max_len=exact_task.max_new_tokens, device="cpu")
    r_mask[1] = 0  # an empty response
    lp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, 1.0, exact_task.suppress_ids)
    seq = masked_sum(lp, r_mask, dim=-1)
    assert torch.isfinite(seq).all() and seq[0].item() < 0 and seq[1].item() == 0
