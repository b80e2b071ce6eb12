"""The batched engine behind the text-generation environments (`token_gen`, `response_gen`).

An episode is one response ``y`` to one prompt ``x``. The environment pays the KL-shaped reward of RLHF
(Ziegler et al. 2019; InstructGPT Eq. 2), computed by `rlhf_zoo.ops.per_token_rewards`:

    r_t   = -beta * kl_t                          kl_t = k(logprob_t, ref_logprob_t)  (k1: the log-ratio)
    r_L  += score(x, y)                           on the last real response token L
    score = rm(x, y) - missing_eos_penalty * [y has no EOS]

``logprob_t`` is the agent's log-probability of the token it chose (part of its action); ``ref_logprob_t``
is the frozen reference (= SFT) policy's, taken at the same temperature with the task's suppressed ids
(bos, unk, pad when pad != eos) at -inf, exactly as `rlhf_zoo.generation.sample` takes the agent's. A
suppressed token therefore has ``ref_logprob = -inf`` and reward ``-inf``: it is never a valid action.

`GenerationCore` holds what every environment shares (the task, the reference model, the reward
function, the coefficients, the encoded prompt table) and the batched operations on it. Layout of every
batch, as in the rest of the project: prompts left-padded to the fixed width ``P`` (the widest prompt of
the split), responses right-padded to ``T = max_new_tokens``; masks (1 = real token) decide what counts,
never the token id, so ``pad == eos`` is never ambiguous.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from transformers import DynamicCache

from rlhf_zoo.ops import logprobs_from_logits, per_token_rewards, position_ids_from_mask, response_logprobs
from rlhf_zoo.ops.kl import KLEstimator, kl_penalty
from rlhf_zoo.ops.kv_cache import cached_forward
from rlhf_zoo_envs.tasks.base import Task

FINISH_EOS = "eos"
FINISH_LENGTH = "length"

#: info keys holding one value per response token (right-padded to T in vector infos, cut to the
#: response length in single-env infos)
PER_TOKEN_KEYS = ("rewards", "ref_logprobs", "logprobs", "kl", "response_ids")


class EnvConfig(TypedDict, total=False):
    """Keyword arguments every environment accepts besides ``task`` (see `GenerationCore`)."""

    task_seed: int
    split: str
    beta: float | None
    max_new_tokens: int | None
    missing_eos_penalty: float | None
    reward: str | None
    kl_estimator: KLEstimator
    truncation_is_terminal: bool
    temperature: float
    device: str | torch.device
    progress: bool
    reference_model: torch.nn.Module | None
    reward_fn: Any


def resolve_task(task: str | Task, seed: int = 0, progress: bool = False) -> Task:
    """A `Task` object as is, or a task name loaded (built into the cache if missing) through the registry."""
    if isinstance(task, str):
        from rlhf_zoo.registry import get_registry

        return get_registry().task(task).load(seed=seed, progress=progress)
    return task


@dataclass
class Outcome:
    """What the environment pays for a batch of finished responses.  Tensors on the env device.

    Shapes: ``(B, T)`` for the per-token fields, ``(B,)`` for the others.
    """

    response_ids: torch.Tensor  # (B, T) pad where the mask is 0
    response_mask: torch.Tensor  # (B, T) long, a prefix of ones ending at the first EOS (included)
    has_eos: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor  # (B, T) the agent's, 0 where the mask is 0
    ref_logprobs: torch.Tensor  # (B, T) 0 where the mask is 0
    kl: torch.Tensor  # (B, T) per-token KL estimate, 0 where the mask is 0
    rm_score: torch.Tensor  # (B,) the reward function's score
    score: torch.Tensor  # (B,) rm_score - missing_eos_penalty * ~has_eos
    rewards: torch.Tensor  # (B, T) per_token_rewards(...)

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(-1)


class IncrementalReference:
    """Reference log-probs of a growing batch of responses, one single-token forward per step (KV cache).

    Mirrors `rlhf_zoo.generation.sample`: one forward over the left-padded prompts fills the cache; each
    later token is fed with its mask column (0 for rows already finished). The forward for a token is
    deferred to the next `logprobs` call, so no forward is spent after the last step.
    """

    def __init__(self, core: GenerationCore, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        self.core = core
        prompt_ids, prompt_mask = trim_left_padding(prompt_ids, prompt_mask)  # (B, P')
        self.cache = DynamicCache()
        self.attn = prompt_mask.long()  # (B, P' + t)
        with torch.no_grad():
            logits = cached_forward(core.ref_model, input_ids=prompt_ids, attention_mask=self.attn,
                                    position_ids=position_ids_from_mask(self.attn), cache=self.cache)
        self.next_logits = logits[:, -1:].clone()  # (B, 1, V) predicts the next token; frees (B, P', V)
        self.next_pos = self.attn.sum(-1, keepdim=True)  # (B, 1)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # last (tokens, alive), not yet fed

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Reference log-prob of this step's ``tokens`` (B,) given everything before.  -> (B,) fp32.

        Rows with ``alive`` False are finished: their token is ignored (fed as pad with mask 0)."""
        if self._pending is not None:
            prev, prev_alive = self._pending
            self.attn = torch.cat([self.attn, prev_alive.long()[:, None]], dim=1)
            self.next_logits = cached_forward(self.core.ref_model, input_ids=prev[:, None], attention_mask=self.attn,
                                              position_ids=self.next_pos, cache=self.cache)[:, -1:]
            self.next_pos = self.next_pos + 1
        tokens = torch.where(alive, tokens, self.core.pad_token_id)  # (B,)
        self._pending = (tokens, alive)
        return self.core.token_logprobs(self.next_logits, tokens[:, None])[:, 0]


class GenerationCore:
    """Everything the four environments share; all operations are batched over rows.

    Args:
        task: a `Task`, or a task name loaded through the registry with seed ``task_seed``.
        split: the prompts `reset` draws from (``train`` or ``eval``).
        beta: KL coefficient (None: the task's).
        max_new_tokens: response length cap T (None: the task's).
        missing_eos_penalty: subtracted from the score of a response without EOS (None: the task's).
        reward: ``"proxy"`` (learned RM), ``"gold"``, or None for the task's default.
        kl_estimator: ``k1`` (log-ratio, default), ``k2`` or ``k3`` (`rlhf_zoo.ops.kl`).
        truncation_is_terminal: report a response cut at T as terminated rather than truncated.
        temperature: the temperature of the reference log-probs; use the agent's sampling temperature.
        device: where the reference and reward models run and the state tensors live.
        progress: show build progress when ``task`` is a name whose task is not built yet.
        reference_model: an already loaded, frozen reference policy to share (None: load the task's).
        reward_fn: an already built reward function to share (None: build it from ``reward``).
    """

    def __init__(
        self,
        task: str | Task,
        *,
        task_seed: int = 0,
        split: str = "train",
        beta: float | None = None,
        max_new_tokens: int | None = None,
        missing_eos_penalty: float | None = None,
        reward: str | None = None,
        kl_estimator: KLEstimator = "k1",
        truncation_is_terminal: bool = False,
        temperature: float = 1.0,
        device: str | torch.device = "cpu",
        progress: bool = False,
        reference_model: torch.nn.Module | None = None,
        reward_fn: Any = None,
    ) -> None:
        kl_penalty(torch.zeros(1), torch.zeros(1), kl_estimator)  # raises on an unknown estimator
        self.task = resolve_task(task, task_seed, progress)
        self.device = torch.device(device)
        self.split = split
        self.beta = float(self.task.beta if beta is None else beta)
        self.max_new_tokens = int(self.task.max_new_tokens if max_new_tokens is None else max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.missing_eos_penalty = float(
            self.task.missing_eos_penalty if missing_eos_penalty is None else missing_eos_penalty
        )
        self.kl_estimator: KLEstimator = kl_estimator
        self.truncation_is_terminal = bool(truncation_is_terminal)
        self.temperature = float(temperature)

        if reward_fn is not None and reward is not None:
            raise ValueError("give either reward (a kind) or reward_fn (a reward function), not both")
        self.ref_model = (reference_model or self.task.load_policy(self.device)).eval()
        self.ref_model.requires_grad_(False)
        self.reward_fn = reward_fn if reward_fn is not None else self.task.reward_function(reward, self.device)
        self.vocab_size = int(self.ref_model.get_output_embeddings().weight.shape[0])
        self.eos_token_id = int(self.task.eos_token_id)
        self.pad_token_id = int(self.task.pad_token_id)
        self.suppress_ids = list(self.task.suppress_ids)

        self.prompt_texts: list[str] = list(self.task.prompts(split))
        if not self.prompt_texts:
            raise ValueError(f"task {self.task.name!r} has no {split!r} prompts")
        self.prompt_table_ids, self.prompt_table_mask = self.task.encode_prompts(self.prompt_texts, self.device)
        self.prompt_width = int(self.prompt_table_ids.shape[1])  # P

    # --- spaces --------------------------------------------------------------------------------------
    def observation_space(self) -> spaces.Dict:
        """One row: ``[prompt (left-padded to P) | response so far (right-padded to T)]`` and the lengths."""
        P, T, V = self.prompt_width, self.max_new_tokens, self.vocab_size
        return spaces.Dict({
            "input_ids": spaces.Box(0, V - 1, (P + T,), np.int64),
            "attention_mask": spaces.Box(0, 1, (P + T,), np.int8),
            "prompt_length": spaces.Discrete(P + 1),  # real prompt tokens (BOS included)
            "response_length": spaces.Discrete(T + 1),
        })

    # --- prompts -------------------------------------------------------------------------------------
    def choose_prompts(self, rng: np.random.Generator, n: int, options: Mapping[str, Any] | None) -> np.ndarray:
        """Prompt indices for ``n`` rows: ``options["prompt_indices"]`` (n of them), ``options["prompt_index"]``
        (every row), else drawn uniformly with ``rng``.  -> (n,) int64"""
        options = options or {}
        if "prompt_indices" in options:
            idx = np.asarray(options["prompt_indices"], dtype=np.int64).reshape(-1)
            if idx.shape != (n,):
                raise ValueError(f"options['prompt_indices'] needs {n} indices, got {idx.shape[0]}")
        elif "prompt_index" in options:
            idx = np.full(n, int(options["prompt_index"]), dtype=np.int64)
        else:
            return rng.integers(len(self.prompt_texts), size=n, dtype=np.int64)
        if ((idx < 0) | (idx >= len(self.prompt_texts))).any():
            raise IndexError(f"prompt index out of range 0..{len(self.prompt_texts) - 1}: {idx.tolist()}")
        return idx

    def prompts(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded prompts of the given indices.  -> ids (n, P), mask (n, P)"""
        sel = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        return self.prompt_table_ids[sel], self.prompt_table_mask[sel]

    def reset_info(self, idx: np.ndarray) -> dict[str, Any]:
        """Vector-style reset info: ``prompt_index`` (n,) and ``prompt`` (n,) object, every row set."""
        ones = np.ones(len(idx), dtype=bool)
        text = np.empty(len(idx), dtype=object)
        text[:] = [self.prompt_texts[i] for i in idx]
        return {"prompt_index": idx.copy(), "_prompt_index": ones, "prompt": text, "_prompt": ones.copy()}

    # --- tensors ---------------------------------------------------------------------------------------
    def token_logprobs(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Reference log-probs of ``ids`` (B, T) under ``logits`` (B, T, V).  -> (B, T) fp32"""
        return logprobs_from_logits(logits, ids, self.temperature, self.suppress_ids)

    @torch.no_grad()
    def ref_logprobs(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Reference log-probs of whole responses: ONE forward for the batch.  -> (B, T), 0 off the mask."""
        return response_logprobs(self.ref_model, prompt_ids, prompt_mask, response_ids, response_mask.long(),
                                 self.temperature, self.suppress_ids)  # packed rows

    def clean_responses(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Canonical responses: the mask made a prefix that stops at the first EOS (tokens after it are not
        part of the response, as in token-by-token generation), pad written off the mask.

        -> ids (B, T), mask (B, T) long, has_eos (B,) bool"""
        mask = response_mask.long().cumprod(-1)  # (B, T) a prefix
        eos = (response_ids == self.eos_token_id) & mask.bool()
        after_eos = (eos.long().cumsum(-1) - eos.long()) > 0  # strictly after the first EOS
        mask = mask * (~after_eos).long()
        ids = torch.where(mask.bool(), response_ids, self.pad_token_id)
        return ids, mask, eos.any(-1)

    @torch.no_grad()
    def score(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
        response_mask: torch.Tensor, has_eos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ONE batched reward call.  -> rm_score (B,), score (B,) = rm_score - penalty * ~has_eos"""
        ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + T)
        mask = torch.cat([prompt_mask, response_mask], dim=1).long()
        rm = self.reward_fn(ids, mask, prompt_ids.shape[1]).float().to(self.device)  # (B,)
        return rm, rm - self.missing_eos_penalty * (~has_eos).float()

    def outcome(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
        response_mask: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, has_eos: torch.Tensor,
    ) -> Outcome:
        """Score finished responses (one reward call) and build their per-token rewards."""
        on = response_mask.bool()
        logprobs = torch.where(on, logprobs.float(), 0.0)
        ref_logprobs = torch.where(on, ref_logprobs.float(), 0.0)
        rm, score = self.score(prompt_ids, prompt_mask, response_ids, response_mask, has_eos)
        rewards = per_token_rewards(logprobs, ref_logprobs, score, response_mask, self.beta, self.kl_estimator)
        kl = self.kl(logprobs, ref_logprobs, response_mask)
        return Outcome(response_ids, response_mask.long(), has_eos, logprobs, ref_logprobs, kl, rm, score, rewards)

    def kl(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token KL estimate, 0 where the mask is 0.  (B, ...) -> (B, ...)"""
        return torch.where(mask.bool(), kl_penalty(logprobs.float(), ref_logprobs.float(), self.kl_estimator), 0.0)

    def step_penalty(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """The KL part of one step's reward, ``-beta * kl`` (0 where not alive).  (B,) -> (B,)"""
        zero = torch.zeros(logprobs.shape[0], device=logprobs.device)
        return per_token_rewards(logprobs[:, None], ref_logprobs[:, None], zero, alive[:, None], self.beta,
                                 self.kl_estimator)[:, 0]

    def finish_terminal(self, has_eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(terminated, truncated) of finished rows: EOS terminates; the length cap truncates, or terminates
        under ``truncation_is_terminal``."""
        if self.truncation_is_terminal:
            return torch.ones_like(has_eos), torch.zeros_like(has_eos)
        return has_eos.clone(), ~has_eos

    # --- numpy views -----------------------------------------------------------------------------------
    def observations(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> dict[str, np.ndarray]:
        """Batched observation: fresh numpy arrays, ``input_ids``/``attention_mask`` (n, P + T), lengths (n,)."""
        return {
            "input_ids": to_numpy(torch.cat([prompt_ids, response_ids], dim=1).long()),
            "attention_mask": to_numpy(torch.cat([prompt_mask, response_mask], dim=1).to(torch.int8)),
            "prompt_length": to_numpy(prompt_mask.long().sum(-1)),
            "response_length": to_numpy(response_mask.long().sum(-1)),
        }

    def end_info(
        self, out: Outcome, rows: torch.Tensor, n: int, extra: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, np.ndarray]:
        """Vector-style info of the finished rows ``rows`` (K,) of an n-row batch: each key an array with
        n rows and a ``_key`` bool mask marking the rows it holds (gymnasium's vector-info convention).
        Per-token arrays are (n, T), right-padded (pad for ids, 0 otherwise); text is an object array.
        ``extra``: more (K, ...) tensors to include the same way."""
        idx = to_numpy(rows)
        present = np.zeros(n, dtype=bool)
        present[idx] = True
        lengths = out.lengths
        texts = self.task.decode(out.response_ids, out.response_mask)  # the only per-row loop: text
        reasons = np.where(to_numpy(out.has_eos), FINISH_EOS, FINISH_LENGTH).astype(object)
        fields: dict[str, Any] = {
            "rm_score": out.rm_score, "score": out.score, "rewards": out.rewards, "ref_logprobs": out.ref_logprobs,
            "logprobs": out.logprobs, "response_ids": out.response_ids, "response_length": lengths,
            "return": out.rewards.sum(-1), "response_text": texts, "finish_reason": reasons, **(extra or {}),
        }
        info: dict[str, np.ndarray] = {}
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                value = to_numpy(value)
                fill = self.pad_token_id if key == "response_ids" else 0
                full = np.full((n, *value.shape[1:]), fill, dtype=value.dtype)
            else:
                full = np.full(n, None, dtype=object)
            full[idx] = value if isinstance(value, np.ndarray) else np.array(value, dtype=object)
            info[key], info[f"_{key}"] = full, present.copy()
        return info


# --- helpers ---------------------------------------------------------------------------------------------
def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (they change nothing but cost compute)."""
    live = mask.bool().any(0)
    if not bool(live.any()):
        return ids, mask
    start = int(live.long().argmax())
    return ids[:, start:], mask[:, start:]


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A fresh numpy copy (never a view of env state)."""
    return x.detach().cpu().numpy().copy()


def as_tensor(x: Any, dtype: torch.dtype, device: torch.device, shape: Sequence[int]) -> torch.Tensor:
    """An action field (numpy, tensor, list or scalar) as a tensor of ``shape`` on ``device``."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device=device, dtype=dtype)
    if tuple(t.shape) != tuple(shape):
        try:
            t = t.reshape(tuple(shape))
        except RuntimeError as exc:
            raise ValueError(f"expected an action of shape {tuple(shape)}, got {tuple(t.shape)}") from exc
    return t


def row_observation(obs: Mapping[str, np.ndarray], i: int = 0) -> dict[str, Any]:
    """Row ``i`` of a batched observation, lengths as np.int64 scalars."""
    return {
        "input_ids": obs["input_ids"][i].copy(),
        "attention_mask": obs["attention_mask"][i].copy(),
        "prompt_length": np.int64(obs["prompt_length"][i]),
        "response_length": np.int64(obs["response_length"][i]),
    }


def row_info(info: Mapping[str, Any], i: int = 0) -> dict[str, Any]:
    """Row ``i`` of a vector info: the keys present for that row; scalars as Python numbers, per-token
    arrays cut to the response length."""
    out: dict[str, Any] = {}
    length = int(info["response_length"][i]) if info.get("_response_length", np.zeros(i + 1, bool))[i] else None
    for key, value in info.items():
        if key.startswith("_") or not info[f"_{key}"][i]:
            continue
        x = value[i]
        if isinstance(x, np.ndarray):
            x = x[:length].copy() if key in PER_TOKEN_KEYS and length is not None else x.copy()
        elif isinstance(x, np.floating):
            x = float(x)
        elif isinstance(x, np.integer):
            x = int(x)
        elif isinstance(x, np.str_):
            x = str(x)
        out[key] = x
    return out


class SingleEnv(gym.Env):
    """The shared part of the single-episode environments: one row of a batched episode class.

    Subclasses set ``episodes_cls`` (built as ``episodes_cls(core, prompt_index)``), implement
    ``action_space_for(core)`` and ``step``.
    """

    metadata = {"render_modes": ["ansi"]}
    episodes_cls: type

    def __init__(self, task: str | Task, *, render_mode: str | None = None, **config: Any) -> None:
        self.core = GenerationCore(task, **config)
        self.observation_space = self.core.observation_space()
        self.action_space = self.action_space_for(self.core)
        self.render_mode = render_mode
        self._episodes: Any = None

    def action_space_for(self, core: GenerationCore) -> spaces.Dict:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        idx = self.core.choose_prompts(self.np_random, 1, options)
        self._episodes = self.episodes_cls(self.core, idx)
        return row_observation(self._episodes.observation()), row_info(self.core.reset_info(idx))

    def _require(self) -> Any:
        if self._episodes is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        return self._episodes

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._episodes is None:
            return None
        ep = self._episodes
        prompt = self.core.task.decode(ep.prompt_ids, ep.prompt_mask)[0]
        return f"{prompt} | {self.core.task.decode(ep.response_ids, ep.response_mask)[0]}"
