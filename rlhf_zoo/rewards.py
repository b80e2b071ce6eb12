"""Rewards as one protocol: scorers of (prompt, response) batches, summed with weights.

A reward is given (``--reward SPEC``, repeatable; ``--gold SPEC`` for a held-out evaluator) in one of
three forms, tried in this order:

  1. ``module:function``: a Python callable ``f(prompts, completions, **kwargs) -> list[float]``, the
     convention of TRL's online trainers. ``prompts`` are the prompts as given (a string, or a list of
     ``{"role", "content"}`` messages for a conversational prompt); ``completions`` are strings, or for a
     conversational prompt ``[{"role": "assistant", "content": text}]``; keyword arguments:
     ``completion_ids`` (token ids, EOS excluded). The module is imported from the current directory
     first, then from the installed packages;
  2. the name of a registered reward function (``zoo list``): a plugin's ``factory(world)`` returns such
     a callable (or one of the token protocol ``(input_ids, attention_mask, prompt_length) -> (B,)``,
     which then reads the policy's tokens);
  3. a path or Hugging Face Hub id of a sequence-classification reward model (one label) with its own
     tokenizer. When that tokenizer is the policy's, the model scores the policy's token ids as they are
     (exactly what ``zoo run reward-model`` trained it on); otherwise the decoded text is tokenised again
     with the reward model's tokenizer by the same conventions (BOS by its tokenizer's rule, EOS after
     the response; a conversational prompt through its own chat template when it has one).

Several rewards are summed, ``sum_i w_i r_i``, with weights from ``--reward-weights`` (default 1 each).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_zoo.errors import ConfigError
from rlhf_zoo.world import bos_once_batch, pad_rows

TextReward = Callable[..., Sequence[float]]


@dataclass
class ScoreBatch:
    """One batch to score, in every form a scorer may want."""

    prompts: list[Any]  # as given: strings or message lists
    prompt_texts: list[str]  # as the policy sees them (chat template applied)
    completions: list[str]
    completion_ids: list[list[int]]
    input_ids: torch.Tensor | None = None  # (B, P + T) the policy's tokens, when they exist
    attention_mask: torch.Tensor | None = None
    prompt_width: int = 0  # P


@dataclass
class RewardTerm:
    """One reward: its spec, weight, kind (``function`` or ``model``) and scorer ``ScoreBatch -> (B,)``."""

    spec: str
    weight: float
    kind: str
    scorer: Callable[[ScoreBatch], torch.Tensor]
    model: Any = None  # the reward model of a ``model`` term
    same_tokenizer: bool = False  # a model term that reads the policy's token ids


def _check_values(values: Any, n: int, option: str, spec: str) -> torch.Tensor:
    try:
        out = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{option} {spec!r} must return a list of numbers, one per completion ({e})") from None
    if out.numel() != n:
        raise ConfigError(f"{option} {spec!r} returned {out.numel()} values for {n} completions; it must return "
                          "one number per completion")
    bad = (~torch.isfinite(out)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ConfigError(f"{option} {spec!r} returned {out[i].item()} for completion {i} of the batch; rewards "
                          "must be finite numbers")
    return out


def import_callable(spec: str, option: str) -> TextReward:
    """``module:function`` (dots allowed in both parts), the current directory importable first."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{option} {spec!r}: expected module:function")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # any failure while importing the user's module is theirs to fix
        raise ConfigError(f"{option} {spec!r}: cannot import module {module_name!r} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{option} {spec!r}: {attr!r} is not callable")
    return obj


def _token_scorer(fn: Any, world: Any, option: str, spec: str) -> Callable[[ScoreBatch], torch.Tensor]:
    """A registered reward function of the token protocol ``(input_ids, attention_mask, prompt_length)``."""
    def score(batch: ScoreBatch) -> torch.Tensor:
        ids, mask = batch.input_ids, batch.attention_mask
        if ids is None:  # text only (a gold evaluation): encode it as the policy would see it
            p_ids, p_mask = world.encode_prompts(batch.prompt_texts)
            r_ids, r_mask = world.encode_responses(batch.completions)
            ids, mask, width = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1]
        else:
            width = batch.prompt_width
        return _check_values(fn(ids, mask, width).tolist(), len(batch.completions), option, spec)

    return score


def _takes_tokens(fn: Any) -> bool:
    import inspect

    try:
        return "input_ids" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _function_scorer(fn: TextReward, option: str, spec: str) -> Callable[[ScoreBatch], torch.Tensor]:
    def score(batch: ScoreBatch) -> torch.Tensor:
        completions: list[Any] = [
            [{"role": "assistant", "content": c}] if isinstance(p, list) else c
            for p, c in zip(batch.prompts, batch.completions, strict=True)]
        try:
            values = fn(prompts=list(batch.prompts), completions=completions, completion_ids=batch.completion_ids)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{option} {spec!r} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              ) from None
        return _check_values(values, len(batch.completions), option, spec)

    return score


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (vocabulary, BOS and EOS)."""
    return a is b or (a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id
                      and a.eos_token_id == b.eos_token_id)


def _model_scorer(model: Any, tokenizer: Any, same: bool, device: torch.device) -> Callable[[ScoreBatch], torch.Tensor]:
    from rlhf_zoo.models import reward_scores

    def score(batch: ScoreBatch) -> torch.Tensor:
        if same and batch.input_ids is not None:
            ids, mask = batch.input_ids, batch.attention_mask
        else:
            texts = [tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                     if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None) and not same else text
                     for prompt, text in zip(batch.prompts, batch.prompt_texts, strict=True)]
            completions = list(batch.completions)
            # two batched tokenizer calls for the prompts and one for the completions, not three per row
            ids_c = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
            rows = [[*p, *c, tokenizer.eos_token_id]
                    for p, c in zip(bos_once_batch(tokenizer, texts), ids_c, strict=True)]
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            ids, mask = pad_rows(rows, pad, left=False, device=device)
        with torch.no_grad():
            return reward_scores(model, ids.to(device), mask.to(device)).float().cpu()

    return score


def is_function_spec(spec: str, registry: Any = None) -> bool:
    """Whether a spec names a Python callable or a registered reward function (not a reward model); a
    Python callable given as an object counts as one."""
    from rlhf_zoo.sources import is_local

    if is_callable_reward(spec):
        return True
    if is_local(spec):
        return False
    return ":" in spec or (registry is not None and spec in registry.reward_functions)


def is_callable_reward(spec: Any) -> bool:
    """Whether a reward is given as a Python callable object (not a spec string, not a loaded model)."""
    return callable(spec) and not isinstance(spec, (str, torch.nn.Module))


def callable_name(fn: Any) -> str:
    """A readable name of a callable reward (``module:qualname``), its spec in `RewardTerm` and logs."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if name is None:  # a callable instance
        module, name = type(fn).__module__, type(fn).__qualname__
    return f"{module}:{name}" if module else str(name)


def build_term(spec: str, weight: float, option: str, world: Any, device: torch.device, registry: Any = None) -> RewardTerm:
    """One `RewardTerm` from a spec (see the module docstring for the forms and their order). ``spec`` may
    also be a Python callable ``f(prompts, completions, **kwargs) -> list[float]`` given as an object (the
    environments' ``reward=``), used as a ``module:function`` spec would be."""
    from rlhf_zoo.sources import is_local, load_sequence_classifier, load_tokenizer

    if isinstance(spec, torch.nn.Module):
        raise ConfigError(f"{option}: a loaded model object is not a reward this accepts; give the reward model's "
                          "directory or hub id, or a Python callable f(prompts, completions, **kwargs) -> list[float]")
    if is_callable_reward(spec):
        name = callable_name(spec)
        scorer = _token_scorer(spec, world, option, name) if _takes_tokens(spec) else _function_scorer(spec, option, name)
        return RewardTerm(name, weight, "function", scorer)
    if not isinstance(spec, str):
        raise ConfigError(f"{option}: expected a reward spec (a reward model directory or hub id, a registered reward "
                          f"function, module:function) or a Python callable, got {type(spec).__name__}")
    if ":" in spec and not is_local(spec):
        fn = import_callable(spec, option)
        scorer = _token_scorer(fn, world, option, spec) if _takes_tokens(fn) else _function_scorer(fn, option, spec)
        return RewardTerm(spec, weight, "function", scorer)
    if registry is not None and spec in registry.reward_functions and not is_local(spec):
        fn = registry.reward_functions[spec].factory(world)
        scorer = _token_scorer(fn, world, option, spec) if _takes_tokens(fn) else _function_scorer(fn, option, spec)
        return RewardTerm(spec, weight, "function", scorer)
    options = getattr(world, "model_options", None)
    kwargs = {"options": options} if options is not None else {}
    tokenizer = load_tokenizer(spec, option, trust_remote_code=bool(options and options.trust_remote_code))
    model = load_sequence_classifier(spec, option, device, **kwargs).requires_grad_(False)
    same = same_vocabulary(tokenizer, world.tokenizer)
    return RewardTerm(spec, weight, "model", _model_scorer(model, tokenizer, same, device), model, same)


@dataclass
class CombinedReward:
    """The weighted sum of reward terms as the environment's reward function
    ``(input_ids, attention_mask, prompt_length) -> (B,)``; `score_texts` scores text directly. The last
    call's per-term scores stay in ``last_terms`` (spec -> (B,)) for the evaluation's figures."""

    terms: list[RewardTerm]
    world: Any
    name: str = "reward"
    last_terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def _score(self, batch: ScoreBatch, device: torch.device) -> torch.Tensor:
        total = torch.zeros(len(batch.completions), dtype=torch.float32)
        self.last_terms = {}
        for t in self.terms:
            values = t.scorer(batch).float().cpu()
            self.last_terms[t.spec] = values
            total = total + t.weight * values
        return total.to(device)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        w = self.world
        p_ids, p_mask = input_ids[:, :prompt_length], attention_mask[:, :prompt_length]
        r_ids, r_mask = input_ids[:, prompt_length:], attention_mask[:, prompt_length:]
        texts = w.prompt_texts_from_ids(p_ids, p_mask)
        completion_ids = [[i for i, m in zip(row, ms, strict=True) if m and i != w.eos_token_id]
                          for row, ms in zip(r_ids.tolist(), r_mask.tolist(), strict=True)]
        batch = ScoreBatch([w.original_prompt(t) for t in texts], texts, w.decode(r_ids, r_mask), completion_ids,
                           input_ids, attention_mask, prompt_length)
        return self._score(batch, input_ids.device)

    @torch.no_grad()
    def score_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Scores of (prompt text, completion text) pairs.  -> (B,) fp32 on the CPU"""
        w = self.world
        ids = w.tokenizer(list(completions), add_special_tokens=False)["input_ids"] if completions else []
        batch = ScoreBatch([w.original_prompt(p) for p in prompts], list(prompts), list(completions), ids)
        return self._score(batch, torch.device("cpu"))

    def describe(self) -> list[dict[str, Any]]:
        return [{"spec": t.spec, "weight": t.weight, "kind": t.kind,
                 **({"reads_policy_tokens": t.same_tokenizer} if t.kind == "model" else {})} for t in self.terms]


def combine(specs: Sequence[str], weights: Sequence[float] | None, option: str, world: Any, device: torch.device,
            registry: Any = None) -> CombinedReward:
    """`CombinedReward` of the specs; ``weights`` (default 1 each) must match them in number."""
    if weights and len(weights) != len(specs):
        raise ConfigError(f"--reward-weights has {len(weights)} value(s) for {len(specs)} {option} spec(s); give one "
                          "weight per reward, in the same order")
    weights = list(weights) if weights else [1.0] * len(specs)
    for w in weights:
        if not math.isfinite(w):
            raise ConfigError(f"--reward-weights: every weight must be a finite number, got {w}")
    return CombinedReward([build_term(s, w, option, world, device, registry) for s, w in zip(specs, weights, strict=True)],
                          world)


@dataclass
class MissingReward:
    """The reward of a world that has none (a user setup without ``--reward``): algorithms that use no
    reward (sft, dpo) never call it; one that does gets a one-line error naming the option."""

    world_name: str
    name: str = "missing"

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ConfigError(f"this algorithm needs a reward and {self.world_name!r} has none: give --reward SPEC (a reward "
                          "model directory or hub id, a registered reward function, or module:function)")
