"""``exact``: a world small enough to enumerate, the correctness yardstick.

Three words, prompts of two words, responses of at most ``MAX_NEW_TOKENS`` tokens: every response to
every prompt can be listed (sequences ending in EOS, plus the cut-off ones of full length), so the
expected reward, KL(pi || pi_ref) and the optimal KL-regularised policy

    pi*_beta(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x)          (DPO paper, Eq. 4)

are computed exactly. The gold reward r(x, y) is the mean of per-(prompt, word) weights drawn from the
task seed, plus a per-response jitter; on this task the environment pays the gold reward itself by
default, so PPO with penalty beta and DPO with beta (preferences drawn by Bradley-Terry at temperature
1 on the same reward) aim at the same pi*_beta.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from rlhf_zoo.ops.logprobs import sequence_logprobs
from rlhf_zoo_envs.tasks.base import Task

WORDS = ("x", "y", "z")
MAX_NEW_TOKENS = 4
JITTER = 0.3


class ExactLanguage:
    words = WORDS
    objectives = ("gold_reward",)

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 7])
        self.prompt_list = [" ".join(p) for p in itertools.product(WORDS, repeat=2)]
        self.weights = {p: dict(zip(WORDS, rng.normal(0.0, 1.0, len(WORDS)), strict=True)) for p in self.prompt_list}
        self._jitter_seed = seed

    def prompt(self, rng: np.random.Generator) -> str:
        return self.prompt_list[rng.integers(len(self.prompt_list))]

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        n = int(rng.integers(0, MAX_NEW_TOKENS))  # 0 .. MAX_NEW_TOKENS - 1 words, then EOS
        return " ".join(str(w) for w in rng.choice(WORDS, n))

    def pretrain_text(self, rng: np.random.Generator) -> str:
        p = self.prompt(rng)
        return f"{p} {self.demonstration(p, rng)}".strip()

    def gold(self, prompt: str, response: str) -> dict[str, float]:
        words = response.split()
        w = self.weights.get(prompt)
        if w is None or any(t not in WORDS for t in words):
            return {"gold_reward": -3.0}
        base = float(np.mean([w[t] for t in words])) if words else 0.0
        jitter_rng = np.random.default_rng([self._jitter_seed, 11, *[WORDS.index(t) + 1 for t in prompt.split()],
                                           0, *[WORDS.index(t) + 1 for t in words]])
        return {"gold_reward": base + JITTER * float(jitter_rng.normal())}


@dataclass
class ResponseSpace:
    """Every response to a prompt: ids (R, T) right-padded, mask (R, T); the same list for every prompt."""

    ids: torch.Tensor
    mask: torch.Tensor
    texts: list[str]


def enumerate_responses(word_ids: list[int], eos_id: int, pad_id: int, max_new_tokens: int) -> ResponseSpace:
    """All sequences of < T words then EOS, and all sequences of exactly T words (cut off, no EOS)."""
    rows, texts = [], []
    for n in range(max_new_tokens + 1):
        for combo in itertools.product(range(len(word_ids)), repeat=n):
            ids = [word_ids[c] for c in combo] + ([eos_id] if n < max_new_tokens else [])
            rows.append(ids)
            texts.append(" ".join(WORDS[c] for c in combo))
    ids = torch.full((len(rows), max_new_tokens), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ResponseSpace(ids, mask, texts)


@torch.no_grad()
def policy_logprobs(model: torch.nn.Module, task, prompts: list[str], space: ResponseSpace,
                    temperature: float = 1.0) -> torch.Tensor:
    """log pi(y|x) of every enumerated response y for every prompt x.  -> (X, R), rows sum to 1 in prob."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        p_ids, p_mask = task.encode_prompts([p] * len(space.texts), device)
        ids = torch.cat([p_ids, space.ids.to(device)], 1)
        mask = torch.cat([p_mask, space.mask.to(device)], 1)
        lp = sequence_logprobs(model, ids, mask, p_ids.shape[1], temperature, task.suppress_ids)
        out.append(torch.where(space.mask.to(device).bool(), lp, 0.0).sum(-1).double().cpu())
    return torch.stack(out)


def optimal_logprobs(ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log pi*_beta = log softmax(log pi_ref + r / beta) per prompt.  (X, R) -> (X, R)"""
    return torch.log_softmax(ref_logprobs + rewards / beta, dim=-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of log-probabilities.  (X, R) -> (X,)"""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def expected(logp: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * values).sum(-1)


def best_of_n_logprobs(ref_logprobs: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Exact distribution of best-of-n sampling from pi_ref with selection by ``scores``.

    With F(s) = P(score <= s) and F-(s) = P(score < s), the best of n draws has a score in the tie group
    of s with probability F(s)^n - F-(s)^n; ties are broken by draw order, so within a group each
    response gets a share proportional to pi_ref.   (X, R) -> (X, R)
    """
    p = ref_logprobs.exp()
    out = torch.zeros_like(p)
    for x in range(p.shape[0]):
        s = scores[x]
        le = (p[x][None, :] * (s[None, :] <= s[:, None])).sum(-1)  # F(s_y)
        lt = (p[x][None, :] * (s[None, :] < s[:, None])).sum(-1)  # F-(s_y)
        group = le - lt  # pi_ref mass of y's tie group
        out[x] = torch.where(group > 0, (le.pow(n) - lt.pow(n)) * p[x] / group.clamp(min=1e-300), 0.0)
    return torch.log(out)


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || ref) <= log n - (n - 1) / n (Stiennon et al. 2020; Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def frontier_reward(ref_logprobs: torch.Tensor, rewards: torch.Tensor, target_kl: float) -> float:
    """Best mean expected reward reachable with mean KL(pi || pi_ref) <= target_kl: pi*_beta with beta
    found by bisection on log beta (mean KL falls as beta grows)."""
    def stats(beta: float) -> tuple[float, float]:
        lp = optimal_logprobs(ref_logprobs, rewards, beta)
        return float(kl(lp, ref_logprobs).mean()), float(expected(lp, rewards).mean())

    lo, hi = math.log(1e-4), math.log(1e4)
    if stats(math.exp(lo))[0] <= target_kl:
        return stats(math.exp(lo))[1]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if stats(math.exp(mid))[0] > target_kl:
            lo = mid
        else:
            hi = mid
    return stats(math.exp(hi))[1]


class ExactTask(Task):
    """The exact world: the environment pays the gold reward; evaluation prompts are all the prompts."""

    env_reward_default = "gold"

    def prompts(self, split: str) -> list[str]:
        return list(self.language.prompt_list) if split == "eval" else super().prompts(split)

    @cached_property
    def space(self) -> ResponseSpace:
        tok = self.tokenizer
        word_ids = [tok.convert_tokens_to_ids(w) for w in WORDS]
        return enumerate_responses(word_ids, tok.eos_token_id, tok.pad_token_id, self.max_new_tokens)

    @cached_property
    def exact_rewards(self) -> torch.Tensor:
        """Gold reward of every (prompt, response).  (X, R) over ``prompts('eval')``."""
        prompts = self.prompts("eval")
        return torch.tensor([[self.language.gold(p, r)["gold_reward"] for r in self.space.texts] for p in prompts],
                            dtype=torch.float64)
