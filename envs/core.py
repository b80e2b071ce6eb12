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

`GenerationCore` holds what every environment shares (the world, the reference model, the reward
function, the coefficients, the encoded prompt table) and the batched operations on it. Layout of every
batch, as in the rest of the project: prompts left-padded to the fixed width ``P`` (the widest prompt of
the split, or ``prompt_width``), responses right-padded to ``T = max_new_tokens``; masks (1 = real token)
decide what counts, never the token id, so ``pad == eos`` is never ambiguous.

The world (`rlhf_zoo.world.World`) is a built-in task (``task="exact"``, or a `Task` / any `World` object)
or the user's own setup, built from the same sources as ``zoo run --model ...`` (`rlhf_zoo.user_setup`):

    gymnasium.make("rlhf_zoo/TokenGen-v0", model="path/or/hub-id" | loaded_model, tokenizer=...,
                   reward=["rm-dir", "module:function", python_callable], reward_weights=[1.0, 0.5, 2.0],
                   prompts="prompts.jsonl" | ["text", [{"role": "user", "content": "..."}], ...])

with the same reward (each reward spec scored as the CLI scores it, summed with weights) and the same
KL-shaped per-token reward. Any prompt can also be given at reset: ``reset(options={"prompt": ...})``
(see `GenerationCore.select_prompts`).
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
from rlhf_zoo.world import World, pad_rows

FINISH_EOS = "eos"
FINISH_LENGTH = "length"

#: info keys holding one value per response token (right-padded to T in vector infos, cut to the
#: response length in single-env infos)
PER_TOKEN_KEYS = ("rewards", "ref_logprobs", "logprobs", "kl", "response_ids")

#: reset options that choose the episode's prompts (at most one per reset); vector envs also take
#: ``reset_mask`` (all True: partial resets are not supported)
PROMPT_OPTIONS = ("prompt", "prompts", "prompt_index", "prompt_indices")

#: keyword arguments that describe the user's own setup: they go with ``model=`` (not with ``task=``)
USER_SETUP_KEYS = ("tokenizer", "ref_model", "prompts", "gold", "dataset", "chat_template", "eval_fraction",
                   "dtype", "attn_implementation", "trust_remote_code")

#: the ``reward=`` values that name one of a world's own rewards rather than a reward spec
REWARD_KINDS = (None, "proxy", "gold")


class EnvConfig(TypedDict, total=False):
    """Keyword arguments every environment accepts (see `GenerationCore` for their meaning).

    The world is ``task`` (a built-in task's name, a `Task` or any `rlhf_zoo.world.World`) or ``model``
    (your own model, the CLI's ``--model``), with the user-setup keys below; a reward (``reward``) or a
    reward function (``reward_fn``); and the coefficients of the KL-shaped reward."""

    task: str | World
    model: Any  # path, hub id or a loaded PreTrainedModel
    tokenizer: Any  # path, hub id or a tokenizer object (default: the model's)
    ref_model: Any  # path, hub id or a loaded model (default: a frozen copy of ``model``)
    prompts: Any  # path / hub id of a prompt file, a list of texts / message lists, a datasets.Dataset
    gold: Any  # reward spec or Python callable: a held-out evaluator (world.gold), never paid
    reward_weights: Sequence[float] | None
    dataset: str | None  # the CLI's --dataset: its prompts when ``prompts`` is not given
    chat_template: str | None  # a file replacing the tokenizer's chat template
    eval_fraction: float | None  # share of ``prompts`` held out as the ``eval`` split (CLI default 0.1)
    dtype: str  # dtype of frozen models ("auto", "bf16", "fp16", "fp32"), as --dtype
    attn_implementation: str  # "sdpa" or "eager"
    trust_remote_code: bool
    prompt_width: int | None
    task_seed: int
    split: str
    beta: float | None
    max_new_tokens: int | None
    missing_eos_penalty: float | None
    reward: Any  # "proxy" | "gold" | None, or reward spec(s) / Python callable(s)
    kl_estimator: KLEstimator
    truncation_is_terminal: bool
    temperature: float
    device: str | torch.device
    progress: bool
    reference_model: torch.nn.Module | None
    reward_fn: Any


def resolve_task(task: str | World, seed: int = 0, progress: bool = False) -> World:
    """A world object (a `Task`, a `rlhf_zoo.user_setup.UserSetup`, any `World`) as is, or a task name
    loaded (built into the cache if missing) through the registry."""
    if isinstance(task, str):
        from rlhf_zoo.registry import get_registry

        return get_registry().task(task).load(seed=seed, progress=progress)
    return task


def user_world(model: Any, *, reward: Any = None, reward_weights: Sequence[float] | None = None,
               tokenizer: Any = None, ref_model: Any = None, prompts: Any = None, gold: Any = None,
               dataset: str | None = None, chat_template: str | None = None, eval_fraction: float | None = None,
               dtype: str = "auto", attn_implementation: str = "sdpa", trust_remote_code: bool = False,
               max_new_tokens: int | None = None, seed: int = 0, device: str | torch.device = "cpu") -> World:
    """The `rlhf_zoo.user_setup.UserSetup` world of an environment built with ``model=`` (the CLI's
    ``--model``, ``--tokenizer``, ``--ref-model``, ``--reward``, ``--reward-weights``, ``--prompts``,
    ``--gold``, ``--dataset``, ``--chat-template``, ``--eval-fraction``, ``--dtype``,
    ``--attn-implementation``, ``--trust-remote-code``), each source a path / hub id or a Python object."""
    from rlhf_zoo.registry import get_registry
    from rlhf_zoo.sources import ModelOptions
    from rlhf_zoo.user_setup import EVAL_FRACTION, UserSetup

    options = ModelOptions(dtype=dtype, attn_implementation=attn_implementation,  # type: ignore[arg-type]
                           trust_remote_code=bool(trust_remote_code))
    world = UserSetup.from_sources(
        model, tokenizer=tokenizer, ref_model=ref_model, reward=reward, reward_weights=reward_weights,
        prompts=prompts, gold=gold, dataset_source=dataset, chat_template=chat_template,
        eval_fraction=EVAL_FRACTION if eval_fraction is None else eval_fraction, model_options=options,
        max_new_tokens=int(max_new_tokens or 0), seed=seed, registry=get_registry(), device=device)
    world.tokenizer  # noqa: B018 (a tokenizer that cannot be loaded fails first, with the option's name)
    return world


@dataclass
class PromptBatch:
    """The prompts of one reset, encoded.  ``index`` (n,) int64 into the prompt table (-1: a prompt given
    in the reset options); ``ids``, ``mask`` (n, P) left-padded on the env device; ``texts`` as the world
    renders them (a chat prompt through its template; ids decoded)."""

    index: np.ndarray
    ids: torch.Tensor
    mask: torch.Tensor
    texts: list[str]


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

    The world (give ``task`` or ``model``, not both):
        task: a built-in task's name (loaded through the registry with seed ``task_seed``), a `Task`, or any
            `rlhf_zoo.world.World` (e.g. a `rlhf_zoo.user_setup.UserSetup`).
        model: your own policy (the CLI's ``--model``): a directory, a Hugging Face Hub id, or an already
            loaded ``PreTrainedModel``. Builds a `rlhf_zoo.user_setup.UserSetup` from it and these (the
            CLI's options of the same names; each a path / hub id or an object):
            tokenizer: path, hub id or tokenizer object (default: the model's own; a model object that
                does not say where it came from needs one). Used by the project's conventions: BOS iff the
                tokenizer adds one, chat template for message prompts, pad = EOS when it has none.
            ref_model: the frozen reference: path, hub id or loaded model (default: ``model`` again; a
                model object is copied, so training it never moves the reference).
            prompts: a prompt file (path or hub id, rows ``{"prompt": text or messages}``) or the prompts
                themselves: a list of texts and/or message lists (``[{"role", "content"}, ...]``), or a
                ``datasets.Dataset`` with a ``prompt`` column. As on the CLI, a seeded ``eval_fraction``
                (default 0.1, at least one) is held out as the ``eval`` split; ``split="all"`` takes both.
                Optional: without prompts the env takes its prompts from ``reset(options={"prompt": ...})``.
            gold: a held-out evaluator spec or callable (``env.core.task.gold``), never paid by the env.
            dataset, chat_template, eval_fraction, dtype, attn_implementation, trust_remote_code: as the
                CLI's ``--dataset`` (its prompts when ``prompts`` is not given), ``--chat-template``, ...

    The reward (give ``reward`` or ``reward_fn``, not both):
        reward: on a built-in task ``"proxy"`` (learned RM), ``"gold"``, or None for the task's default.
            Otherwise (and always with ``model=``) one reward or a list of them, summed with
            ``reward_weights`` (default 1 each) as ``--reward``/``--reward-weights`` are: a reward-model
            directory or hub id (scoring the decoded text with its own tokenizer unless it shares the
            policy's), a registered reward function's name, ``"module:function"``, or a Python callable
            ``f(prompts, completions, **kwargs) -> list[float]`` (TRL's convention, `rlhf_zoo.rewards`).
        reward_weights: one weight per reward.
        reward_fn: an already built reward function ``(input_ids, attention_mask, prompt_length) -> (B,)``
            to share (None: build it from ``reward``).

    The rest:
        split: the prompts `reset` draws from: ``train``, ``eval`` or ``all`` (both).
        prompt_width: the prompt width P of observations (None: the widest prompt of the split; with no
            prompts at all, the model's context minus ``max_new_tokens``). A prompt given at reset must
            fit in P tokens (else ValueError): set it wider to allow longer ones.
        beta: KL coefficient (None: the world's; 0.1 on your own model).
        max_new_tokens: response length cap T (None: the world's; 64 on your own model, within its context).
        missing_eos_penalty: subtracted from the score of a response without EOS (None: the world's).
        kl_estimator: ``k1`` (log-ratio, default), ``k2`` or ``k3`` (`rlhf_zoo.ops.kl`).
        truncation_is_terminal: report a response cut at T as terminated rather than truncated.
        temperature: the temperature of the reference log-probs; use the agent's sampling temperature.
        device: where the reference and reward models run and the state tensors live.
        progress: show build progress when ``task`` is a name whose task is not built yet.
        reference_model: an already loaded, frozen reference policy to share (None: load the world's).
        task_seed: the built-in task's seed, or the seed of a user setup's eval split.
    """

    def __init__(
        self,
        task: str | World | None = None,
        *,
        model: Any = None,
        task_seed: int = 0,
        split: str = "train",
        beta: float | None = None,
        max_new_tokens: int | None = None,
        missing_eos_penalty: float | None = None,
        reward: Any = None,
        reward_weights: Sequence[float] | None = None,
        kl_estimator: KLEstimator = "k1",
        truncation_is_terminal: bool = False,
        temperature: float = 1.0,
        device: str | torch.device = "cpu",
        progress: bool = False,
        reference_model: torch.nn.Module | None = None,
        reward_fn: Any = None,
        prompt_width: int | None = None,
        **setup: Any,
    ) -> None:
        kl_penalty(torch.zeros(1), torch.zeros(1), kl_estimator)  # raises on an unknown estimator
        unknown = sorted(set(setup) - set(USER_SETUP_KEYS))
        if unknown:
            raise TypeError(f"unknown environment keyword argument(s) {', '.join(map(repr, unknown))}; see "
                            "rlhf_zoo_envs.core.GenerationCore for the known ones")
        setup = {k: v for k, v in setup.items() if v is not None}
        if reward_fn is not None and reward is not None:
            raise ValueError("give either reward (a kind, spec or callable) or reward_fn (a reward function), not both")
        if setup.get("ref_model") is not None and reference_model is not None:
            raise ValueError("give either ref_model (a source) or reference_model (a loaded, shared reference), not both")
        self.device = torch.device(device)
        own = model is not None  # the user's own setup, built here
        if own:
            if task is not None:
                raise ValueError("give either task= (a built-in task or a World) or model= (your own model), not both")
            self.task = user_world(model, reward=reward, reward_weights=reward_weights, max_new_tokens=max_new_tokens,
                                   seed=task_seed, device=self.device, **setup)
        elif task is None:
            raise TypeError("an environment needs a world: task= (a built-in task's name, a Task or a World) or "
                            "model= (your own model: a directory, a hub id or a loaded model)")
        elif setup:
            raise ValueError(f"{', '.join(sorted(setup))} describe your own model's setup and go with model=, not "
                             f"with task=; on a task give prompts at reset: reset(options={{'prompt': ...}})")
        else:
            self.task = resolve_task(task, task_seed, progress)
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

        self.reward_fn = reward_fn if reward_fn is not None else self._reward_function(reward, reward_weights, own)
        self.ref_model = (reference_model or self.task.load_reference(self.device)).eval()
        self.ref_model.requires_grad_(False)
        self.vocab_size = int(self.ref_model.get_output_embeddings().weight.shape[0])
        self.eos_token_id = int(self.task.eos_token_id)
        self.pad_token_id = int(self.task.pad_token_id)
        self.suppress_ids = list(self.task.suppress_ids)
        self._set_prompt_table(split, prompt_width, own)

    def _reward_function(self, reward: Any, weights: Sequence[float] | None, own: bool) -> Any:
        """The world's own reward (``reward`` a kind, or the user setup's ``reward=``), else the reward
        specs / callables of ``reward`` summed over this world (`rlhf_zoo.rewards.combine`)."""
        from rlhf_zoo.rewards import MissingReward, combine

        if own or (isinstance(reward, str) and reward in REWARD_KINDS) or reward is None:
            if weights is not None and not own:
                raise ValueError("reward_weights weigh reward specs or callables (reward=[...]), not a reward kind")
            fn = self.task.reward_function(None if own else reward, self.device)
            if isinstance(fn, MissingReward):
                raise ValueError("an environment on your own model needs reward= (a reward model directory or hub "
                                 "id, a registered reward function, 'module:function', a Python callable "
                                 "f(prompts, completions, **kwargs) -> list[float], or a list of these) or reward_fn=")
            return fn
        from rlhf_zoo.registry import get_registry
        from rlhf_zoo.sources import is_local

        registry = get_registry()
        specs = [reward] if isinstance(reward, str) or callable(reward) else list(reward)
        for spec in specs:  # a built-in world runs offline: a bare word is a misspelt kind, not a hub id
            if isinstance(spec, str) and ":" not in spec and spec not in registry.reward_functions and not is_local(spec):
                raise ValueError(f"unknown reward {spec!r}; known: proxy, gold, a registered reward function "
                                 f"({', '.join(sorted(registry.reward_functions)) or 'none'}), 'module:function', a "
                                 "reward model directory, or a Python callable")
        return combine(specs, weights, "reward", self.task, self.device, registry)

    def _set_prompt_table(self, split: str, prompt_width: int | None, own: bool) -> None:
        """The encoded prompts of ``split`` (the table `reset` draws from) and the prompt width P."""
        from rlhf_zoo.errors import ConfigError

        try:
            texts = ([*self.task.prompts("train"), *self.task.prompts("eval")] if split == "all"
                     else list(self.task.prompts(split)))
        except ConfigError:
            if not own:  # a world handed over without prompts: its error names the option that gives them
                raise
            texts = []  # your own model without prompts=: every reset gives its prompt
        if not texts and not own:
            raise ValueError(f"task {self.task.name!r} has no {split!r} prompts")
        self.prompt_texts: list[str] = texts
        ids, mask = self.task.encode_prompts(texts, self.device) if texts else (None, None)
        widest = 0 if ids is None else int(ids.shape[1])
        context = self.task.max_positions
        explicit = prompt_width is not None
        if prompt_width is None:
            if texts:
                prompt_width = widest
            elif context is not None and context > self.max_new_tokens:
                prompt_width = context - self.max_new_tokens
            else:
                raise ValueError("no prompts and no known context length: give prompt_width= (the longest prompt, "
                                 "in tokens, that reset(options={'prompt': ...}) will be given)")
        P = int(prompt_width)
        if P < max(widest, 1):
            raise ValueError(f"prompt_width={P} is narrower than the widest {split!r} prompt ({widest} tokens)")
        if explicit and context is not None and P + self.max_new_tokens > context:
            raise ValueError(f"prompt_width={P} + max_new_tokens={self.max_new_tokens} exceeds the model's context of "
                             f"{context} tokens")
        if ids is None:
            ids = torch.zeros((0, P), dtype=torch.long, device=self.device)
            mask = torch.zeros((0, P), dtype=torch.long, device=self.device)
        elif P > widest:  # left-pad the table to P
            ids = torch.nn.functional.pad(ids, (P - widest, 0), value=self.pad_token_id)
            mask = torch.nn.functional.pad(mask, (P - widest, 0), value=0)
        self.prompt_table_ids, self.prompt_table_mask = ids, mask
        self.prompt_width = P

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

    def select_prompts(
        self, rng: np.random.Generator, n: int, options: Mapping[str, Any] | None, extra_keys: Sequence[str] = ()
    ) -> PromptBatch:
        """The prompts of a reset of ``n`` rows, from its options (at most one of these):

        - ``prompt``: one prompt for every row, given as a text, a list of ``{"role", "content"}``
          messages (rendered with the tokenizer's chat template, generation prompt added) or a list /
          array of token ids (used as they are: no BOS added);
        - ``prompts``: ``n`` prompts, one per row, each as for ``prompt``;
        - ``prompt_index``: index into the table (``world.prompts(split)``) for every row;
          ``prompt_indices``: ``n`` indices;
        - none: ``n`` indices drawn uniformly with ``rng``.

        A prompt given as text or messages is encoded by the world's convention (BOS iff its tokenizer
        adds one) and remembered by the world, so that a reward sees it as given (messages stay messages).
        Every prompt is left-padded to P; one longer than P tokens, or empty, raises ValueError (the
        observation space is fixed: build the env with a larger ``prompt_width`` for longer prompts).
        Any other key (besides ``extra_keys``) raises ValueError naming it.  -> `PromptBatch`"""
        options = dict(options or {})
        known = (*PROMPT_OPTIONS, *extra_keys)
        for key in options:
            if key not in known:
                raise ValueError(f"unknown reset option {key!r}; known: {', '.join(known)}")
        chosen = [k for k in PROMPT_OPTIONS if k in options]
        if len(chosen) > 1:
            raise ValueError(f"reset options {' and '.join(map(repr, chosen))} both choose the prompts; give one")
        if "prompt" in options or "prompts" in options:
            if "prompt" in options:
                given = [options["prompt"]] * n
            else:
                given = options["prompts"]
                given = given.tolist() if isinstance(given, torch.Tensor) else list(given)
                if len(given) != n:
                    raise ValueError(f"options['prompts'] needs {n} prompt(s), one per row, got {len(given)}")
            return self.encode_given_prompts(given, "prompt" if "prompt" in options else "prompts")
        if not self.prompt_texts and not chosen:
            raise ValueError("this environment has no prompts of its own (no prompts= given): give one at reset, "
                             "reset(options={'prompt': text | messages | token ids}), or build it with prompts=")
        idx = self.choose_prompts(rng, n, options)
        ids, mask = self.prompts(idx)
        return PromptBatch(idx, ids, mask, [self.prompt_texts[i] for i in idx])

    def encode_given_prompts(self, prompts: Sequence[Any], option: str = "prompts") -> PromptBatch:
        """Prompts given at reset (texts, message lists or token ids) encoded to (n, P).  See `select_prompts`."""
        world, P = self.task, self.prompt_width
        rows: list[list[int]] = []
        texts: list[str] = []
        for i, prompt in enumerate(prompts):
            where = f"options[{option!r}]" + (f"[{i}]" if option == "prompts" else "")
            kind = prompt_kind(prompt, where)
            text = ""
            if kind == "ids":
                ids = [int(t) for t in np.asarray(prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt,
                                                   dtype=np.int64).reshape(-1)]
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise ValueError(f"{where}: token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
                if ids:
                    row = torch.tensor([ids], dtype=torch.long)
                    text = world.prompt_texts_from_ids(row, torch.ones_like(row))[0]
            else:
                original = list(prompt) if kind == "messages" else prompt
                add = getattr(world, "add_prompts", None)  # a user setup remembers it for the reward
                if add is not None:
                    text = add([original])[0]
                else:
                    text = world.render_messages(original) if kind == "messages" else original
                ids = world.prompt_token_ids([text])[0]
            if not ids:
                raise ValueError(f"{where}: the prompt has no tokens")
            if len(ids) > P:
                raise ValueError(f"{where}: the prompt has {len(ids)} tokens, more than the environment's prompt width "
                                 f"P = {P} (the widest {self.split!r} prompt, or prompt_width=); build the "
                                 f"environment with prompt_width={len(ids)} or more for prompts this long")
            rows.append(ids)
            texts.append(text)
        ids_t, mask_t = pad_rows(rows, self.pad_token_id, left=True, device=self.device, min_len=P)
        return PromptBatch(np.full(len(rows), -1, dtype=np.int64), ids_t, mask_t, texts)

    def reset_info(self, prompts: PromptBatch | np.ndarray) -> dict[str, Any]:
        """Vector-style reset info: ``prompt_index`` (n,) (-1 for a prompt given in the options) and
        ``prompt`` (n,) object (its text), every row set."""
        if not isinstance(prompts, PromptBatch):  # indices into the table
            idx = np.asarray(prompts, dtype=np.int64)
            prompts = PromptBatch(idx, *self.prompts(idx), [self.prompt_texts[i] for i in idx])
        idx = prompts.index
        ones = np.ones(len(idx), dtype=bool)
        text = np.empty(len(idx), dtype=object)
        text[:] = prompts.texts
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
def prompt_kind(prompt: Any, where: str = "prompt") -> str:
    """How a prompt is given: ``text`` (a string), ``messages`` (a non-empty list of ``{"role", "content"}``
    mappings) or ``ids`` (a list / array / tensor of token ids); else ValueError."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        integer = (not prompt.dtype.is_floating_point and not prompt.dtype.is_complex and prompt.dtype != torch.bool
                   if isinstance(prompt, torch.Tensor) else np.issubdtype(prompt.dtype, np.integer))
        if not integer:
            raise ValueError(f"{where}: token ids must be integers, got an array of {prompt.dtype}")
        return "ids"
    if isinstance(prompt, (list, tuple)):
        if prompt and all(isinstance(m, Mapping) for m in prompt):
            return "messages"
        if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            return "ids"
    raise ValueError(f"{where}: a prompt is a text, a list of {{'role', 'content'}} messages or a list of token "
                     f"ids; got {type(prompt).__name__} {str(prompt)[:80]!r}")


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

    Subclasses set ``episodes_cls`` (built as ``episodes_cls(core, prompt_index, prompt_ids, prompt_mask)``),
    implement ``action_space_for(core)`` and ``step``. Reset options: see `GenerationCore.select_prompts`.
    """

    metadata = {"render_modes": ["ansi"]}
    episodes_cls: type

    def __init__(self, task: str | World | None = None, *, render_mode: str | None = None, **config: Any) -> None:
        self.core = GenerationCore(task, **config)
        self.observation_space = self.core.observation_space()
        self.action_space = self.action_space_for(self.core)
        self.render_mode = render_mode
        self._episodes: Any = None

    def action_space_for(self, core: GenerationCore) -> spaces.Dict:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        prompts = self.core.select_prompts(self.np_random, 1, options)
        self._episodes = self.episodes_cls(self.core, prompts.index, prompts.ids, prompts.mask)
        return row_observation(self._episodes.observation()), row_info(self.core.reset_info(prompts))

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
