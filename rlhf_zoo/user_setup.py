"""A user's own setup as a world: their model, tokenizer, rewards, prompts, data and optional gold.

``zoo run ALGO --model PATH|HUB_ID [--ref-model ...] [--reward SPEC ...] [--prompts ...] [--gold SPEC]``
builds a `UserSetup`; it presents the interface of `rlhf_zoo.world.World`, the same as a built-in task's,
so the runner, the environments and every algorithm (third-party ones included) run on it unchanged.

  policy      ``--model``, any ``AutoModelForCausalLM``, fp32 (trained); its tokenizer from the same place
              unless ``--tokenizer``; ``--chat-template FILE`` replaces the tokenizer's template
  reference   ``--ref-model`` or the ``--model`` again, frozen, in the ``--dtype`` of frozen models
  reward      ``--reward SPEC`` (repeatable, weighted by ``--reward-weights``; `rlhf_zoo.rewards`)
  gold        ``--gold SPEC``: a held-out evaluator, never optimised; summary.json's ``gold_reward``
  prompts     ``--prompts``: prompt-only rows; a seeded ``--eval-fraction`` of them (at least one) is held
              out for evaluation. Without ``--prompts``, a run with ``--dataset`` takes the dataset's
              prompts (then evaluation prompts are also training prompts: give ``--prompts`` for held-out)
  datasets    ``pretrain`` from ``--ptx-dataset`` (rows ``{"text"}``); the algorithm's ``--dataset`` for
              the rest (a user setup has no built-in sft, pairs or rankings)
  critic      PPO's critic starts from the first ``--reward`` model that reads the policy's tokens, else
              from the policy's trunk with a new scalar head (zero-initialised); config.json says which
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_zoo.data import RowPolicy, load_prompts, read_records
from rlhf_zoo.errors import ConfigError, DataError
from rlhf_zoo.rewards import CombinedReward, MissingReward, combine
from rlhf_zoo.sources import ModelOptions, context_length, load_causal_lm, load_tokenizer
from rlhf_zoo.world import World

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_BETA = 0.1  # DPO's and TRL's default; PPO's KL coefficient on a user setup too
EVAL_FRACTION = 0.1
#: which option provides each dataset a plugin may ask for
DATASET_OPTIONS = {"pretrain": "--ptx-dataset", "sft": "--dataset", "pairs": "--dataset",
                   "rankings": "--dataset", "heldout": "--dataset"}


@dataclass
class UserSetup(World):
    """See the module docstring. Models, tokenizer and rewards load on first use."""

    model: Any  # a directory, a Hub id, or a loaded causal LM (the environments take objects)
    tokenizer_source: Any = None  # likewise a tokenizer object
    ref_model: Any = None
    rewards: tuple[Any, ...] = ()  # specs (`rlhf_zoo.rewards`) or Python callables
    reward_weights: tuple[float, ...] = ()
    gold_spec: str | None = None
    prompts_source: Any = None  # a file, a Hub id, a list of prompts or a datasets.Dataset
    dataset_source: str | None = None  # the algorithm's --dataset: prompts when --prompts is not given
    ptx_dataset: str | None = None
    chat_template: str | None = None
    eval_fraction: float = EVAL_FRACTION
    model_options: ModelOptions = field(default_factory=ModelOptions)
    max_new_tokens: int = 0  # 0: DEFAULT_MAX_NEW_TOKENS, within the context length
    beta: float = DEFAULT_BETA
    missing_eos_penalty: float = 0.0
    seed: int = 0
    registry: Any = None
    device: str | torch.device = "cpu"
    name: str = "user"
    reward_models: tuple[str, ...] = ("reward",)
    manifest: dict[str, Any] = field(default_factory=dict)
    _prompt_report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.beta is None or not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        context = self.max_positions
        if not self.max_new_tokens:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS if context is None else min(DEFAULT_MAX_NEW_TOKENS, context // 2)
        if context is not None and self.max_new_tokens >= context:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in --model "
                              f"{source_name(self.model)!r}'s context of {context} tokens")

    @classmethod
    def from_sources(
        cls, model: Any, *, tokenizer: Any = None, ref_model: Any = None, reward: Any = None,
        reward_weights: Sequence[float] | None = None, prompts: Any = None, gold: Any = None, **kwargs: Any,
    ) -> UserSetup:
        """A user setup from the sources the CLI takes, given as paths / hub ids or as Python objects (the
        environments' ``gymnasium.make(..., model=...)``):

          model, ref_model  a path or hub id, or an already loaded ``PreTrainedModel`` (the reference of a
                            model object without ``ref_model`` is a frozen copy of it, never the object)
          tokenizer         a path or hub id, or a tokenizer object (default: the model's; a model object
                            needs one unless its ``name_or_path`` is a directory or hub id); used by the
                            project's conventions (pad = EOS when missing) on a copy, never changed in place
          reward, gold      a spec (reward-model dir or hub id, registered function, ``module:function``) or
                            a Python callable ``f(prompts, completions, **kwargs) -> list[float]``; ``reward``
                            may be a list of those, summed with ``reward_weights``
          prompts           a prompt file's path or hub id, or the prompts themselves: a list of strings
                            and/or message lists (or rows ``{"prompt": ...}``), or a ``datasets.Dataset``

        ``kwargs``: the other fields (``dataset_source``, ``chat_template``, ``eval_fraction``,
        ``model_options``, ``max_new_tokens``, ``beta``, ``seed``, ``registry``, ``device``, ...)."""
        if reward is None:
            rewards: tuple[Any, ...] = ()
        elif isinstance(reward, (str, Path)) or callable(reward):
            rewards = (reward if callable(reward) else str(reward),)
        else:
            rewards = tuple(r if callable(r) else str(r) for r in reward)
        return cls(model=model if not isinstance(model, Path) else str(model), tokenizer_source=tokenizer,
                   ref_model=ref_model, rewards=rewards, reward_weights=tuple(reward_weights or ()), gold_spec=gold,
                   prompts_source=str(prompts) if isinstance(prompts, Path) else prompts, **kwargs)

    # --- what the world has -------------------------------------------------------------------------
    @property
    def objectives(self) -> Sequence[str]:
        return ("gold",) if self.gold_spec else ()

    @property
    def has_reward(self) -> bool:
        return bool(self.rewards)

    @cached_property
    def model_config(self) -> Any:
        from transformers import AutoConfig

        from rlhf_zoo.sources import _explain, _resolve, hub_kwargs

        if not is_source_path(self.model):  # a model object
            return self.model.config
        try:
            return AutoConfig.from_pretrained(_resolve(self.model), trust_remote_code=self.model_options.trust_remote_code,
                                              **hub_kwargs())
        except (OSError, ValueError, KeyError) as e:
            raise _explain("--model", self.model, "a model config", e) from None

    @property
    def max_positions(self) -> int | None:
        return context_length(self.model_config)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": source_name(self.model),
                "tokenizer": source_name(self.tokenizer_source or self.model),
                "ref_model": source_name(self.ref_model or self.model),
                "rewards": [source_name(r) for r in self.rewards],
                "reward_weights": list(self.reward_weights) or [1.0] * len(self.rewards),
                "gold": source_name(self.gold_spec), "prompts": source_name(self.prompts_source),
                "ptx_dataset": self.ptx_dataset, "chat_template": self.chat_template,
                "eval_fraction": self.eval_fraction, "dtype": self.model_options.dtype,
                "critic_init_for_ppo": self.critic_origin(),
                "attn_implementation": self.model_options.attn_implementation,
                "architecture": (getattr(self.model_config, "architectures", None) or ["?"])[0]}

    # --- tokenizer ------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Any:
        option = "--tokenizer" if self.tokenizer_source else "--model"
        tok = tokenizer_from(self.tokenizer_source, self.model, option, self.model_options.trust_remote_code)
        if self.chat_template:
            try:
                tok.chat_template = Path(self.chat_template).read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"--chat-template {self.chat_template!r}: cannot be read ({e.strerror or e})") from None
        return tok

    def tokenizer_origin(self) -> str:
        if self.tokenizer_source is not None:
            return f"--tokenizer {source_name(self.tokenizer_source)!r}"
        return f"--model {source_name(self.model)!r}"

    # --- prompts --------------------------------------------------------------------------------------
    @cached_property
    def _prompt_table(self) -> dict[str, list[str]]:
        """Prompt texts by split, and the originals by text (filled as a side effect)."""
        if self.prompts_source:
            kept, report = (load_prompts(self.prompts_source, RowPolicy(), self, self.max_new_tokens)
                            if is_source_path(self.prompts_source) else self._given_prompts(self.prompts_source))
            self._prompt_report = report.metrics()["dataset"]
            pairs = kept
        elif self.dataset_source:
            pairs = self._dataset_prompts(self.dataset_source)
        else:
            raise ConfigError("no prompts: give --prompts FILE|HUB_ID (rows {\"prompt\": text or messages}); the "
                              "online algorithms sample responses to them and the evaluation uses a held-out part")
        self._originals = {text: original for text, original in pairs}
        texts = list(dict.fromkeys(text for text, _ in pairs))  # unique, in file order
        if len(texts) < 2:
            raise DataError(f"{source_name(self.prompts_source or self.dataset_source)}: {len(texts)} distinct "
                            "prompt(s); at least 2 are needed (one or more held out for evaluation)")
        order = np.random.default_rng(self.seed).permutation(len(texts))
        n_eval = max(1, int(round(len(texts) * self.eval_fraction)))
        held = set(order[:n_eval].tolist())
        return {"train": [t for i, t in enumerate(texts) if i not in held],
                "eval": [t for i, t in enumerate(texts) if i in held]}

    def _given_prompts(self, prompts: Any) -> tuple[list[tuple[str, Any]], Any]:
        """Prompts given as objects (a list of strings / message lists / rows, or a ``datasets.Dataset``),
        validated as the rows of a prompt file are."""
        from rlhf_zoo.data import length_caps, numbered, validate_prompts

        rows = [r if isinstance(r, dict) else {"prompt": r} for r in prompts]
        return validate_prompts(numbered(rows), RowPolicy(), source="prompts", tokenizer=self.tokenizer,
                                caps=length_caps(self, self.max_new_tokens), render=self.render_messages)

    def _dataset_prompts(self, source: str) -> list[tuple[str, Any]]:
        from rlhf_zoo.data import read_rows, validate_rankings, validate_sft

        rows = read_rows(source)
        options = RowPolicy(bad_rows="drop", max_drop_fraction=1.0)
        try:
            rankings = validate_rankings(rows, options, source=str(source), render=self.render_messages)[0]
            return [(r.prompt, r.prompt) for r in rankings]
        except DataError:
            pairs = validate_sft(rows, options, source=str(source), render=self.render_messages)[0]
            return [(p, p) for p, _ in pairs]

    @property
    def prompts_report(self) -> dict[str, Any] | None:
        """What validating the ``--prompts`` file did (rows, dropped, truncated), once it is read."""
        return self._prompt_report or None

    def prompts(self, split: str) -> list[str]:
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}; known: train, eval")
        return list(self._prompt_table[split])

    def original_prompt(self, text: str) -> Any:
        try:
            self._prompt_table  # noqa: B018 (loads the originals)
        except ConfigError:  # no prompts of its own (an environment given its prompts at reset)
            pass
        return getattr(self, "_originals", {}).get(text, text)

    @cached_property
    def _prompt_by_ids(self) -> dict[tuple[int, ...], str]:
        try:
            texts = [t for split in ("train", "eval") for t in self._prompt_table[split]]
        except ConfigError:  # no prompts of its own: only those given with `add_prompts`
            texts = []
        texts = list(dict.fromkeys([*texts, *getattr(self, "_originals", {})]))
        return {tuple(ids): t for ids, t in reversed(list(zip(self.prompt_token_ids(texts), texts, strict=True)))}

    def prompt_texts_from_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """The known prompt text of each row, else its tokens decoded with special tokens kept (BOS dropped)."""
        try:
            known = self._prompt_by_ids
        except ConfigError:  # no prompts at all (an environment driven with explicit prompts)
            known = {}
        out = []
        bos = self.tokenizer.bos_token_id
        for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
            real = tuple(i for i, keep in zip(row, m, strict=True) if keep)
            if real in known:
                out.append(known[real])
                continue
            body = list(real[1:]) if real and real[0] == bos else list(real)
            out.append(self.tokenizer.decode(body, skip_special_tokens=False))
        return out

    def add_prompts(self, prompts: Sequence[Any]) -> list[str]:
        """Texts of prompts given directly (strings or message lists), remembered for rewards."""
        texts = [self.render_messages(p, True) if isinstance(p, list) else str(p) for p in prompts]
        try:
            self._prompt_table  # noqa: B018 (loads the originals)
        except ConfigError:  # no prompts of its own (an environment given its prompts at reset)
            pass
        originals = self.__dict__.setdefault("_originals", {})
        new = [(t, p) for t, p in zip(texts, prompts, strict=True) if t not in originals]
        originals.update(new)
        if new and "_prompt_by_ids" in self.__dict__:  # extend the lookup, do not rebuild it
            by_ids = self.__dict__["_prompt_by_ids"]
            for ids, (text, _) in zip(self.prompt_token_ids([t for t, _ in new]), new, strict=True):
                by_ids.setdefault(tuple(ids), text)
        return texts

    # --- datasets -------------------------------------------------------------------------------------
    def dataset(self, name: str) -> Any:
        import datasets

        if name == "pretrain" and self.ptx_dataset:
            texts = []
            for i, row in enumerate(read_records(self.ptx_dataset), start=1):
                if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                    raise DataError(f"{Path(self.ptx_dataset).name} row {i}: expected {{\"text\": non-empty string}}")
                texts.append(row["text"])
            return datasets.Dataset.from_dict({"text": texts})
        option = DATASET_OPTIONS.get(name.split("_")[0], "--dataset")
        raise ConfigError(f"this algorithm reads the dataset {name!r}, which a run on your own model does not have; "
                          f"give {option} FILE|HUB_ID")

    # --- models ---------------------------------------------------------------------------------------
    def _check_vocab(self, model: Any, option: str) -> Any:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            raise ConfigError(f"{option} {source_name(self.model)!r}: the tokenizer has {len(self.tokenizer)} tokens "
                              f"but the model's embedding only {rows} rows; use the tokenizer the model was trained with")
        return model

    def load_policy(self, device: str | torch.device = "cpu") -> Any:
        if not is_source_path(self.model):  # a model object: that very model, moved to ``device``
            return self._check_vocab(self.model.to(device), "--model")
        model = load_causal_lm(self.model, "--model", device, options=self.model_options, trainable=True)
        return self._check_vocab(model, "--model")

    def load_reference(self, device: str | torch.device = "cpu") -> Any:
        option, source = ("--ref-model", self.ref_model) if self.ref_model else ("--model", self.model)
        if not is_source_path(source):  # a model object
            return self._check_vocab(frozen_reference(source, option == "--ref-model", device, self.model_options),
                                     option)
        model = load_causal_lm(source, option, device, options=self.model_options, trainable=False)
        return self._check_vocab(model, option)

    @cached_property
    def critic_reward_model(self) -> str | None:
        """The first ``--reward`` that is a reward model reading the policy's tokens (PPO's critic starts
        from it), or None."""
        from rlhf_zoo.rewards import is_function_spec, same_vocabulary

        for spec in self.rewards:
            if not is_function_spec(spec, self.registry):
                tok = load_tokenizer(spec, "--reward", self.model_options.trust_remote_code)
                if same_vocabulary(tok, self.tokenizer):
                    return spec
        return None

    def critic_origin(self) -> str:
        spec = self.critic_reward_model
        return f"reward model {spec!r}" if spec else "policy trunk (--model) with a new scalar head (zero-initialised)"

    def load_critic(self, device: str | torch.device, policy: torch.nn.Module) -> tuple[Any, str]:
        from rlhf_zoo.models import reward_model_from_policy
        from rlhf_zoo.sources import load_sequence_classifier

        spec = self.critic_reward_model
        if spec:
            critic = load_sequence_classifier(spec, "--reward", device, options=self.model_options, trainable=True)
        else:  # from the --model's weights (a fresh copy: the policy may carry a LoRA adapter)
            critic = reward_model_from_policy(self.load_policy("cpu")).to(device)
        return critic.float(), self.critic_origin()

    @cached_property
    def _reward(self) -> CombinedReward | MissingReward:
        if not self.rewards:
            return MissingReward(source_name(self.model))
        return combine(self.rewards, self.reward_weights, "--reward", self, torch.device(self.device), self.registry)

    @cached_property
    def _gold(self) -> CombinedReward:
        return combine([self.gold_spec], None, "--gold", self, torch.device(self.device), self.registry)

    def reward_function(self, kind: str | None = None, device: str | torch.device = "cpu") -> Any:
        if kind in (None, "proxy"):
            return self._reward
        if kind == "gold":
            if not self.gold_spec:
                raise ConfigError("the gold reward was asked for, and there is none: give --gold SPEC")
            return self._gold
        raise ValueError(f"unknown reward kind {kind!r}; known: proxy, gold")

    def gold(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        if not self.gold_spec:
            raise ConfigError("no gold evaluator: give --gold SPEC")
        return {"gold": self._gold.score_texts(prompts, responses).double().numpy()}


# --- sources given as Python objects (the environments' model=, tokenizer=, reward=, prompts=) -----------
def is_source_path(source: Any) -> bool:
    """Whether a source is a path or hub id (a string), not an object given directly."""
    return isinstance(source, (str, Path))


def source_name(source: Any) -> Any:
    """What config.json and messages show for a source: a path or hub id as is; an object by its
    ``name_or_path`` or its kind (a callable reward as ``module:qualname``)."""
    if source is None or isinstance(source, (str, int, float)):
        return source
    if isinstance(source, Path):
        return str(source)
    name = getattr(source, "name_or_path", None) or getattr(getattr(source, "config", None), "_name_or_path", None)
    if name:
        return f"{type(source).__name__}({name})"
    if isinstance(source, torch.nn.Module):
        return f"{type(source).__name__} object"
    if callable(source):
        from rlhf_zoo.rewards import callable_name

        return callable_name(source)
    try:
        return f"{type(source).__name__} of {len(source)} prompts"
    except TypeError:
        return type(source).__name__


def adopt_tokenizer(tokenizer: Any, option: str = "--tokenizer") -> Any:
    """A tokenizer object set up by the project's conventions as `rlhf_zoo.sources.load_tokenizer` sets up a
    loaded one (pad = EOS when missing, left padding), on a copy: the caller's object is never changed."""
    import copy

    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError(f"{option}: the tokenizer has no EOS token; responses need one to end (set its eos_token)")
    tok = copy.deepcopy(tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def tokenizer_from(source: Any, model: Any, option: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a setup: ``source`` (a path, hub id or tokenizer object), else the model's (a model
    object's from its ``name_or_path``)."""
    if source is not None and not is_source_path(source):
        return adopt_tokenizer(source, option)
    if source is not None or is_source_path(model):
        return load_tokenizer(source if source is not None else model, option, trust_remote_code)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ConfigError("a model given as an object needs its tokenizer too (tokenizer=, an object, a directory "
                          "or a hub id): the model does not say where it was loaded from")
    return load_tokenizer(name, option, trust_remote_code)


def frozen_reference(model: Any, given: bool, device: str | torch.device, options: ModelOptions) -> Any:
    """The frozen reference from a model object: a reference given as such (``given``) is used as is, moved
    to ``device``; a policy object is copied (its training must not move the reference) into the dtype of
    frozen models, as a reference loaded from a path would be."""
    import copy

    device = torch.device(device)
    ref = model.to(device) if given else copy.deepcopy(model).to(device=device, dtype=options.frozen_dtype(device))
    return ref.eval().requires_grad_(False)
