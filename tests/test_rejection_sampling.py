"""rejection-sampling: K per prompt grouped by prompt, best-of-K selection with a deterministic tie-break,
SFT loss on response tokens only, sampling from the latest policy, one round moves every parameter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rlhf_zoo_plugins.rejection_sampling as RS
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.models import load_policy
from rlhf_zoo.rollout import Rollout
from rlhf_zoo.runner import run
from rlhf_zoo.training import collate_lm, lm_loss

TINY = {"prompts_per_round": 8, "k": 4, "epochs": 1.0, "batch_size": 8, "eval_prompts": 3, "eval_samples": 1}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _recorded_run(tmp_path, mode: str, rounds: int = 2) -> dict:
    """Run on ``exact`` with `collect` and `train_lm` wrapped to record what each round saw."""
    rec: dict = {"prompt_index": [], "sampled_state": [], "rollouts": [], "train_rows": [], "train_start": [],
                 "train_end": []}

    def collect(ctx, env, model, prompt_index):
        rec["ctx"] = ctx
        rec["prompt_index"].append(np.asarray(prompt_index).copy())
        rec["sampled_state"].append(_state(model))
        rec["rollouts"].append(real_collect(ctx, env, model, prompt_index))
        return rec["rollouts"][-1]

    def train_lm(model, rows, **kwargs):
        rec["train_rows"].append(list(rows))
        rec["train_start"].append(_state(model))
        losses = real_train_lm(model, rows, **kwargs)
        rec["train_end"].append(_state(model))
        return losses

    real_collect, real_train_lm = RS.collect, RS.train_lm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RS, "collect", collect)
        mp.setattr(RS, "train_lm", train_lm)
        rec["summary"] = run("rejection-sampling", task="exact", out=tmp_path, device="cpu", progress=False,
                             options={**TINY, "rounds": rounds, "mode": mode})
    rec["metrics"] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return rec


@pytest.fixture(scope="module", params=["restart", "continue"])
def recorded(request, tmp_path_factory):
    return request.param, _recorded_run(tmp_path_factory.mktemp(request.param), request.param)


def test_select_best_picks_max_with_first_drawn_tie_break():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2,  # tie between draws 1 and 2: the first (row 1) wins
                           -1.0, -1.0, -1.0, -1.0,  # all tied: the first draw (row 4)
                           3.0, 2.0, 3.0, 1.0,  # tie between draws 0 and 2: row 8
                           0.0, 0.0, 0.0, 7.0])  # clear winner: row 15
    assert RS.select_best(scores, 4).tolist() == [1, 4, 8, 15]
    assert RS.select_best(torch.tensor([2.0, 1.0, 5.0]), 1).tolist() == [0, 1, 2]  # k = 1 keeps everything
    with pytest.raises(ValueError, match="do not split into groups of k = 4"):
        RS.select_best(torch.zeros(6), 4)


def test_config_rejects_non_positive_k():
    with pytest.raises(ConfigError, match="k must be > 0, got 0"):
        RS.RejectionSamplingConfig(k=0)
    with pytest.raises(ConfigError, match="mode must be of type one of"):
        RS.RejectionSamplingConfig(mode="accumulate")


def test_fine_tune_loss_counts_response_tokens_only(exact_task):
    torch.manual_seed(0)
    model = exact_task.load_policy()
    prompts = exact_task.prompts("eval")[:3]
    p_ids, p_mask = exact_task.encode_prompts(prompts)
    pad_col = torch.full((3, 1), exact_task.pad_token_id)
    p_ids, p_mask = torch.cat([pad_col, p_ids], 1), torch.cat([torch.zeros_like(pad_col), p_mask], 1)  # left pad
    words = exact_task.tokenizer.convert_tokens_to_ids(list(exact_task.language.words))
    eos, pad = exact_task.eos_token_id, exact_task.pad_token_id
    r_ids = torch.tensor([[words[0], words[1], eos, pad], [eos, pad, pad, pad], [words[2]] * 4])
    r_mask = (torch.arange(4) < torch.tensor([[3], [1], [4]])).long()  # lengths 3, 1, 4 (the last without EOS)
    zeros = torch.zeros(3, 4)
    rollout = Rollout(p_ids, p_mask, r_ids, r_mask, zeros, zeros, zeros, torch.zeros(3), np.arange(3))
    rows = RS.kept_rows(rollout)
    assert [sum(r.loss_mask) for r in rows] == [3, 1, 4]
    loss = lm_loss(model, collate_lm(rows, pad), exact_task.suppress_ids)
    # naive: each row alone and unpadded, NLL summed over its response tokens, divided by their count
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(3):
            prompt = p_ids[b][p_mask[b].bool()]
            response = r_ids[b][r_mask[b].bool()]
            ids = torch.cat([prompt, response])[None]
            logits = model(input_ids=ids).logits[0].float()  # (L, V)
            logits[:, exact_task.suppress_ids] = float("-inf")
            logp = torch.log_softmax(logits, -1)
            for t, token in enumerate(response.tolist()):
                nll -= logp[len(prompt) + t - 1, token].item()
                count += 1
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)


def test_rounds_sample_exactly_k_per_prompt_grouped(recorded):
    _, rec = recorded
    assert len(rec["prompt_index"]) == 2
    for idx, rollout in zip(rec["prompt_index"], rec["rollouts"], strict=True):
        groups = idx.reshape(TINY["prompts_per_round"], TINY["k"])  # row b*k + j is draw j of prompt b
        assert (groups == groups[:, :1]).all()  # the k rows of a prompt are adjacent
        assert len(set(groups[:, 0].tolist())) == TINY["prompts_per_round"]  # distinct prompts in a round
        assert rollout.scores.shape == (TINY["prompts_per_round"] * TINY["k"],)


def test_rounds_sample_from_latest_policy_and_mode_sets_fine_tune_start(recorded, exact_task):
    mode, rec = recorded
    sft = _state(exact_task.load_policy())
    assert _same(rec["sampled_state"][0], sft)  # round 1 samples from SFT
    assert not _same(rec["sampled_state"][1], sft)  # round 2 from the fine-tuned policy ...
    assert _same(rec["sampled_state"][1], rec["train_end"][0])  # ... exactly the one round 1 produced
    assert _same(rec["train_start"][0], sft)
    n = TINY["prompts_per_round"]
    if mode == "restart":  # round 2 restarts from SFT on the best samples of both rounds
        assert _same(rec["train_start"][1], sft)
        assert [len(r) for r in rec["train_rows"]] == [n, 2 * n]
        assert rec["train_rows"][1][:n] == rec["train_rows"][0]
    else:  # round 2 continues from round 1's policy on its own best samples
        assert _same(rec["train_start"][1], rec["train_end"][0])
        assert [len(r) for r in rec["train_rows"]] == [n, n]


def test_rounds_keep_best_response_per_prompt_and_log_it(recorded):
    _, rec = recorded
    n, k = TINY["prompts_per_round"], TINY["k"]
    for it, (rollout, rows, m) in enumerate(zip(rec["rollouts"], rec["train_rows"], rec["metrics"], strict=True)):
        scores = rollout.scores.view(n, k)
        best = scores.argmax(-1) + torch.arange(n) * k
        kept = RS.kept_rows(rollout.select(best))
        assert rows[-n:] == kept  # this round's rows are each prompt's best response
        assert m["round"] == it + 1
        assert m["score_mean"] == pytest.approx(scores.mean().item(), rel=1e-6)
        assert m["kept_score_mean"] == pytest.approx(scores.max(-1).values.mean().item(), rel=1e-6)
        assert m["kept_score_mean"] >= m["score_mean"]
        assert np.isfinite(m["loss"]) and m["loss"] > 0
    # token counters: every sampled response token, and every token of every trained sequence (1 epoch)
    generated = sum(int(r.response_mask.sum()) for r in rec["rollouts"])
    trained = sum(len(row.ids) for rows in rec["train_rows"] for row in rows)
    assert rec["metrics"][-1]["generated_tokens"] == rec["summary"]["generated_tokens"] == generated
    assert rec["metrics"][-1]["trained_tokens"] == rec["summary"]["trained_tokens"] == trained


def test_one_round_changes_every_parameter_and_keeps_reference(tmp_path, exact_task):
    rec = _recorded_run(tmp_path, "restart", rounds=1)
    sft = exact_task.load_policy()
    trained = load_policy(tmp_path / "policy")
    unchanged = [name for (name, p), q in zip(trained.named_parameters(), sft.parameters(), strict=True)
                 if torch.equal(p, q)]
    assert unchanged == []
    reference = rec["ctx"].reference
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), sft.parameters(), strict=True))
    assert not any(p.requires_grad for p in reference.parameters())
    assert rec["summary"]["baseline_kl_to_ref"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_rejection_sampling_quick_beats_sft_on_sentiment(tmp_path):
    summary = run("rejection-sampling", task="sentiment", preset="quick", seed=0, out=tmp_path, device="cpu",
                  progress=False)
    assert summary["gold_reward"] > summary["baseline_gold_reward"] + 0.5
    assert summary["proxy_reward"] > summary["baseline_proxy_reward"]
    assert 0.0 < summary["kl_to_ref"] < 10.0
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rounds] == [1, 2, 3, 4]
    assert rounds[-1]["score_mean"] > rounds[0]["score_mean"]  # later rounds sample from a better policy
