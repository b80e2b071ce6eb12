"""Text generation one token per step: `TokenGenEnv` (one episode) and `TokenGenVectorEnv` (N at once).

Episode: reset draws a prompt ``x``; each step the agent emits one response token ``y_t`` with the
log-probability its policy gave it. The reward of step t (see `rlhf_zoo_envs.core`) is

    r_t = -beta * kl(logprob_t, ref_logprob_t)          (k1: -beta * (logprob_t - ref_logprob_t))
        + score(x, y) on the last step                  score = rm(x, y) - missing_eos_penalty * [no EOS]

so the return equals the sum of `rlhf_zoo.ops.per_token_rewards` of the whole response. EOS terminates;
reaching ``max_new_tokens`` without EOS truncates (terminates with ``truncation_is_terminal=True``).
Reference log-probs come from a KV cache of the reference model: one single-token forward per step for
the whole batch; the reward model runs once per step for all rows that finish at that step.

Both classes are thin adapters over `TokenEpisodes`, the batched state (tensors on the env device).

The world is a built-in task (``task="exact"``) or your own model with the CLI's sources, paths / hub ids
or Python objects (`rlhf_zoo_envs.core.GenerationCore`)::

    env = gymnasium.make("rlhf_zoo/TokenGen-v0", model="my/model", reward=my_reward_fn, prompts=["Hi", ...])
    obs, info = env.reset(options={"prompt": [{"role": "user", "content": "Hello"}]})
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
    IncrementalReference,
    SingleEnv,
    as_tensor,
    row_info,
    row_observation,
    to_numpy,
)


def token_action_space(vocab_size: int) -> spaces.Dict:
    """One step's action: the token and the agent's log-prob of it (at the env's temperature)."""
    return spaces.Dict({
        "token": spaces.Discrete(vocab_size),
        "logprob": spaces.Box(-np.inf, 0.0, (), np.float32),
    })


class TokenEpisodes:
    """N synchronous token-by-token episodes; all state is batched tensors, no per-row Python.

    Rows start together; a row that finished keeps its state and ignores further actions (reward 0).
    """

    def __init__(self, core: GenerationCore, prompt_index: np.ndarray, prompt_ids: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None) -> None:
        """``prompt_index`` (N,) into the prompt table, or the encoded prompts ``prompt_ids``, ``prompt_mask``
        (N, P) themselves (then ``prompt_index`` is -1 where a prompt is not from the table)."""
        self.core = core
        self.prompt_index = prompt_index
        if prompt_ids is None or prompt_mask is None:
            prompt_ids, prompt_mask = core.prompts(prompt_index)
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask  # (N, P)
        N, T, dev = len(prompt_index), core.max_new_tokens, core.device
        self.n = N
        self.response_ids = torch.full((N, T), core.pad_token_id, dtype=torch.long, device=dev)  # (N, T)
        self.response_mask = torch.zeros((N, T), dtype=torch.long, device=dev)  # (N, T)
        self.logprobs = torch.zeros((N, T), dtype=torch.float32, device=dev)  # (N, T) the agent's
        self.ref_logprobs = torch.zeros((N, T), dtype=torch.float32, device=dev)  # (N, T)
        self.done = torch.zeros(N, dtype=torch.bool, device=dev)  # (N,)
        self.terminated = torch.zeros(N, dtype=torch.bool, device=dev)
        self.truncated = torch.zeros(N, dtype=torch.bool, device=dev)
        self.t = 0  # next response position (the same for every live row)
        self.ref = IncrementalReference(core, self.prompt_ids, self.prompt_mask)

    def observation(self) -> dict[str, np.ndarray]:
        return self.core.observations(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)

    def step(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Append one token per live row.  tokens (N,) long, logprobs (N,) -> rewards (N,), vector info."""
        core = self.core
        alive = ~self.done  # (N,)
        rewards = torch.zeros(self.n, dtype=torch.float32, device=core.device)
        if not bool(alive.any()):
            return rewards, {}
        bad = alive & ((tokens < 0) | (tokens >= core.vocab_size))
        if bool(bad.any()):
            raise ValueError(f"token ids must be in [0, {core.vocab_size}), got {tokens[bad].tolist()}")
        t = self.t
        ref = self.ref.logprobs(tokens, alive)  # (N,)
        tokens = torch.where(alive, tokens, core.pad_token_id)
        logprobs = torch.where(alive, logprobs.float(), 0.0)
        ref = torch.where(alive, ref, 0.0)
        self.response_ids[:, t] = tokens
        self.response_mask[:, t] = alive.long()
        self.logprobs[:, t] = logprobs
        self.ref_logprobs[:, t] = ref
        rewards = core.step_penalty(logprobs, ref, alive)  # (N,) -beta * kl
        kl = core.kl(logprobs, ref, alive)
        alive_np = to_numpy(alive)
        info: dict[str, np.ndarray] = {
            "ref_logprob": to_numpy(ref), "_ref_logprob": alive_np, "kl": to_numpy(kl), "_kl": alive_np.copy(),
        }
        has_eos = alive & (tokens == core.eos_token_id)
        ending = (has_eos | alive) if t == core.max_new_tokens - 1 else has_eos  # (N,)
        self.t += 1
        if bool(ending.any()):
            rows = ending.nonzero().squeeze(-1)  # (K,)
            out = core.outcome(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows],
                               self.response_mask[rows], self.logprobs[rows], self.ref_logprobs[rows], has_eos[rows])
            rewards[rows] = out.rewards[:, t]  # the last token's reward: -beta * kl + score
            self.terminated[rows], self.truncated[rows] = core.finish_terminal(out.has_eos)
            self.done[rows] = True
            info.update(core.end_info(out, rows, self.n))
        return rewards, info


class TokenGenEnv(SingleEnv):
    """One text-generation episode, one token per step.

    Observation (``spaces.Dict`` of fixed-shape numpy arrays; P = widest prompt of the split, T = cap):
        input_ids (P+T,) int64: prompt left-padded to P, then the response so far right-padded with pad;
        attention_mask (P+T,) int8; prompt_length (real prompt tokens, BOS included), response_length:
        np.int64 scalars (Discrete). The response always starts at column P (``env.core.prompt_width``).

    Action: ``{"token": int in [0, V), "logprob": float <= 0}``, the agent's log-prob of the token (at
        ``temperature``). Suppressed ids (``task.suppress_ids``) have reference log-prob -inf.

    Reward: ``-beta * kl_t`` each step, plus the score (after any missing-EOS penalty) on the last step.

    Info every step: ``ref_logprob``, ``kl`` (this token's KL estimate; the log-ratio for k1). At the end
        also ``rm_score``, ``score``, ``return``, ``response_text``, ``finish_reason`` ("eos" | "length") and
        per-token arrays of the response: ``rewards``, ``logprobs``, ``ref_logprobs``, ``response_ids``;
        plus ``response_length``. Reset info: ``prompt_index`` (-1 for a prompt given in the options),
        ``prompt`` (its text; a chat prompt as rendered by the template).

    Reset options (at most one; any other key raises ValueError):
        ``{"prompt": p}`` the episode's prompt: a text, a list of ``{"role", "content"}`` messages
            (rendered with the tokenizer's chat template) or a list of token ids (as they are); encoded by
            the world's convention and left-padded to P (longer than P tokens: ValueError);
        ``{"prompt_index": i}`` index into ``env.core.prompt_texts`` (``world.prompts(split)``).

    Keyword arguments: see `rlhf_zoo_envs.core.GenerationCore`: ``task`` (a built-in task's name, a `Task`
    or a `World`) or ``model`` (your own: path, hub id or loaded model) with ``tokenizer``, ``ref_model``,
    ``reward`` (specs or Python callables), ``reward_weights``, ``prompts``, ``gold``, ...
    """

    episodes_cls = TokenEpisodes

    def action_space_for(self, core: GenerationCore) -> spaces.Dict:
        return token_action_space(core.vocab_size)

    def step(self, action: dict[str, Any]) -> tuple[dict, float, bool, bool, dict]:
        ep = self._require()
        dev = self.core.device
        tokens = as_tensor(action["token"], torch.long, dev, (1,))
        logprobs = as_tensor(action["logprob"], torch.float32, dev, (1,))
        rewards, info = ep.step(tokens, logprobs)
        return (row_observation(ep.observation()), float(rewards[0]), bool(ep.terminated[0]),
                bool(ep.truncated[0]), row_info(info))


class TokenGenVectorEnv(VectorEnv):
    """N text-generation episodes stepped together, one token per row per step, as batched tensors.

    Episodes are synchronous: ``reset()`` starts N new prompts; options (at most one of the first four):
    ``{"prompts": [p_0, ..., p_{N-1}]}`` one prompt per row, each a text, a message list or token ids as
    `TokenGenEnv`'s ``prompt``; ``{"prompt": p}`` the same prompt for every row; ``{"prompt_indices": [...]}``
    N indices into the prompt table; ``{"prompt_index": i}`` one index for every row; ``reset_mask`` (all
    True). Any other key raises ValueError. There is no autoreset
    (``metadata["autoreset_mode"] == AutoresetMode.DISABLED``): a row that finished stays done, ignores
    further actions and gets reward 0, and its ``terminations`` / ``truncations`` keep their final values
    until the next ``reset()``. Partial resets are not supported.

    Observation: the single env's, batched: input_ids / attention_mask (N, P+T), lengths (N,).
    Actions: ``{"token": (N,), "logprob": (N,)}`` as numpy arrays or torch tensors (any device); entries of
        finished rows are ignored.
    Rewards (N,) float32, terminations / truncations (N,) bool, as in `TokenGenEnv`.

    Info follows gymnasium's vector convention: each key is an array over the N rows with a ``_key`` bool
    mask of the rows that have it. ``ref_logprob`` and ``kl`` are set for the rows that took this step.
    End-of-episode keys are set for the rows that finished at this step: numbers as (N,) arrays,
    per-token arrays (``rewards``, ``logprobs``, ``ref_logprobs``, ``response_ids``) as (N, T) right-padded
    (with 0, pad for ids; ``response_length`` says how much counts), ``response_text`` and
    ``finish_reason`` as (N,) object arrays (None for other rows).
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": []}

    def __init__(self, num_envs: int = 1, **config: Unpack[EnvConfig]) -> None:
        self.core = GenerationCore(**config)
        self.num_envs = int(num_envs)
        self.single_observation_space = self.core.observation_space()
        self.single_action_space = token_action_space(self.core.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._episodes: TokenEpisodes | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if options and "reset_mask" in options and not np.all(options["reset_mask"]):
            raise NotImplementedError("episodes are synchronous: reset() restarts every row (no partial reset)")
        prompts = self.core.select_prompts(self.np_random, self.num_envs, options, extra_keys=("reset_mask",))
        self._episodes = TokenEpisodes(self.core, prompts.index, prompts.ids, prompts.mask)
        return self._episodes.observation(), self.core.reset_info(prompts)

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        ep = self._episodes
        if ep is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        dev, n = self.core.device, self.num_envs
        tokens = as_tensor(actions["token"], torch.long, dev, (n,))
        logprobs = as_tensor(actions["logprob"], torch.float32, dev, (n,))
        rewards, info = ep.step(tokens, logprobs)
        return ep.observation(), to_numpy(rewards), to_numpy(ep.terminated), to_numpy(ep.truncated), info
