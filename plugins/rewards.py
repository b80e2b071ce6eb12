"""Built-in reward functions, selectable by name (``--reward NAME``, ``--gold NAME``; ``zoo list``).

A registered reward function is ``factory(world) -> f(prompts, completions, **kwargs) -> list[float]``,
the same protocol as a ``module:function`` reward (`rlhf_zoo.rewards`). These are simple shaping terms to
combine with a learned reward through ``--reward-weights`` (a negative weight penalises):

  length          the completion's length in words
  distinct-words  the share of the completion's words that are distinct (1: no word repeated; 0: empty),
                  against the degenerate repetition that over-optimised policies fall into
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.registry import RewardFunctionSpec


def _text(completion: Any) -> str:
    """A completion's text (a conversational completion is a list of messages: the last one's content)."""
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


def length(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    return [float(len(_text(c).split())) for c in completions]


def distinct_words(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    out = []
    for c in completions:
        words = _text(c).split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out


def _constant(fn: Callable[..., list[float]]) -> Callable[[Any], Callable[..., list[float]]]:
    return lambda world: fn


@hookimpl
def register_reward_functions(register) -> None:
    register(RewardFunctionSpec("length", _constant(length), "The completion's length in words."))
    register(RewardFunctionSpec("distinct-words", _constant(distinct_words),
                                "Share of the completion's words that are distinct (1: none repeated)."))
