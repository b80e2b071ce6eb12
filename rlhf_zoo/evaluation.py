"""Final evaluation of a policy on a task's held-out prompts.

Reported (summary.json):
  gold_reward     mean gold reward (the task's stand-in for human preference, or a user's ``--gold``;
                  never optimised); only where the world has a gold evaluator
  proxy_reward    mean score of the reward the environment pays (the learned RM; gold on ``exact``; the
                  weighted sum of a user's ``--reward`` terms, each term's mean in ``reward_terms``);
                  only where the world has a reward
  kl_to_ref       KL(pi || pi_ref): the mean over samples of sum_t (log pi - log pi_ref), or a value
                  the policy knows (best-of-N's analytic form)
  response_length mean response tokens (EOS included), ``eos_rate`` the share that ended with EOS
On ``exact`` every figure is an exact expectation over all responses, and also:
  kl_to_optimum        KL(pi || pi*_beta), pi*_beta prop. to pi_ref exp(r / beta) (DPO paper, Eq. 4)
  frontier_efficiency  (R - R_ref) / (R*(KL) - R_ref): the share of the best reward gain reachable at
                       the policy's KL that the policy reached
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlhf_zoo.ops.logprobs import sequence_logprobs
from rlhf_zoo.ops.masking import masked_sum
from rlhf_zoo.policy import ModelPolicy


def sequence_scores(reward_fn: Any, task: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, penalty: float) -> torch.Tensor:
    """Score the environment pays each row: reward minus ``penalty`` where the response has no EOS.  -> (B,)"""
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    scores = reward_fn(ids, mask, prompt_ids.shape[1])
    has_eos = ((response_ids == task.eos_token_id) & response_mask.bool()).any(-1)
    return scores - penalty * (~has_eos).float()


@torch.no_grad()
def evaluate(policy: Any, task: Any, *, reference: torch.nn.Module, reward_fn: Any, prompts: list[str],
             samples_per_prompt: int, max_new_tokens: int, temperature: float, seed: int, beta: float,
             missing_eos_penalty: float, device: torch.device) -> dict[str, Any]:
    """Evaluate ``policy``; returns the summary figures and ``generated_tokens``."""
    if hasattr(task, "space"):
        return _evaluate_exact(policy, task, reference=reference, reward_fn=reward_fn, temperature=temperature,
                               beta=beta, missing_eos_penalty=missing_eos_penalty, device=device)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    p_ids, p_mask, s = policy.sample(task, flat, max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
    out: dict[str, Any] = {}
    if reward_fn is not None:
        scores = sequence_scores(reward_fn, task, p_ids, p_mask, s.response_ids, s.response_mask, missing_eos_penalty)
        out["proxy_reward"] = float(scores.mean())
        out["scores"] = scores.cpu().tolist()
        terms = getattr(reward_fn, "last_terms", None)
        if terms and len(terms) > 1:
            out["reward_terms"] = {k: float(v.mean()) for k, v in terms.items()}
    kl = policy.kl_to_ref()
    if kl is None:
        ids = torch.cat([p_ids, s.response_ids], 1)
        mask = torch.cat([p_mask, s.response_mask], 1)
        ref_lp = sequence_logprobs(reference, ids, mask, p_ids.shape[1], 1.0, task.suppress_ids)
        kl = float(masked_sum(s.logprobs - ref_lp, s.response_mask, dim=-1).mean())
    responses = task.decode(s.response_ids, s.response_mask)
    out["kl_to_ref"] = kl
    if task.has_gold:
        gold = task.gold(flat, responses)
        out["gold_reward"] = float(np.mean(gold[task.objectives[0]]))
        for name in task.objectives[1:]:
            out[f"gold_{name}"] = float(np.mean(gold[name]))
    out["response_length"] = float(s.response_mask.sum(-1).float().mean())
    out["eos_rate"] = float(s.finished.float().mean())
    out["generated_tokens"] = int(s.response_mask.sum())
    out["examples"] = [{"prompt": p, "response": r} for p, r in list(zip(flat, responses, strict=True))[:: samples_per_prompt][:5]]
    return out


def _evaluate_exact(policy: Any, task: Any, *, reference: torch.nn.Module, reward_fn: Any, temperature: float,
                    beta: float, missing_eos_penalty: float, device: torch.device) -> dict[str, Any]:
    from rlhf_zoo_envs.tasks import exact

    ref_lp = ModelPolicy(reference).exact_logprobs(task)  # (X, R)
    lp = policy.exact_logprobs(task, temperature)
    scores = space_scores(task, reward_fn, missing_eos_penalty, device)  # (X, R) what the env pays
    gold = task.exact_rewards
    opt = exact.optimal_logprobs(ref_lp, scores, beta)
    kl = float(exact.kl(lp, ref_lp).mean())
    reward, ref_reward = float(exact.expected(lp, scores).mean()), float(exact.expected(ref_lp, scores).mean())
    best = exact.frontier_reward(ref_lp, scores, kl)
    gain = best - ref_reward
    efficiency = (reward - ref_reward) / gain if gain > 1e-9 else 1.0
    return {"gold_reward": float(exact.expected(lp, gold).mean()), "proxy_reward": reward, "kl_to_ref": kl,
            "kl_to_optimum": float(exact.kl(lp, opt).mean()), "frontier_efficiency": efficiency,
            "frontier_reward_at_kl": best, "beta_of_optimum": beta, "generated_tokens": 0}


def space_scores(task: Any, reward_fn: Any, penalty: float, device: torch.device) -> torch.Tensor:
    """The environment's score of every enumerated response of the ``exact`` task.  -> (X, R) fp64"""
    space = task.space
    rows = []
    for p in task.prompts("eval"):
        p_ids, p_mask = task.encode_prompts([p] * len(space.texts), device)
        rows.append(sequence_scores(reward_fn, task, p_ids, p_mask, space.ids.to(device), space.mask.to(device),
                                    penalty).double().cpu())
    return torch.stack(rows)
