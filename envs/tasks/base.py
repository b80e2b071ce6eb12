"""What a task is: a world with its own tokenizer, SFT policy, reward model(s) and gold reward.

A `Task` is built once (see `rlhf_zoo_envs.tasks.build`) and cached on disk in Hugging Face format; this
module only describes and loads it. Text conventions: a prompt and a response are strings of
space-separated words of the task's language; a response's text never includes the EOS token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from rlhf_zoo.models import load_policy, load_reward_model, reward_scores
from rlhf_zoo.world import World


class Language(Protocol):
    """The programmatic side of a task: its words, how text is drawn, and the gold reward.

    All randomness comes from the ``rng`` passed in (``numpy.random.Generator``), so a task is a pure
    function of its seed.
    """

    #: words of the language (special tokens excluded)
    words: Sequence[str]
    #: names of the gold objectives; the first is the one summary.json reports as ``gold_reward``
    objectives: Sequence[str]

    def pretrain_text(self, rng: np.random.Generator) -> str:
        """One document of the pretraining corpus (prompt-like prefix and continuation together)."""

    def prompt(self, rng: np.random.Generator) -> str:
        """One RL / evaluation prompt."""

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        """A response a human demonstrator would write for ``prompt`` (SFT data)."""

    def gold(self, prompt: str, response: str) -> dict[str, float]:
        """Gold reward(s) of ``response`` to ``prompt``; keys = ``objectives``. Higher is better."""

    # optional: ``labeler_view(prompt, response) -> dict[str, float]``, what the simulated labelers
    # perceive when they rank responses (keys = ``objectives``); absent, they perceive the gold reward
    # (`rlhf_zoo_envs.tasks.labelers.perceived`). A view that differs from the gold in a systematic way
    # is what makes a learned proxy exploitable (sentiment: labelers like length the gold penalises).


class RewardFunction(Protocol):
    """Scores whole sequences ``[prompt (left-padded to P) | response (right-padded)]``."""

    name: str

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """(B, L), (B, L), P -> scores (B,) fp32."""


@dataclass
class ModelReward:
    """A learned reward model (the proxy)."""

    model: PreTrainedModel
    name: str = "proxy"

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        return reward_scores(self.model, input_ids, attention_mask)


@dataclass
class GoldReward:
    """The programmatic gold reward as a `RewardFunction` (decodes the text, then scores it)."""

    task: Task
    objective: str | None = None
    name: str = "gold"

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        prompts = self.task.decode(input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
        responses = self.task.decode(input_ids[:, prompt_length:], attention_mask[:, prompt_length:])
        values = self.task.gold(prompts, responses)[self.objective or self.task.objectives[0]]
        return torch.as_tensor(values, dtype=torch.float32, device=input_ids.device)


#: files every built task has (reward models are optional: `Task.has_reward` checks their directories)
REQUIRED_FILES = ("manifest.json", "tokenizer/tokenizer.json", "sft/config.json", "sft/model.safetensors",
                  "data/prompts_train.json", "data/prompts_eval.json")


def check_task_files(path: Path, name: str, seed: int) -> None:
    """Refuse a cached task whose files are missing or damaged (every ``*.safetensors`` header and every
    ``*.json`` is read; the tensor data and the datasets' arrow files are not): one `ZooError` naming the
    file and the way out, ``zoo prepare NAME --rebuild``. Takes milliseconds."""
    from safetensors import safe_open

    from rlhf_zoo.errors import ZooError

    rebuild = f"zoo prepare {name} --rebuild" + (f" --seed {seed}" if seed else "")

    def damaged(file: Path, why: str) -> ZooError:
        return ZooError(f"task {name!r}: cached file {file} {why}; rebuild the task with: {rebuild}")

    for rel in REQUIRED_FILES:
        if not (path / rel).is_file():
            raise damaged(path / rel, "is missing")
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors' own error type: not a (whole) safetensors file
            raise damaged(file, f"is not a readable safetensors file ({' '.join(str(e).split())})") from None
    for file in sorted(path.rglob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise damaged(file, f"is not readable JSON ({' '.join(str(e).split())[:120]})") from None


@dataclass
class Task(World):
    """A built task, loaded from its cache directory.

    Attributes:
        name, seed: which world (the task seed fixes everything the build draws).
        path: the artifact directory (tokenizer/, sft/, reward models, data/, manifest.json).
        language: gold reward and text generators.
        max_new_tokens: the default response length cap.
        beta: the default KL coefficient of the environment's reward.
        missing_eos_penalty: subtracted from the score of a response that hit the cap without EOS.
        reward_models: names of the reward-model directories (``reward``; ``hh``: ``helpful``, ``safety``).
        manifest: what the build measured (RM held-out accuracy, timings, sizes).
    """

    name: str
    seed: int
    path: Path
    language: Any
    max_new_tokens: int
    beta: float
    missing_eos_penalty: float
    reward_models: tuple[str, ...] = ("reward",)
    manifest: dict[str, Any] = field(default_factory=dict)
    #: the reward the environment pays unless told otherwise: "proxy" (learned RM) or "gold" (``exact``)
    env_reward_default: ClassVar[str] = "proxy"

    @classmethod
    def from_dir(cls, path: Path, language: Any, **kwargs: Any) -> Task:
        manifest = json.loads((path / "manifest.json").read_text())
        return cls(path=path, language=language, manifest=manifest, **kwargs)

    # --- text <-> ids (word-level: BOS always first, `rlhf_zoo.world.World` for the rest) -----------
    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(self.path / "tokenizer")

    @property
    def objectives(self) -> Sequence[str]:
        return self.language.objectives

    @property
    def max_positions(self) -> int | None:
        try:
            return int(json.loads((self.path / "sft" / "config.json").read_text())["max_position_embeddings"])
        except (OSError, KeyError, TypeError, ValueError):
            return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "path": str(self.path)}

    @property
    def has_pretrained(self) -> bool:
        return True

    @property
    def has_reward(self) -> bool:
        """The environment's default reward exists: the gold, or the reward models' directories."""
        return self.env_reward_default == "gold" or all((self.path / n).is_dir() for n in self.reward_models)

    def prompt_token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """BOS, then the prompt's words."""
        tok = self.tokenizer
        if not prompts:
            return []
        return [[tok.bos_token_id, *ids] for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Text of each row's real tokens, special tokens dropped."""
        special = set(self.tokenizer.all_special_ids)
        out = []
        for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
            words = [i for i, keep in zip(row, m, strict=True) if keep and i not in special]
            out.append(self.tokenizer.decode(words))
        return out

    # --- data ---------------------------------------------------------------------------------------
    def prompts(self, split: str) -> list[str]:
        """``train`` (RL prompts) or ``eval`` (held-out evaluation prompts)."""
        return json.loads((self.path / "data" / f"prompts_{split}.json").read_text())

    def dataset(self, name: str) -> Any:
        """A saved `datasets.Dataset`: ``pretrain``, ``sft``, ``pairs``, and per reward model
        ``rankings_<rm>`` / ``heldout_<rm>`` (``rankings_reward``; on ``hh`` ``rankings_helpful``,
        ``rankings_safety``, ...)."""
        import datasets

        from rlhf_zoo.errors import ZooError

        folder = self.path / "data" / name
        try:
            return datasets.load_from_disk(str(folder))
        except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a damaged Arrow file
            rebuild = f"zoo prepare {self.name} --rebuild" + (f" --seed {self.seed}" if self.seed else "")
            why = " ".join(str(e).split())[:160]
            raise ZooError(f"task {self.name!r}: cached dataset {folder} cannot be read ({type(e).__name__}: "
                           f"{why}); rebuild the task with: {rebuild}") from None

    # --- models and rewards -------------------------------------------------------------------------
    def load_policy(self, device: str | torch.device = "cpu") -> PreTrainedModel:
        """The SFT policy (also the reference policy)."""
        return load_policy(self.path / "sft", device)

    def load_pretrained(self, device: str | torch.device = "cpu") -> PreTrainedModel:
        """The pretrained model before SFT (``sft --start-from pretrained``)."""
        return load_policy(self.path / "pretrained", device)

    def load_critic(self, device: str | torch.device, policy: torch.nn.Module) -> tuple[PreTrainedModel, str]:
        """PPO's critic starts from the (first) reward model (InstructGPT sec. 3.5)."""
        return self.load_reward_model(self.reward_models[0], device), f"reward model {self.reward_models[0]!r}"

    def load_reward_model(self, name: str = "reward", device: str | torch.device = "cpu") -> PreTrainedModel:
        return load_reward_model(self.path / name, device)

    def reward_function(self, kind: str | None = None, device: str | torch.device = "cpu") -> RewardFunction:
        """The reward the environment pays: ``proxy`` (learned RM(s)) or ``gold``; default per task."""
        kind = kind or self.env_reward_default
        if kind == "gold":
            return GoldReward(self)
        if kind == "proxy":
            return self.proxy_reward(device)
        raise ValueError(f"unknown reward kind {kind!r}; known: proxy, gold")

    def proxy_reward(self, device: str | torch.device = "cpu") -> RewardFunction:
        return ModelReward(self.load_reward_model("reward", device))

    def gold(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """Gold objectives for each pair.  -> {objective: (B,) float64}"""
        values = [self.language.gold(p, r) for p, r in zip(prompts, responses, strict=True)]
        return {k: np.array([v[k] for v in values], dtype=np.float64) for k in self.objectives}

    def labeler_view(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """What the task's simulated labelers perceive of each pair (the gold, unless the language says
        otherwise: `rlhf_zoo_envs.tasks.labelers.perceived`).  -> {objective: (B,) float64}"""
        from rlhf_zoo_envs.tasks.labelers import perceived

        values = [perceived(self.language, p, r) for p, r in zip(prompts, responses, strict=True)]
        return {k: np.array([v[k] for v in values], dtype=np.float64) for k in self.objectives}

