"""Text generation one whole response per step: `ResponseGenEnv` and `ResponseGenVectorEnv`.

Episode: reset draws a prompt ``x``; the single step submits a whole response ``y`` (tokens, the agent's
per-token log-probs, and its length) and the episode terminates. The step's reward is the return
TokenGen would pay for the same tokens (see `rlhf_zoo_envs.core`):

    reward = sum_t r_t,   r_t = -beta * kl(logprob_t, ref_logprob_t),   r_L += score(x, y)
    score  = rm(x, y) - missing_eos_penalty * [no EOS in y]

and ``info["rewards"]`` holds the per-token r_t. One reference forward and one reward call per batch.

The response is ``tokens[:length]`` cut after its first EOS (the tokens after an EOS are never part of
a response, as in token-by-token generation); the explicit length keeps ``pad == eos`` unambiguous.
A response without EOS finishes with reason "length" and pays the missing-EOS penalty; the episode
still terminates (never truncates): one step is the whole episode. An empty response (length 0) has no
token to carry its score: its rewards are all 0 (``per_token_rewards``'s convention) and the score is
reported in the info.

The world is a built-in task or your own model, given as the CLI's sources (paths, hub ids) or Python
objects (a loaded model and tokenizer, a Python reward callable, a list of prompts); see
`rlhf_zoo_envs.core.GenerationCore`. Reset options as `rlhf_zoo_envs.token_gen.TokenGenEnv`'s
(``prompt`` / ``prompts`` given as text, messages or ids; ``prompt_index`` / ``prompt_indices``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from typing_extensions import Unpack

from rlhf_zoo_envs.core import (
    EnvConfig,
    GenerationCore,
    Outcome,
    SingleEnv,
    as_tensor,
    row_info,
    row_observation,
    to_numpy,
)


def response_action_space(vocab_size: int, max_new_tokens: int) -> spaces.Dict:
    """A whole response: tokens right-padded to T, the agent's per-token log-probs, and the length."""
    T = max_new_tokens
    return spaces.Dict({
        "tokens": spaces.Box(0, vocab_size - 1, (T,), np.int64),
        "logprobs": spaces.Box(-np.inf, 0.0, (T,), np.float32),
        "length": spaces.Discrete(T + 1),
    })


class ResponseEpisodes:
    """N one-step episodes (batched tensors): the prompts, then the submitted responses."""

    def __init__(self, core: GenerationCore, prompt_index: np.ndarray, prompt_ids: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None) -> None:
        """As `rlhf_zoo_envs.token_gen.TokenEpisodes`: table indices, or the encoded prompts themselves."""
        self.core = core
        self.prompt_index = prompt_index
        if prompt_ids is None or prompt_mask is None:
            prompt_ids, prompt_mask = core.prompts(prompt_index)
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask  # (N, P)
        N, T, dev = len(prompt_index), core.max_new_tokens, core.device
        self.n = N
        self.response_ids = torch.full((N, T), core.pad_token_id, dtype=torch.long, device=dev)  # (N, T)
        self.response_mask = torch.zeros((N, T), dtype=torch.long, device=dev)  # (N, T)
        self.done = False
        self.outcome: Outcome | None = None

    def observation(self) -> dict[str, np.ndarray]:
        return self.core.observations(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)

    def step_tensors(
        self, response_ids: torch.Tensor, response_mask: torch.Tensor, logprobs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Score N responses.  response_ids, response_mask, logprobs (N, T'), T' <= T.  See
        `ResponseGenVectorEnv.step_tensors`."""
        core, T = self.core, self.core.max_new_tokens
        if self.done:
            raise RuntimeError("the episodes are over: call reset() before submitting new responses")
        if response_ids.shape[0] != self.n or response_ids.shape[1] > T:
            raise ValueError(f"responses must be (N={self.n}, <= {T}) tensors, got {tuple(response_ids.shape)}")
        dev = core.device
        ids, mask, lp = (x.to(dev) for x in (response_ids.long(), response_mask.long(), logprobs.float()))
        if ids.shape[1] < T:  # right-pad to T
            extra = T - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, extra), value=core.pad_token_id)
            mask = torch.nn.functional.pad(mask, (0, extra), value=0)
            lp = torch.nn.functional.pad(lp, (0, extra), value=0.0)
        ids, mask, has_eos = core.clean_responses(ids, mask)  # (N, T), (N, T), (N,)
        bad = mask.bool() & ((ids < 0) | (ids >= core.vocab_size))
        if bool(bad.any()):
            raise ValueError(f"token ids must be in [0, {core.vocab_size}), got {ids[bad].tolist()}")
        ref = core.ref_logprobs(self.prompt_ids, self.prompt_mask, ids, mask)  # (N, T) one forward
        out = core.outcome(self.prompt_ids, self.prompt_mask, ids, mask, lp, ref, has_eos)  # one reward call
        self.response_ids, self.response_mask, self.outcome, self.done = ids, mask, out, True
        terminated, truncated = torch.ones_like(has_eos), torch.zeros_like(has_eos)
        return {
            "rewards": out.rewards, "returns": out.rewards.sum(-1), "scores": out.score, "rm_scores": out.rm_score,
            "logprobs": out.logprobs, "ref_logprobs": out.ref_logprobs, "kl": out.kl, "response_ids": ids,
            "response_mask": mask, "has_eos": has_eos, "terminated": terminated, "truncated": truncated,
        }

    def step(
        self, tokens: torch.Tensor, logprobs: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """tokens, logprobs (N, T); lengths (N,) -> rewards (N,), vector info.  A second step is ignored."""
        T = self.core.max_new_tokens
        if self.done:
            return torch.zeros(self.n, device=self.core.device), {}
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"lengths must be in [0, {T}], got {lengths.tolist()}")
        mask = (torch.arange(T, device=tokens.device)[None, :] < lengths[:, None]).long()  # (N, T)
        res = self.step_tensors(torch.where(mask.bool(), tokens, self.core.pad_token_id), mask, logprobs)
        out = self.outcome
        assert out is not None
        rows = torch.arange(self.n, device=self.core.device)
        return res["returns"], self.core.end_info(out, rows, self.n, extra={"kl": out.kl})


class ResponseGenEnv(SingleEnv):
    """One prompt, one step: submit a whole response, get its return; the episode then terminates.

    Observation: as `rlhf_zoo_envs.token_gen.TokenGenEnv` (the prompt at reset, prompt + response after).
    Action: ``{"tokens": (T,) int64, "logprobs": (T,) float32, "length": int in [0, T]}``; entries past
        ``length`` (and after the first EOS) are ignored.
    Reward: the sum of the per-token rewards. ``terminated`` is always True, ``truncated`` False.
    Info: ``rewards``, ``logprobs``, ``ref_logprobs``, ``kl`` (per-token arrays of the response, the same
        numbers TokenGen gives step by step), ``response_ids``, ``response_length``, ``rm_score``, ``score``,
        ``return``, ``response_text``, ``finish_reason`` ("eos" | "length").
    Reset options: ``{"prompt": text | messages | token ids}`` or ``{"prompt_index": i}`` (as
    `rlhf_zoo_envs.token_gen.TokenGenEnv`; any other key raises ValueError). Keyword arguments: see
    `rlhf_zoo_envs.core.GenerationCore` (``task=...``, or ``model=...`` with ``reward=``, ``prompts=``, ...).
    """

    episodes_cls = ResponseEpisodes

    def action_space_for(self, core: GenerationCore) -> spaces.Dict:
        return response_action_space(core.vocab_size, core.max_new_tokens)

    def step(self, action: dict[str, Any]) -> tuple[dict, float, bool, bool, dict]:
        ep = self._require()
        dev, T = self.core.device, self.core.max_new_tokens
        rewards, info = ep.step(as_tensor(action["tokens"], torch.long, dev, (1, T)),
                                as_tensor(action["logprobs"], torch.float32, dev, (1, T)),
                                as_tensor(action["length"], torch.long, dev, (1,)))
        return row_observation(ep.observation()), float(rewards[0]), True, False, row_info(info)


class ResponseGenVectorEnv(VectorEnv):
    """N prompts, one step: submit N whole responses at once (one reference forward, one reward call).

    ``reset()`` draws N prompts (``options={"prompts": [...]}`` gives them as text, messages or ids,
    ``{"prompt_indices": [...]}`` picks them from the table; see `rlhf_zoo_envs.token_gen.TokenGenVectorEnv`
    for all the options; an unknown key raises ValueError); the step scores the N
    responses and every row terminates. No autoreset (``AutoresetMode.DISABLED``): a further step before
    ``reset()`` is ignored (rewards 0, still terminated, empty info).

    Actions: ``{"tokens": (N, T), "logprobs": (N, T), "length": (N,)}``, numpy or torch.
    Info: gymnasium's vector convention, every row set: (N,) arrays for numbers, (N, T) right-padded arrays
    for the per-token ``rewards``, ``logprobs``, ``ref_logprobs``, ``kl``, ``response_ids`` (``response_length``
    says how much counts), (N,) object arrays for ``response_text`` and ``finish_reason``.

    Algorithms that stay in torch call `step_tensors` instead of `step` (no numpy, no text decoding).
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": []}

    def __init__(self, num_envs: int = 1, **config: Unpack[EnvConfig]) -> None:
        self.core = GenerationCore(**config)
        self.num_envs = int(num_envs)
        self.single_observation_space = self.core.observation_space()
        self.single_action_space = response_action_space(self.core.vocab_size, self.core.max_new_tokens)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._episodes: ResponseEpisodes | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if options and "reset_mask" in options and not np.all(options["reset_mask"]):
            raise NotImplementedError("episodes are synchronous: reset() restarts every row (no partial reset)")
        prompts = self.core.select_prompts(self.np_random, self.num_envs, options, extra_keys=("reset_mask",))
        self._episodes = ResponseEpisodes(self.core, prompts.index, prompts.ids, prompts.mask)
        return self._episodes.observation(), self.core.reset_info(prompts)

    @property
    def prompt_ids(self) -> torch.Tensor:
        """The current prompts, left-padded to P.  (N, P) on the env device."""
        return self._require().prompt_ids

    @property
    def prompt_mask(self) -> torch.Tensor:
        """(N, P) attention mask of `prompt_ids`."""
        return self._require().prompt_mask

    def step_tensors(
        self, response_ids: torch.Tensor, response_mask: torch.Tensor, logprobs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Score the N responses to the current prompts, in torch (e.g. straight from `rlhf_zoo.generation.sample`).

        Args:
            response_ids, response_mask, logprobs: (N, T') with T' <= T, right-padded; the mask is cut
                after the first EOS.

        Returns tensors on the env device: ``rewards`` (N, T) per-token, ``returns`` (N,), ``scores`` (N,)
        (after the missing-EOS penalty), ``rm_scores`` (N,), ``logprobs``, ``ref_logprobs``, ``kl`` (N, T),
        ``response_ids``, ``response_mask`` (N, T) as scored, ``has_eos``, ``terminated``, ``truncated`` (N,).
        """
        return self._require().step_tensors(response_ids, response_mask, logprobs)

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        ep = self._require()
        dev, n, T = self.core.device, self.num_envs, self.core.max_new_tokens
        rewards, info = ep.step(as_tensor(actions["tokens"], torch.long, dev, (n, T)),
                                as_tensor(actions["logprobs"], torch.float32, dev, (n, T)),
                                as_tensor(actions["length"], torch.long, dev, (n,)))
        return ep.observation(), to_numpy(rewards), np.ones(n, dtype=bool), np.zeros(n, dtype=bool), info

    def _require(self) -> ResponseEpisodes:
        if self._episodes is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        return self._episodes
