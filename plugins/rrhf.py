"""``rrhf``: Rank Responses to align language models with Human Feedback (Yuan et al. 2023,
arXiv:2304.05302).

For each prompt x, k candidates y_1..y_k are scored by the reward model (r_i) and by the policy itself,
with the LENGTH-NORMALISED log-likelihood (Eq. 1)

    p_i = 1/|y_i| * sum_t log pi(y_i,t | x, y_i,<t)                       (a mean log-prob, <= 0)

The policy is trained to order its scores like the reward model does, and to imitate the best candidate:

    L_rank = sum_{r_i < r_j} max(0, p_i - p_j)                            (Eq. 2)
    L_ft   = -1/|y_b| * sum_t log pi(y_b,t | x, y_b,<t),  b = argmax_i r_i  (Eq. 3, as a token mean)
    L      = L_rank + ft_weight * L_ft                                      (Eq. 4, with ft_weight = 1)

Implementation details:
  1. candidates are sampled from the CURRENT policy (online; the paper mostly samples the initial one) and
     scored through the ``ResponseGen`` vector environment: the reward model's score minus the missing-EOS
     penalty. With ``dataset_candidates`` the responses of one of the task's rankings of that prompt (SFT
     samples the labelers ranked) are added, scored by the same environment (the labelers' order is unused);
  2. p_i uses the log-probs at the sampling temperature with the task's suppressed ids, as everywhere;
  3. only strictly ordered pairs count: equal scores (e.g. two identical responses) make no pair;
     L_rank is summed over the pairs of a prompt (as in the paper) and averaged over prompts;
  4. the best candidate is the first of the highest score (``argmax`` returns the first maximum);
  5. there is no reference model and no KL term in the loss (the point of RRHF: one to two models);
     the environment still computes the KL to the reference, which is logged;
  6. AdamW at a constant learning rate, gradients clipped to norm 1; ``epochs`` full-batch steps on each
     iteration's candidates; logged statistics are those of the first step (before this batch's updates);
  7. defaults, tuned on ``sentiment`` and ``hh`` (seeds 0-2). With online samples the hinge term (a sum
     over C(k,2) pairs) dominates at the paper's ft_weight = 1: on ``sentiment`` it learns little at lr
     1e-4 and degenerates at lr >= 3e-4 (KL to SFT > 10, gold below the SFT's); on ``hh`` it collapses
     at lr 1e-4. ft_weight = 10 is stable; the gain then comes mostly from the fine-tuning term. With no
     KL term the budget (lr x steps) is the only brake on reward hacking: on ``hh`` the policy collapses
     to one generic answer the proxy RM likes (KL > 8, gold below SFT) at lr >= 1.5e-4 for 40
     iterations, while ``sentiment`` would gain more from lr 2e-4 (gold +0.85 instead of +0.4).
     ``dataset_candidates`` is off by default: it lowered the gold gain over SFT (``sentiment`` +0.35 vs
     +0.43, ``hh`` +0.05 vs +0.29, means of seeds 0-2) and at lr >= 2e-4 collapsed ``sentiment`` on 1 seed
     in 3: the task's responses are SFT samples the policy soon outscores, so the hinge keeps lowering
     the likelihood of fluent SFT text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf_zoo.config import AlgoConfig, check_positive, option
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.ops import masked_mean, masked_sum, response_logprobs
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.rollout import collect, draw_prompts
from rlhf_zoo.training import optimizer_step

MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class RRHFConfig(AlgoConfig):
    presets = {"quick": {"eval_prompts": 64, "eval_samples": 2},  # training already takes seconds
               "smoke": {"iterations": 2, "prompts_per_iteration": 2, "candidates": 2, "epochs": 1,
                         "eval_prompts": 2, "eval_samples": 1}}

    candidates: int = option(4, "Candidates k sampled from the policy per prompt.")
    prompts_per_iteration: int = option(16, "Prompts per iteration (each gets k candidates).")
    iterations: int = option(40, "Sample-score-train iterations (no KL term: more drifts further from SFT).")
    epochs: int = option(2, "Full-batch gradient steps on each iteration's candidates.")
    learning_rate: float = option(1e-4, "AdamW learning rate (constant).")
    ft_weight: float = option(10.0, "Weight of the cross-entropy on the reward model's best candidate (paper: 1, "
                                    "which the hinge destabilises with online samples).")
    dataset_candidates: bool = option(False, "Also rank the task's dataset responses for the prompt (prompts "
                                             "are then drawn among those the dataset has).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "candidates", "prompts_per_iteration", "iterations", "epochs", "learning_rate")
        if self.ft_weight < 0:
            raise ConfigError(f"ft_weight must be >= 0, got {self.ft_weight}")
        if self.candidates < 2 and not self.dataset_candidates:
            raise ConfigError(f"ranking needs >= 2 candidates per prompt, got candidates={self.candidates}")


def rrhf_loss(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
              ft_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RRHF loss of B prompts with K candidates each.

    Args:
        logprobs: (B, K, T) per-token log-probs of the candidates under the policy.
        mask: (B, K, T) 1 on real response tokens.
        scores: (B, K) reward-model scores r_i.
        ft_weight: weight of the cross-entropy on the best candidate.

    Returns:
        the loss (mean over prompts) and detached statistics: rank_loss, ft_loss, correct_pairs (fraction of
        ordered pairs the model already orders strictly like the reward model), pairs (their number).
    """
    p = masked_mean(logprobs, mask, dim=-1)  # (B, K) Eq. 1, length-normalised
    ordered = scores[:, :, None] < scores[:, None, :]  # (B, K, K) [b, i, j]: r_i < r_j; ties: no pair
    rank = masked_sum(torch.relu(p[:, :, None] - p[:, None, :]), ordered, dim=(1, 2))  # (B,) Eq. 2
    best = scores.argmax(-1)  # (B,) first maximum on ties
    rows = torch.arange(scores.shape[0], device=scores.device)
    ft = -masked_mean(logprobs[rows, best], mask[rows, best], dim=-1)  # (B,) Eq. 3
    loss = (rank + ft_weight * ft).mean()  # Eq. 4
    pairs = ordered.sum()
    correct = (ordered & (p[:, :, None] < p[:, None, :])).sum()
    stats = {"rank_loss": rank.mean().detach(), "ft_loss": ft.mean().detach(),
             "correct_pairs": (correct / pairs.clamp(min=1)).detach(), "pairs": pairs}
    return loss, stats


def dataset_responses(task: Any) -> dict[str, list[list[str]]]:
    """prompt -> the response lists of the task's rankings of that prompt (first reward model's data)."""
    ds = task.dataset(f"rankings_{task.reward_models[0]}")
    out: dict[str, list[list[str]]] = {}
    for prompt, responses in zip(ds["prompt"], ds["responses"], strict=True):
        out.setdefault(prompt, []).append(list(responses))
    return out


def train(ctx: Any, cfg: RRHFConfig) -> ModelPolicy:
    task, model = ctx.task, ctx.policy
    n, k = cfg.prompts_per_iteration, cfg.candidates
    rng = np.random.default_rng(ctx.seed)
    prompts = task.prompts("train")
    # 1) the prompt pool: all training prompts, or those the dataset has responses for
    pool = np.arange(len(prompts))
    if cfg.dataset_candidates:
        data = dataset_responses(task)
        pool = np.array([i for i, p in enumerate(prompts) if p in data])
        if not len(pool):
            raise ConfigError(f"dataset_candidates: no training prompt of task {task.name!r} is in its dataset")
        m = len(next(iter(data.values()))[0])
        data_env = ctx.make_env(n * m)
    env = ctx.make_env(n * k)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.learning_rate,
                            weight_decay=0.0)
    ctx.track("optimizer", opt)
    ctx.track("prompt_rng", rng)
    for it in ctx.iterations(cfg.iterations):
        # 2) k candidates per prompt from the current policy, scored by the environment (rows grouped)
        idx = pool[draw_prompts(rng, len(pool), n, 1)]
        ro = collect(ctx, env, model, np.repeat(idx, k))
        ids, mask, scores = ro.response_ids.view(n, k, -1), ro.response_mask.view(n, k, -1), ro.scores.view(n, k)
        kl = masked_sum(ro.logprobs - ro.ref_logprobs, ro.response_mask, dim=-1).mean()
        # 3) optionally the dataset's responses to the same prompts, scored by the same environment
        if cfg.dataset_candidates:
            texts = [r for i in idx for r in data[prompts[i]][rng.integers(len(data[prompts[i]]))]]
            data_env.reset(options={"prompt_indices": np.repeat(idx, m)})
            d_ids, d_mask = task.encode_responses(texts, ctx.max_new_tokens, ctx.device)
            with ctx.phase("score"):  # no behaviour log-probs: only the scores are used
                d = data_env.step_tensors(d_ids, d_mask, torch.zeros(d_ids.shape, device=ctx.device))
            ids = torch.cat([ids, d["response_ids"].view(n, m, -1)], 1)  # (n, k + m, T)
            mask = torch.cat([mask, d["response_mask"].view(n, m, -1)], 1)
            scores = torch.cat([scores, d["scores"].view(n, m)], 1)
        K = ids.shape[1]
        p_ids = ro.prompt_ids[::k].repeat_interleave(K, 0)  # (n * K, P)
        p_mask = ro.prompt_mask[::k].repeat_interleave(K, 0)
        ids, mask = ids.reshape(n * K, -1), mask.reshape(n * K, -1)  # (n * K, T)
        # 4) rank + fine-tune steps on this batch
        model.train()
        with ctx.phase("train"):
            for epoch in range(cfg.epochs):
                lp = response_logprobs(model, p_ids, p_mask, ids, mask, cfg.temperature, task.suppress_ids)
                loss, stats = rrhf_loss(lp.view(n, K, -1), mask.view(n, K, -1), scores, cfg.ft_weight)
                optimizer_step(loss, opt, MAX_GRAD_NORM, "rrhf loss")
                ctx.counters["trained_tokens"] += int(p_mask.sum() + mask.sum())
                if epoch == 0:
                    first = {"loss": loss.detach(), **stats}
        model.eval()
        # 5) log
        ctx.log(it, {**first, "mean_score": ro.scores.mean(), "best_score": scores.max(-1).values.mean(),
                     "kl": kl, "response_length": ro.response_mask.sum(-1).float().mean()})
    env.close()
    if cfg.dataset_candidates:
        data_env.close()
    return ModelPolicy(model)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("rrhf", RRHFConfig, train,
                       "RRHF: rank k policy samples by the reward model (hinge on length-normalised log-probs) "
                       "plus cross-entropy on the best."))
