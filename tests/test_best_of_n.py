"""best-of-n: exactly N candidates per prompt, grouped by prompt, deterministic tie-break, exact KL."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_zoo.evaluation import space_scores
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.runner import run
from rlhf_zoo_envs.tasks import exact as E
from rlhf_zoo_plugins.best_of_n import BestOfNPolicy, kl_bound


class RecordingEnv:
    """Stands in for the ResponseGen vector env: records what it is asked and scores by a given rule."""

    def __init__(self, task, n_rows, score_fn):
        self.task, self.n_rows, self.score_fn = task, n_rows, score_fn
        self.indices = None

    def reset(self, options):
        self.indices = list(options["prompt_indices"])
        prompts = [self.task.prompts("eval")[i] for i in self.indices]
        self.prompt_ids, self.prompt_mask = self.task.encode_prompts(prompts)

    def step_tensors(self, response_ids, response_mask, logprobs):
        assert response_ids.shape[0] == self.n_rows
        return {"scores": self.score_fn(response_ids, response_mask)}

    def close(self):
        pass


def test_best_of_n_samples_n_per_prompt_grouped_and_breaks_ties_by_draw_order(exact_task):
    envs = []

    def make_env(n_rows, split):
        assert split == "eval"
        envs.append(RecordingEnv(exact_task, n_rows, lambda ids, mask: torch.zeros(ids.shape[0])))  # all tie
        return envs[-1]

    n = 5
    policy = BestOfNPolicy(exact_task.load_policy(), n=n, make_env=make_env)
    prompts = exact_task.prompts("eval")[:3]
    gen = torch.Generator().manual_seed(0)
    p_ids, p_mask, best = policy.sample(exact_task, prompts, max_new_tokens=4, temperature=1.0, generator=gen)
    assert envs[0].indices == [0] * n + [1] * n + [2] * n  # exactly N per prompt, grouped by prompt
    # with every score tied, the first draw of each group is returned
    gen = torch.Generator().manual_seed(0)
    _, _, cand = ModelPolicy(policy.model).sample(exact_task, [p for p in prompts for _ in range(n)],
                                                  max_new_tokens=4, temperature=1.0, generator=gen)
    assert torch.equal(best.response_ids, cand.response_ids[::n])
    assert exact_task.decode(p_ids, p_mask) == prompts


def test_best_of_n_picks_highest_score(exact_task):
    def make_env(n_rows, split):
        # score = number of tokens: the longest candidate of each group must win (first one on ties)
        return RecordingEnv(exact_task, n_rows, lambda ids, mask: mask.sum(-1).float())

    policy = BestOfNPolicy(exact_task.load_policy(), n=8, make_env=make_env)
    prompts = exact_task.prompts("eval")
    gen = torch.Generator().manual_seed(1)
    _, _, best = policy.sample(exact_task, prompts, max_new_tokens=4, temperature=1.0, generator=gen)
    gen = torch.Generator().manual_seed(1)
    _, _, cand = ModelPolicy(policy.model).sample(exact_task, [p for p in prompts for _ in range(8)],
                                                  max_new_tokens=4, temperature=1.0, generator=gen)
    lengths = cand.response_mask.sum(-1).view(len(prompts), 8)
    assert torch.equal(best.response_mask.sum(-1), lengths.max(-1).values)


def test_best_of_n_run_on_exact_reports_exact_kl_within_bound(exact_task, tmp_path):
    summary = run("best-of-n", task="exact", out=tmp_path, device="cpu", options={"n": 4}, progress=False)
    ref = E.policy_logprobs(exact_task.load_policy(), exact_task, exact_task.prompts("eval"), exact_task.space)
    scores = space_scores(exact_task, exact_task.reward_function(), exact_task.missing_eos_penalty, torch.device("cpu"))
    bon = E.best_of_n_logprobs(ref, scores, 4)
    assert summary["kl_to_ref"] == pytest.approx(float(E.kl(bon, ref).mean()), rel=1e-9)
    assert summary["kl_to_ref"] <= kl_bound(4) + 1e-9
    assert summary["kl_bound"] == pytest.approx(kl_bound(4))
    assert summary["gold_reward"] == pytest.approx(float(E.expected(bon, exact_task.exact_rewards).mean()))
    assert summary["gold_reward"] > summary["baseline_gold_reward"]
    assert summary["frontier_efficiency"] <= 1.0 + 1e-9  # nothing beats the optimal frontier
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_best_of_n_quick_beats_sft_on_sentiment(tmp_path):
    summary = run("best-of-n", task="sentiment", preset="quick", out=tmp_path, device="cpu", progress=False)
    assert summary["gold_reward"] > summary["baseline_gold_reward"] + 0.3
    assert summary["proxy_reward"] > summary["baseline_proxy_reward"]
    assert summary["kl_to_ref"] == pytest.approx(kl_bound(8))
    for key in ("algorithm", "task", "seed", "gold_reward", "proxy_reward", "kl_to_ref", "baseline_gold_reward",
                "wall_seconds", "tokens_per_second", "peak_memory_mb"):
        assert key in summary
    assert summary["tokens_per_second"] > 0
