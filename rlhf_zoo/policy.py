"""What an algorithm returns: something that answers prompts, and the model to save.

`ModelPolicy` samples from a causal LM (PPO, DPO, ...). Inference-time methods such as best-of-N wrap a
base policy and override `sample` (and, on the ``exact`` task, `exact_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from rlhf_zoo.generation import Samples, sample


@dataclass
class ModelPolicy:
    model: PreTrainedModel

    #: True when `Samples.logprobs` are the log-probs of this policy (so KL can be estimated from them)
    logprobs_are_own: bool = True
    #: figures of the training for summary.json (e.g. the dataset validation report of ``sft``)
    metrics: dict[str, Any] = field(default_factory=dict)

    def sample(self, task: Any, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, Samples]:
        """One response per prompt.  -> prompt ids (B, P), prompt mask (B, P), samples."""
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = task.encode_prompts(prompts, device)
        return prompt_ids, prompt_mask, sample(
            self.model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id=task.eos_token_id,
            pad_token_id=task.pad_token_id, temperature=temperature, suppress_ids=task.suppress_ids,
            generator=generator)

    def exact_logprobs(self, task: Any, temperature: float = 1.0) -> torch.Tensor:
        """log pi(y|x) over the enumerable response space of the ``exact`` task.  -> (X, R)"""
        from rlhf_zoo_envs.tasks.exact import policy_logprobs

        return policy_logprobs(self.model, task, task.prompts("eval"), task.space, temperature)

    def kl_to_ref(self) -> float | None:
        """A known KL to the reference when it cannot be estimated from samples (None: estimate it)."""
        return None

    def extra_metrics(self) -> dict[str, Any]:
        return dict(self.metrics)


@dataclass
class RewardModelResult:
    """What the ``reward-model`` stage returns: the trained model and its measured quality."""

    model: PreTrainedModel
    metrics: dict[str, float]
