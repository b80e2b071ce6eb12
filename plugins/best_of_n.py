"""``best-of-n``: sample N responses per prompt from the SFT policy and return the one the reward
model scores highest (Stiennon et al. 2020; Nakano et al. 2021, WebGPT). Nothing is trained.

Implementation details:
  1. the N candidates go through the ``ResponseGen`` vector environment in one batch: one reference
     forward and one reward forward score them, exactly as any algorithm's rollouts are scored;
  2. selection is by the environment's score (reward minus the missing-EOS penalty); ties go to the
     first candidate drawn (deterministic);
  3. KL(best-of-N || pi_ref) has the analytic form log N - (N - 1) / N (exact for distinct scores, an
     upper bound otherwise; Beirami et al. 2024). On ``exact`` the best-of-N distribution itself is
     computed (`rlhf_zoo_envs.tasks.exact.best_of_n_logprobs`) and its KL is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_zoo.config import AlgoConfig, check_positive, option
from rlhf_zoo.evaluation import space_scores
from rlhf_zoo.generation import Samples
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm


@dataclass(frozen=True)
class BestOfNConfig(AlgoConfig):
    presets = {"quick": {"n": 8, "eval_prompts": 64, "eval_samples": 2},
               "smoke": {"n": 2, "eval_prompts": 2, "eval_samples": 1}}

    n: int = option(16, "Candidates sampled per prompt.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "n")


def kl_bound(n: int) -> float:
    """log N - (N - 1) / N."""
    from rlhf_zoo_envs.tasks.exact import best_of_n_kl_bound

    return best_of_n_kl_bound(n)


@dataclass
class BestOfNPolicy(ModelPolicy):
    n: int = 1
    make_env: Callable[..., Any] | None = None
    reward_fn: Any = None
    missing_eos_penalty: float = 0.0
    logprobs_are_own: bool = False

    def sample(self, task: Any, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, Samples]:
        # 1) N candidates per prompt, scored in one batch through the environment
        index = {p: i for i, p in enumerate(task.prompts("eval"))}
        missing = [p for p in prompts if p not in index]
        if missing:
            raise ValueError(f"best-of-n answers evaluation prompts only; not among them: {missing[:3]}")
        env = self.make_env(len(prompts) * self.n, split="eval")
        env.reset(options={"prompt_indices": [index[p] for p in prompts for _ in range(self.n)]})
        cand = super().sample(task, [p for p in prompts for _ in range(self.n)], max_new_tokens=max_new_tokens,
                              temperature=temperature, generator=generator)[2]
        out = env.step_tensors(cand.response_ids, cand.response_mask, cand.logprobs)
        # 2) the best of each group of N; argmax returns the first maximum, so ties go to the first draw
        best = out["scores"].view(len(prompts), self.n).argmax(-1)  # (B,)
        rows = torch.arange(len(prompts), device=best.device) * self.n + best
        pick = Samples(cand.response_ids[rows], cand.response_mask[rows], cand.logprobs[rows], cand.finished[rows])
        p_ids, p_mask = env.prompt_ids[rows], env.prompt_mask[rows]
        env.close()
        return p_ids, p_mask, pick

    def kl_to_ref(self) -> float:
        return kl_bound(self.n)

    def exact_logprobs(self, task: Any, temperature: float = 1.0) -> torch.Tensor:
        from rlhf_zoo_envs.tasks.exact import best_of_n_logprobs

        ref = super().exact_logprobs(task, temperature)
        device = next(self.model.parameters()).device
        return best_of_n_logprobs(ref, space_scores(task, self.reward_fn, self.missing_eos_penalty, device), self.n)

    def extra_metrics(self) -> dict[str, float]:
        return {"n": self.n, "kl_bound": kl_bound(self.n)}


def train(ctx, cfg: BestOfNConfig) -> BestOfNPolicy:
    return BestOfNPolicy(ctx.reference, n=cfg.n, make_env=ctx.make_env, reward_fn=ctx.reward_fn,
                         missing_eos_penalty=ctx.task.missing_eos_penalty)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("best-of-n", BestOfNConfig, train,
                       "Sample N per prompt, return the reward model's best (inference-time; nothing trained).",
                       kind="inference"))
