"""Known results on the ``exact`` task, computed exactly over the enumerable response space.

- The optimal frontier: pi*_beta(y|x) prop. to pi_ref(y|x) exp(r(x,y) / beta) (DPO paper, Eq. 4) maximises
  E[r] - beta KL(pi || pi_ref), so its curve (KL(beta), E_{pi*_beta}[r]) over beta bounds the reward any
  policy reaches at that KL; every algorithm's point lies on or below it.
- Best-of-N from pi_ref: KL(pi_bon || pi_ref) <= log N - (N - 1) / N (Stiennon et al. 2020; Beirami et
  al. 2024), and its win rate against a sample of pi_ref, P(s(y_bon) > s(y_ref)) + 1/2 P(tie), is at most
  N / (N + 1): the reference sample is one of N + 1 i.i.d. draws and wins only when it is their best
  (equality when scores never tie; counting ties as 1/2 only lowers the win rate).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlhf_zoo.evaluation import space_scores
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo_envs.tasks import exact

FRONTIER_BETAS = tuple(float(b) for b in np.logspace(-2.5, 2.5, 61))


def reference_logprobs(task: Any) -> torch.Tensor:
    """log pi_ref(y|x) of the task's SFT policy over every (prompt, response).  -> (X, R)"""
    return ModelPolicy(task.load_policy()).exact_logprobs(task)


def selection_scores(task: Any) -> torch.Tensor:
    """What the environment pays for every (prompt, response): the score best-of-N selects by.  -> (X, R)"""
    return space_scores(task, task.reward_function(), task.missing_eos_penalty, torch.device("cpu"))


def frontier_curve(ref_logprobs: torch.Tensor, rewards: torch.Tensor,
                   betas: tuple[float, ...] = FRONTIER_BETAS) -> dict[str, list[float]]:
    """Mean KL(pi*_beta || pi_ref) and mean E_{pi*_beta}[r] over prompts for each beta, by increasing KL,
    starting from pi_ref itself (beta = infinity, written as None)."""
    points: list[tuple[float | None, float, float]] = [(None, 0.0, float(exact.expected(ref_logprobs, rewards).mean()))]
    for beta in sorted(betas, reverse=True):
        opt = exact.optimal_logprobs(ref_logprobs, rewards, beta)
        points.append((beta, float(exact.kl(opt, ref_logprobs).mean()), float(exact.expected(opt, rewards).mean())))
    return {"beta": [p[0] for p in points], "kl": [p[1] for p in points], "reward": [p[2] for p in points]}


def exact_win_rate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor) -> float:
    """P(s(y) > s(y')) + 1/2 P(s(y) = s(y')) with y ~ pi, y' ~ pi_ref independent, averaged over prompts.
    Both distributions are renormalised (a float32 model's probabilities sum to 1 only within ~1e-7, which
    would otherwise put pi against itself at 0.5 + 1e-7).  (X, R) x3 -> float"""
    p, q = logprobs.double().exp(), ref_logprobs.double().exp()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    d = scores[:, :, None] - scores[:, None, :]  # (X, R, R): s(y_i) - s(y_j)
    win = (d > 0).double() + 0.5 * (d == 0).double()
    per_prompt = torch.einsum("xi,xij,xj->x", p, win, q)  # (X,)
    return float(per_prompt.mean())


def best_of_n_check(ref_logprobs: torch.Tensor, scores: torch.Tensor, gold: torch.Tensor, n: int) -> dict[str, Any]:
    """Exact KL, win rate and gold reward of best-of-n (selection by ``scores``) against the known bounds
    and the optimal frontier at the same KL."""
    bon = exact.best_of_n_logprobs(ref_logprobs, scores, n)
    kl = float(exact.kl(bon, ref_logprobs).mean())
    return {"n": n, "kl": kl, "kl_bound": exact.best_of_n_kl_bound(n),
            "win_rate": exact_win_rate(bon, ref_logprobs, scores), "win_rate_bound": n / (n + 1),
            "gold_reward": float(exact.expected(bon, gold).mean()),
            "frontier_gold_reward": exact.frontier_reward(ref_logprobs, gold, kl)}


def exact_checks(task: Any, best_of_n: list[int]) -> dict[str, Any]:
    """The gold-reward frontier of the ``exact`` task and the best-of-N checks for each N given."""
    ref, gold = reference_logprobs(task), task.exact_rewards
    scores = selection_scores(task)
    return {"frontier": frontier_curve(ref, gold), "baseline_gold_reward": float(exact.expected(ref, gold).mean()),
            "best_of_n": [best_of_n_check(ref, scores, gold, n) for n in sorted(set(best_of_n))]}
