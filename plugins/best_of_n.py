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

Serving a prompt file: on your own model, ``zoo run best-of-n --model M --reward R --prompts F`` also
answers every row of F (read and validated as the world reads it, `rlhf_zoo.data.load_prompts`: a bad row
stops the run naming it) and writes ``responses.jsonl`` in the run directory, one line per row of F in
file order: ``prompt`` (as given: a text or a message list), ``response`` (the chosen candidate's text),
``score`` (the score it was chosen by: the environment's reward minus the missing-EOS penalty, the maximum
over its N candidates), ``n``, ``response_length`` (tokens, EOS included) and ``eos``. The candidates are
drawn with the run's generator at ``--temperature``, ``SERVE_CANDIDATES`` at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_zoo.config import AlgoConfig, check_positive, option
from rlhf_zoo.evaluation import space_scores
from rlhf_zoo.generation import Samples
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm

RESPONSES_FILE = "responses.jsonl"
SERVE_CANDIDATES = 256  # candidates sampled and scored in one batch when serving a prompt file


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
        p_ids, p_mask, pick, _ = self.best_of(task, prompts, "eval", max_new_tokens=max_new_tokens,
                                              temperature=temperature, generator=generator)
        return p_ids, p_mask, pick

    def best_of(self, task: Any, prompts: Sequence[str], split: str, *, max_new_tokens: int, temperature: float,
                generator: torch.Generator | None,
                env: Any = None) -> tuple[torch.Tensor, torch.Tensor, Samples, torch.Tensor]:
        """The best of N candidates for each prompt of the world's ``split`` (``eval``, or ``all``), scored
        through ``env`` (one of ``len(prompts) * n`` rows over ``split``, kept open; default: a new one).
        -> prompt ids (B, P), prompt mask (B, P), the chosen samples, their scores (B,)"""
        # 1) N candidates per prompt, scored in one batch through the environment
        table = [*task.prompts("train"), *task.prompts("eval")] if split == "all" else task.prompts(split)
        index = {p: i for i, p in reversed(list(enumerate(table)))}  # a text's first row
        missing = [p for p in prompts if p not in index]
        if missing:
            raise ValueError(f"best-of-n answers the world's {split} prompts only; not among them: {missing[:3]}")
        own_env = env is None
        env = self.make_env(len(prompts) * self.n, split=split) if own_env else env
        env.reset(options={"prompt_indices": [index[p] for p in prompts for _ in range(self.n)]})
        cand = super().sample(task, [p for p in prompts for _ in range(self.n)], max_new_tokens=max_new_tokens,
                              temperature=temperature, generator=generator)[2]
        out = env.step_tensors(cand.response_ids, cand.response_mask, cand.logprobs)
        # 2) the best of each group of N; argmax returns the first maximum, so ties go to the first draw
        best = out["scores"].view(len(prompts), self.n).argmax(-1)  # (B,)
        rows = torch.arange(len(prompts), device=best.device) * self.n + best
        pick = Samples(cand.response_ids[rows], cand.response_mask[rows], cand.logprobs[rows], cand.finished[rows])
        p_ids, p_mask = env.prompt_ids[rows], env.prompt_mask[rows]
        if own_env:
            env.close()
        return p_ids, p_mask, pick, out["scores"][rows]

    def kl_to_ref(self) -> float:
        return kl_bound(self.n)

    def exact_logprobs(self, task: Any, temperature: float = 1.0) -> torch.Tensor:
        from rlhf_zoo_envs.tasks.exact import best_of_n_logprobs

        ref = super().exact_logprobs(task, temperature)
        device = next(self.model.parameters()).device
        return best_of_n_logprobs(ref, space_scores(task, self.reward_fn, self.missing_eos_penalty, device), self.n)

    def extra_metrics(self) -> dict[str, Any]:
        return {**self.metrics, "n": self.n, "kl_bound": kl_bound(self.n)}


def train(ctx, cfg: BestOfNConfig) -> BestOfNPolicy:
    policy = BestOfNPolicy(ctx.reference, n=cfg.n, make_env=ctx.make_env, reward_fn=ctx.reward_fn,
                           missing_eos_penalty=ctx.task.missing_eos_penalty)
    if ctx.setup.get("prompts") and ctx.dist.is_main:
        served = serve(ctx, cfg, policy, ctx.setup["prompts"])
        policy.metrics.update({"responses_file": RESPONSES_FILE, "responses": served})
    return policy


def served_prompts(task: Any, source: Any, max_new_tokens: int) -> list[tuple[str, Any]]:
    """(prompt text, prompt as given) for every row of a prompt file (or a list of prompts), in order, read
    and validated as the world reads its ``--prompts`` (`rlhf_zoo.data`)."""
    from rlhf_zoo.data import RowPolicy, length_caps, load_prompts, numbered, validate_prompts

    if isinstance(source, (str, Path)):
        return load_prompts(source, RowPolicy(), task, max_new_tokens)[0]
    rows = [r if isinstance(r, dict) else {"prompt": r} for r in source]
    return validate_prompts(numbered(rows), RowPolicy(), source="prompts", tokenizer=task.tokenizer,
                            caps=length_caps(task, max_new_tokens), render=getattr(task, "render_messages", None))[0]


def serve(ctx, cfg: BestOfNConfig, policy: BestOfNPolicy, source: Any) -> int:
    """Answer every prompt of ``source`` with the best of ``cfg.n`` candidates; write them to
    ``ctx.out / RESPONSES_FILE`` (module docstring). Returns the number of rows written."""
    task = ctx.task
    prompts = served_prompts(task, source, ctx.max_new_tokens)
    per_batch = max(1, SERVE_CANDIDATES // cfg.n)
    envs: dict[int, Any] = {}  # one environment per batch size (the last batch may be smaller)
    with ctx.phase("serve"), open(ctx.out / RESPONSES_FILE, "w") as f:
        for start in range(0, len(prompts), per_batch):
            part = prompts[start : start + per_batch]
            if len(part) not in envs:
                envs[len(part)] = ctx.make_env(len(part) * cfg.n, split="all")
            _, _, pick, scores = policy.best_of(task, [text for text, _ in part], "all",
                                                max_new_tokens=ctx.max_new_tokens, temperature=cfg.temperature,
                                                generator=ctx.sample_generator, env=envs[len(part)])
            responses = task.decode(pick.response_ids, pick.response_mask)
            for (_, given), response, score, length, eos in zip(part, responses, scores.tolist(),
                                                                  pick.lengths.tolist(), pick.finished.tolist(),
                                                                  strict=True):
                f.write(json.dumps({"prompt": given, "response": response, "score": float(score), "n": cfg.n,
                                    "response_length": int(length), "eos": bool(eos)}) + "\n")
    for env in envs.values():
        env.close()
    return len(prompts)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("best-of-n", BestOfNConfig, train,
                       "Sample N per prompt, return the reward model's best (inference-time; nothing trained).",
                       kind="inference"))
