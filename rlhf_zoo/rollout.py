"""Rollouts through the ``ResponseGen`` vector environment, shared by the online algorithms.

The policy samples (agent side, KV cache); the environment computes reference log-probs, reward-model
scores and the KL-shaped per-token rewards in one batched call (`ResponseGenVectorEnv.step_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf_zoo.errors import NonFiniteError
from rlhf_zoo.generation import sample


@dataclass
class Rollout:
    """One batch of episodes. Tensors (B, T) unless noted; rows of one prompt are adjacent."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # 1 on real response tokens (EOS included)
    logprobs: torch.Tensor  # behaviour policy, at the sampling temperature
    ref_logprobs: torch.Tensor
    rewards: torch.Tensor  # per-token: -beta * kl + score on the last token
    scores: torch.Tensor  # (B,) reward-model score minus the missing-EOS penalty
    prompt_index: np.ndarray  # (B,) index into the split's prompts

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], 1)

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (indices or a boolean mask)."""
        idx = rows.nonzero().squeeze(-1) if rows.dtype == torch.bool else rows
        return Rollout(*(getattr(self, f)[idx] for f in ("prompt_ids", "prompt_mask", "response_ids",
                                                          "response_mask", "logprobs", "ref_logprobs",
                                                          "rewards", "scores")),
                       prompt_index=self.prompt_index[idx.cpu().numpy()])


def draw_prompts(rng: np.random.Generator, n_available: int, n_prompts: int, per_prompt: int = 1) -> np.ndarray:
    """``n_prompts`` distinct prompt indices (with replacement if there are fewer), each repeated
    ``per_prompt`` times consecutively.  -> (n_prompts * per_prompt,)"""
    idx = rng.choice(n_available, size=n_prompts, replace=n_prompts > n_available)
    return np.repeat(idx, per_prompt)


@torch.no_grad()
def collect(ctx: Any, env: Any, model: torch.nn.Module, prompt_index: np.ndarray) -> Rollout:
    """Sample one response per row for the given prompts and score them through ``env``."""
    task = ctx.task
    env.reset(options={"prompt_indices": prompt_index})
    was_training = model.training
    model.eval()
    with ctx.phase("generate"):
        try:
            s = sample(model, env.prompt_ids, env.prompt_mask, ctx.max_new_tokens, eos_token_id=task.eos_token_id,
                       pad_token_id=task.pad_token_id, temperature=ctx.config.temperature,
                       suppress_ids=task.suppress_ids, generator=ctx.sample_generator)
        except RuntimeError as e:  # torch.multinomial refuses NaN probabilities: say which weights are broken
            bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is None:
                raise
            raise NonFiniteError(f"cannot sample: the policy's parameter {bad} is non-finite") from e
    model.train(was_training)
    with ctx.phase("score"):
        out = env.step_tensors(s.response_ids, s.response_mask, s.logprobs)
    bad = ~torch.isfinite(out["scores"])
    if bad.any():
        raise NonFiniteError(f"the reward is non-finite for {int(bad.sum())} of {bad.numel()} responses "
                             f"(first: {out['scores'][bad][0].item()})")
    ctx.counters["generated_tokens"] += int(out["response_mask"].sum())
    return Rollout(env.prompt_ids, env.prompt_mask, out["response_ids"], out["response_mask"], out["logprobs"],
                   out["ref_logprobs"], out["rewards"], out["scores"], np.asarray(prompt_index))
