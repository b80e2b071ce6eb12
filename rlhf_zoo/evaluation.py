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

With ``with_samples=True`` the result also holds ``samples``: the rows the run writes to
samples/iter-N.jsonl (`sample_rows`, `exact_rows`), whose per-response figures average to the figures above.
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
             missing_eos_penalty: float, device: torch.device, with_samples: bool = False) -> dict[str, Any]:
    """Evaluate ``policy``; returns the summary figures and ``generated_tokens`` (and ``samples``, the
    per-response rows, with ``with_samples``)."""
    if hasattr(task, "space"):
        return _evaluate_exact(policy, task, reference=reference, reward_fn=reward_fn, temperature=temperature,
                               beta=beta, missing_eos_penalty=missing_eos_penalty, device=device,
                               with_samples=with_samples)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    p_ids, p_mask, s = policy.sample(task, flat, max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
    out: dict[str, Any] = {}
    scores = terms = None
    if reward_fn is not None:
        scores = sequence_scores(reward_fn, task, p_ids, p_mask, s.response_ids, s.response_mask, missing_eos_penalty)
        out["proxy_reward"] = float(scores.mean())
        out["scores"] = scores.cpu().tolist()
        terms = getattr(reward_fn, "last_terms", None)
        if terms and len(terms) > 1:
            out["reward_terms"] = {k: float(v.mean()) for k, v in terms.items()}
        else:
            terms = None
    kl = policy.kl_to_ref()
    per_response_kl = None
    if kl is None:
        ids = torch.cat([p_ids, s.response_ids], 1)
        mask = torch.cat([p_mask, s.response_mask], 1)
        ref_lp = sequence_logprobs(reference, ids, mask, p_ids.shape[1], 1.0, task.suppress_ids)
        per_response_kl = masked_sum(s.logprobs - ref_lp, s.response_mask, dim=-1)
        kl = float(per_response_kl.mean())
    responses = task.decode(s.response_ids, s.response_mask)
    out["kl_to_ref"] = kl
    gold = None
    if task.has_gold:
        gold = task.gold(flat, responses)
        out["gold_reward"] = float(np.mean(gold[task.objectives[0]]))
        for name in task.objectives[1:]:
            out[f"gold_{name}"] = float(np.mean(gold[name]))
    out["response_length"] = float(s.response_mask.sum(-1).float().mean())
    out["eos_rate"] = float(s.finished.float().mean())
    out["generated_tokens"] = int(s.response_mask.sum())
    out["examples"] = [{"prompt": p, "response": r} for p, r in list(zip(flat, responses, strict=True))[:: samples_per_prompt][:5]]
    if with_samples:
        out["samples"] = sample_rows(
            flat, responses, samples_per_prompt, scores=out.get("scores"), terms=terms,
            gold={k: gold[k] for k in task.objectives} if gold is not None else None, objectives=task.objectives,
            kl=None if per_response_kl is None else per_response_kl.cpu().tolist(),
            lengths=s.response_mask.sum(-1).cpu().tolist(), finished=s.finished.cpu().tolist())
    return out


def sample_rows(prompts: list[str], responses: list[str], samples_per_prompt: int, *, scores: list[float] | None,
                terms: dict[str, torch.Tensor] | None, gold: dict[str, Any] | None, objectives: Any,
                kl: list[float] | None, lengths: list[int], finished: list[bool]) -> list[dict[str, Any]]:
    """One row per sampled response (samples/iter-N.jsonl): ``prompt``, ``sample`` (its index among the
    prompt's samples), ``response``, ``proxy_score`` (what the environment pays: reward minus the missing-EOS
    penalty; where the world has a reward), ``reward_terms`` (each ``--reward`` term, where there are
    several), ``gold_score`` (the first gold objective) and ``gold_<objective>`` for the others (where the world
    has gold), ``kl`` (sum over the response's tokens of log pi - log pi_ref; None when the policy's KL is
    not estimated from its samples, as best-of-N's analytic bound), ``response_length`` (tokens, EOS
    included) and ``eos``. Their means are summary.json's proxy_reward, gold_reward, kl_to_ref, ..."""
    rows = []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        row: dict[str, Any] = {"prompt": prompt, "sample": i % samples_per_prompt, "response": response}
        if scores is not None:
            row["proxy_score"] = float(scores[i])
        if terms is not None:
            row["reward_terms"] = {k: float(v[i]) for k, v in terms.items()}
        if gold is not None:
            row["gold_score"] = float(gold[objectives[0]][i])
            row.update({f"gold_{name}": float(gold[name][i]) for name in objectives[1:]})
        row["kl"] = None if kl is None else float(kl[i])
        row["response_length"] = int(lengths[i])
        row["eos"] = bool(finished[i])
        rows.append(row)
    return rows


def _evaluate_exact(policy: Any, task: Any, *, reference: torch.nn.Module, reward_fn: Any, temperature: float,
                    beta: float, missing_eos_penalty: float, device: torch.device,
                    with_samples: bool = False) -> dict[str, Any]:
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
    out = {"gold_reward": float(exact.expected(lp, gold).mean()), "proxy_reward": reward, "kl_to_ref": kl,
           "kl_to_optimum": float(exact.kl(lp, opt).mean()), "frontier_efficiency": efficiency,
           "frontier_reward_at_kl": best, "beta_of_optimum": beta, "generated_tokens": 0}
    if with_samples:
        out["samples"] = exact_rows(task, lp, ref_lp, scores, gold)
    return out


EXACT_TOP = 5  # responses listed per prompt in the ``exact`` task's samples


def exact_rows(task: Any, lp: torch.Tensor, ref_lp: torch.Tensor, scores: torch.Tensor,
               gold: torch.Tensor) -> list[dict[str, Any]]:
    """The ``exact`` task's samples: nothing is sampled, the evaluation is exact, so one row per prompt with
    the expectations under the policy over every response: ``proxy_score`` and ``gold_score`` (expected
    reward), ``kl`` (KL(pi || pi_ref) for the prompt, exact), ``response_length`` (expected tokens, EOS
    included) and ``eos`` (probability of ending with EOS); ``response`` and ``probability`` are the most
    probable response, and ``top`` lists the ``EXACT_TOP`` most probable ones with their probability,
    proxy and gold score and ``log_ratio`` (log pi - log pi_ref). The means over the rows are summary.json's
    proxy_reward, gold_reward and kl_to_ref."""
    from rlhf_zoo_envs.tasks import exact

    space = task.space
    lengths = space.mask.sum(-1).double()  # (R,)
    ends = ((space.ids == task.eos_token_id) & space.mask.bool()).any(-1).double()
    p = lp.exp()
    rows = []
    for x, prompt in enumerate(task.prompts("eval")):
        top = torch.argsort(p[x], descending=True)[:EXACT_TOP].tolist()
        rows.append({
            "prompt": prompt, "response": space.texts[top[0]], "probability": float(p[x, top[0]]),
            "proxy_score": float(exact.expected(lp[x], scores[x])), "gold_score": float(exact.expected(lp[x], gold[x])),
            "kl": float(exact.kl(lp[x : x + 1], ref_lp[x : x + 1])[0]),
            "response_length": float((p[x] * lengths).sum()), "eos": float((p[x] * ends).sum()),
            "top": [{"response": space.texts[r], "probability": float(p[x, r]), "proxy_score": float(scores[x, r]),
                     "gold_score": float(gold[x, r]), "log_ratio": float(lp[x, r] - ref_lp[x, r])} for r in top]})
    return rows


def space_scores(task: Any, reward_fn: Any, penalty: float, device: torch.device) -> torch.Tensor:
    """The environment's score of every enumerated response of the ``exact`` task.  -> (X, R) fp64"""
    space = task.space
    rows = []
    for p in task.prompts("eval"):
        p_ids, p_mask = task.encode_prompts([p] * len(space.texts), device)
        rows.append(sequence_scores(reward_fn, task, p_ids, p_mask, space.ids.to(device), space.mask.to(device),
                                    penalty).double().cpu())
    return torch.stack(rows)
