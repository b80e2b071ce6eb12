"""The supervised loops on tiny models: SFT rows and loss, reward-model training on a separable toy
ranking set, and reading reward scores at the last real token."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_zoo.models import (
    new_causal_lm,
    new_reward_model,
    reward_model_from_policy,
    reward_scores,
    tiny_llama_config,
)
from rlhf_zoo.training import (
    LMRow,
    RankingRow,
    collate_lm,
    lm_loss,
    lm_row,
    ranking_accuracy,
    train_lm,
    train_reward_model,
)

PAD, BOS, EOS = 0, 1, 2
VOCAB = 32


def config(pad: int = PAD):
    return tiny_llama_config(VOCAB, pad_token_id=pad, bos_token_id=BOS, eos_token_id=EOS, hidden_size=32,
                             num_layers=2, num_heads=4, max_positions=64)


@pytest.fixture(scope="module")
def tiny_lm():
    return new_causal_lm(config(), seed=0)


# --- SFT rows and loss ----------------------------------------------------------------------------------
def test_lm_row_masks_the_prompt():
    row = lm_row([BOS, 5, 6], [7, EOS])
    assert row == LMRow([BOS, 5, 6, 7, EOS], [False, False, False, True, True])
    assert lm_row([], [7]).loss_mask == [True]
    assert lm_row([BOS, 5], []).loss_mask == [False, False]


def test_collate_lm_right_pads():
    batch = collate_lm([lm_row([BOS, 5], [6, EOS]), lm_row([BOS], [EOS])], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[BOS, 5, 6, EOS], [BOS, EOS, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]


@torch.no_grad()
def test_lm_loss_equals_naive_completion_nll(tiny_lm):
    rows = [lm_row([BOS, 5, 6], [7, 8, EOS]), lm_row([BOS, 9], [10, EOS]), lm_row([BOS, 3, 4, 5, 6], [EOS])]
    batch = collate_lm(rows, pad_id=PAD)
    got = lm_loss(tiny_lm, batch).item()
    nll = []
    for r in rows:  # each row alone, unpadded
        ids = torch.tensor([r.ids])
        logp = torch.log_softmax(tiny_lm(input_ids=ids).logits[0].double(), -1)
        nll += [-float(logp[t - 1, r.ids[t]]) for t in range(1, len(r.ids)) if r.loss_mask[t]]
    assert len(nll) == 3 + 2 + 1
    assert got == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert got == pytest.approx(math.log(VOCAB), rel=0.2)  # an untrained model is near uniform


@torch.no_grad()
def test_lm_loss_suppressed_ids_renormalise(tiny_lm):
    batch = collate_lm([lm_row([BOS, 5], [6, EOS])], pad_id=PAD)
    plain = lm_loss(tiny_lm, batch).item()
    suppressed = lm_loss(tiny_lm, batch, suppress_ids=(PAD, BOS)).item()
    assert math.isfinite(suppressed) and suppressed < plain  # mass moved off two ids never targeted


def test_train_lm_lowers_completion_loss():
    model = new_causal_lm(config(), seed=1)
    rows = [lm_row([BOS, p], [p + 10, p + 11, EOS]) for p in range(3, 9)]
    batch = collate_lm(rows, pad_id=PAD)
    with torch.no_grad():
        before = lm_loss(model, batch).item()
    losses = train_lm(model, rows, pad_id=PAD, steps=40, batch_size=6, lr=1e-2, seed=0, progress=False)
    with torch.no_grad():
        after = lm_loss(model, batch).item()
    assert len(losses) == 40
    assert losses[0] == pytest.approx(before, abs=1e-5)  # step 1 sees the untrained model on every row
    assert after < 0.3 * before
    assert not model.training  # left in eval mode


# --- reward model ---------------------------------------------------------------------------------------
def _toy_rankings(n: int, seed: int) -> tuple[list[RankingRow], list[list[float]]]:
    """K = 3 responses per prompt ranked by a marker token: 21 (best) > 23 > 22 (worst)."""
    g = torch.Generator().manual_seed(seed)
    groups, gold = [], []
    for _ in range(n):
        prompt = [BOS, *torch.randint(3, 20, (3,), generator=g).tolist()]
        filler = torch.randint(3, 20, (2,), generator=g).tolist()
        responses = [[21, *filler, EOS], [23, *filler, EOS], [filler[0], 22, EOS]]
        groups.append(RankingRow(prompt, responses, [0.0, 0.0, 0.0]))
        gold.append([1.0, 0.5, 0.0])
    return groups, gold


def test_train_reward_model_learns_separable_rankings():
    train, _ = _toy_rankings(96, seed=0)
    held, gold = _toy_rankings(32, seed=1)
    model = reward_model_from_policy(new_causal_lm(config(), seed=0))
    assert ranking_accuracy(model, held, gold, PAD) == 0.0  # zero head: every score ties, no pair is right
    losses = train_reward_model(model, train, pad_id=PAD, steps=40, batch_size=16, lr=3e-3, seed=0,
                                progress=False)
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero head: all scores 0
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(2)
    assert ranking_accuracy(model, held, gold, PAD) > 0.8


def test_ranking_accuracy_skips_gold_ties():
    held, _ = _toy_rankings(4, seed=2)
    model = reward_model_from_policy(new_causal_lm(config(), seed=0))
    with torch.no_grad():
        model.score.weight.copy_(torch.randn_like(model.score.weight))
    gold_best_first = [[1.0, 0.5, 0.0]] * 4
    gold_reversed = [[0.0, 0.5, 1.0]] * 4
    acc, rev = ranking_accuracy(model, held, gold_best_first, PAD), ranking_accuracy(model, held, gold_reversed, PAD)
    assert acc + rev == pytest.approx(1.0)  # no score ties: each pair is right under exactly one order
    assert ranking_accuracy(model, held, [[1.0, 1.0, 1.0]] * 4, PAD) == 0.0  # no countable pair


def test_train_reward_model_rejects_mixed_k():
    groups = [RankingRow([BOS], [[5, EOS], [6, EOS]], [0.0]), RankingRow([BOS], [[5, EOS], [6, EOS], [7, EOS]], [0.0] * 3)]
    model = reward_model_from_policy(new_causal_lm(config(), seed=0))
    with pytest.raises(ValueError, match=r"same number of responses K; found K in \[2, 3\]"):
        train_reward_model(model, groups, pad_id=PAD, steps=1, batch_size=2, lr=1e-3, seed=0, progress=False)


def test_reward_model_from_policy_copies_trunk_and_zeroes_head(tiny_lm):
    rm = reward_model_from_policy(tiny_lm)
    assert torch.equal(rm.base_model.embed_tokens.weight, tiny_lm.base_model.embed_tokens.weight)
    assert (rm.score.weight == 0).all()
    ids = torch.tensor([[BOS, 5, 6, EOS]])
    assert reward_scores(rm, ids, torch.ones_like(ids)).tolist() == [0.0]


def test_reward_model_from_policy_copy_is_independent_and_take_trunk_shares(tiny_lm):
    """The default copies the trunk (training the RM leaves the policy alone); take_trunk moves the policy's
    own modules in (no second copy). Both: attention as the policy's, every parameter materialised."""
    copy_rm = reward_model_from_policy(tiny_lm)
    assert copy_rm.base_model.embed_tokens.weight.data_ptr() != tiny_lm.base_model.embed_tokens.weight.data_ptr()
    assert copy_rm.config._attn_implementation == tiny_lm.config._attn_implementation == "eager"
    assert not any(p.is_meta for p in copy_rm.parameters())
    policy = new_causal_lm(config(), seed=0)
    policy.config._attn_implementation = "sdpa"
    taken = reward_model_from_policy(policy, take_trunk=True)
    assert taken.base_model is policy.base_model and taken.config._attn_implementation == "sdpa"
    assert sum(p.numel() for p in taken.parameters()) == sum(p.numel() for p in policy.base_model.parameters()) + 32


def groups_of(seed: int, shape: list[tuple[int, tuple[int, ...]]]) -> list[RankingRow]:
    g = torch.Generator().manual_seed(seed)
    return [RankingRow(torch.randint(3, VOCAB, (p,), generator=g).tolist(),
                       [torch.randint(3, VOCAB, (r,), generator=g).tolist() for r in rs], [0.5] * (len(rs) * (len(rs) - 1) // 2))
            for p, rs in shape]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_scores_and_gradients_equal_whole_rows(attn):
    """Prompts of 1-9 tokens, responses of 1-7: scoring K responses off one prompt forward gives the
    whole-row scores and the same gradient for every parameter (float64, so rounding cannot hide a
    wrong mask or position)."""
    from rlhf_zoo.training import _score_groups

    policy = new_causal_lm(config(), seed=4)
    policy.config._attn_implementation = attn
    rm = reward_model_from_policy(policy).double()
    torch.nn.init.normal_(rm.score.weight, generator=torch.Generator().manual_seed(0))
    groups = groups_of(5, [(5, (3, 7, 1)), (1, (4, 4, 2)), (9, (1, 5, 6))])
    results = []
    for share in (False, True):
        scores = _score_groups(rm, groups, PAD, share_prompt=share)
        grads = torch.autograd.grad((scores * torch.arange(1.0, 10.0, dtype=scores.dtype).view(3, 3)).sum(),
                                    list(rm.parameters()))
        results.append((scores.detach(), grads))
    (a, ga), (b, gb) = results
    assert a.abs().max() > 1.0  # a non-trivial head
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * float(x.abs().max()) + 1e-12)


def test_reward_model_training_same_with_and_without_shared_prompt():
    """Twenty steps of the ranking loss: the loss curves agree to float rounding (fp32)."""
    groups = groups_of(6, [(4 + i % 5, (2 + i % 3, 5, 3)) for i in range(16)])
    curves = []
    for share in (False, True):
        rm = reward_model_from_policy(new_causal_lm(config(), seed=7))
        curves.append(train_reward_model(rm, groups, pad_id=PAD, steps=20, batch_size=4, lr=1e-3, seed=0,
                                         progress=False, share_prompt=share))
    assert curves[0][0] == pytest.approx(math.log(2) * 1.0, rel=1e-6)  # zero head: every pair at log 2
    assert curves[1] == pytest.approx(curves[0], rel=1e-4, abs=1e-5)
    assert curves[0][-1] < curves[0][0]


def test_adamw_is_fused_where_it_can_be_and_matches_the_loop():
    from rlhf_zoo.training import adamw

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    start = [p.detach().clone() for p in a]
    fused, loop = adamw(a, lr=1e-2), adamw(b, lr=1e-2, fused=False)
    assert fused.param_groups[0]["fused"] is True and not loop.param_groups[0].get("fused")
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        grads = [torch.randn(50, generator=g) for _ in a]
        for p, q, gr in zip(a, b, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        fused.step()
        loop.step()
    assert max(float((p.detach() - p0).abs().max()) for p, p0 in zip(a, start, strict=True)) > 0.1  # it moved
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- reward scores at the last real token ---------------------------------------------------------------
@torch.no_grad()
def test_reward_scores_same_alone_and_in_right_padded_batch():
    rm = new_reward_model(config(), seed=3)
    short, long = [BOS, 5, 6, 7, EOS], [BOS, 8, 9, 10, 11, 12, EOS]
    alone = [reward_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in (short, long)]
    batch = collate_lm([lm_row(short, []), lm_row(long, [])], pad_id=PAD)
    both = reward_scores(rm, batch["input_ids"], batch["attention_mask"])
    assert both.dtype == torch.float32 and both.shape == (2,)
    assert both.tolist() == pytest.approx(alone, abs=1e-5)
    assert alone[0] != pytest.approx(alone[1], abs=1e-3)  # the test can tell rows apart


@torch.no_grad()
def test_reward_scores_left_padded_batch_same():
    rm = new_reward_model(config(), seed=3)
    seq = [BOS, 5, 6, 7, EOS]
    alone = reward_scores(rm, torch.tensor([seq]), torch.ones(1, 5, dtype=torch.long)).item()
    ids = torch.tensor([[PAD, PAD, *seq], [BOS, 9, 9, 9, 9, 9, EOS]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    assert reward_scores(rm, ids, mask)[0].item() == pytest.approx(alone, abs=1e-5)


@torch.no_grad()
def test_reward_scores_pad_equal_eos_reads_last_real_token():
    rm = new_reward_model(config(pad=EOS), seed=4)
    short, long = [BOS, 5, 6, EOS], [BOS, 8, 9, 10, 11, EOS]
    alone = reward_scores(rm, torch.tensor([short]), torch.ones(1, 4, dtype=torch.long)).item()
    batch = collate_lm([lm_row(short, []), lm_row(long, [])], pad_id=EOS)
    assert batch["input_ids"][0].tolist() == [BOS, 5, 6, EOS, EOS, EOS]  # padding looks like EOS
    both = reward_scores(rm, batch["input_ids"], batch["attention_mask"])
    assert both[0].item() == pytest.approx(alone, abs=1e-5)
    # reading at the token before the first EOS (a pad-id search) would give a different score
    before_eos = reward_scores(rm, torch.tensor([short[:-1]]), torch.ones(1, 3, dtype=torch.long)).item()
    assert alone != pytest.approx(before_eos, abs=1e-4)


def test_train_reward_model_use_margin_first_loss():
    margins = [1.0, 2.0, 0.5]
    groups = [RankingRow([BOS, 5], [[6, EOS], [7, EOS], [8, EOS]], margins)] * 4
    model = reward_model_from_policy(new_causal_lm(config(), seed=0))
    with_margin = train_reward_model(model, groups, pad_id=PAD, steps=1, batch_size=4, lr=1e-3, seed=0,
                                     use_margin=True, progress=False)
    expected = sum(math.log1p(math.exp(m)) for m in margins) / 3  # zero head: -log sigmoid(0 - m)
    assert with_margin[0] == pytest.approx(expected, abs=1e-6)
