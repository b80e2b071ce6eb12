"""The world a run happens in: what a plugin may call on ``ctx.task``.

A world is a tokenizer, a policy to start from (also the reference), rewards, prompts, datasets and,
optionally, a gold evaluator. A built-in task (`rlhf_zoo_envs.tasks.base.Task`: ``exact``, ``sentiment``,
``hh``) is one; a user's own setup (`rlhf_zoo.user_setup.UserSetup`: ``--model``, ``--reward``,
``--prompts``, ``--gold``, ...) is another. Both derive from `World`, so the runner, the environments and
every algorithm, third-party ones included, see one interface (public API, docs/plugins.md).

Text conventions:
  * a prompt is a string; a conversational prompt (a list of ``{"role", "content"}`` messages) becomes a
    string through the tokenizer's chat template with the generation prompt added (`render_messages`);
  * `prompt_token_ids` adds BOS exactly when the tokenizer's own convention adds one (never twice, also
    when a chat template writes BOS itself); `response_token_ids` appends EOS;
  * batches are left-padded prompts (`encode_prompts`) and right-padded responses (`encode_responses`);
    masks, never ``id == pad``, say what is padding (pad may equal EOS, as on GPT-2);
  * `suppress_ids` are never valid actions: BOS, unk and pad, each unless it is also EOS.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rlhf_zoo.errors import ConfigError


class World:
    """Methods shared by every world. Subclasses provide the attributes ``name``, ``seed``,
    ``max_new_tokens``, ``beta``, ``missing_eos_penalty``, ``reward_models`` and ``manifest``, the
    ``tokenizer``, and the loading methods below that raise `NotImplementedError` here."""

    #: datasets `dataset` can open, with their columns (subclasses document which they have)
    DATASETS: dict[str, str] = {
        "pretrain": "text",
        "sft": "prompt, completion",
        "pairs": "prompt, chosen, rejected",
        "rankings_<rm>": "prompt, responses (best first), margins",
        "heldout_<rm>": "prompt, responses, margins, gold",
    }

    tokenizer: Any

    # --- what the world has -----------------------------------------------------------------------
    @property
    def objectives(self) -> Sequence[str]:
        """Names of the gold objectives; the first is summary.json's ``gold_reward``. Empty: no gold."""
        return ()

    @property
    def has_gold(self) -> bool:
        return bool(self.objectives)

    @property
    def has_pretrained(self) -> bool:
        """Whether `load_pretrained` is a model before SFT distinct from the starting policy."""
        return False

    @property
    def has_reward(self) -> bool:
        """Whether `reward_function` can build the reward the environment pays."""
        return True

    @property
    def max_positions(self) -> int | None:
        """The policy's context length in tokens (None: unknown)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What config.json records about the world."""
        return {"name": self.name, "seed": self.seed}

    # --- tokens -----------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def suppress_ids(self) -> list[int]:
        """Ids that are never valid actions: bos, unk, and pad, each unless it is also the EOS id."""
        tok = self.tokenizer
        ids = {tok.bos_token_id, tok.unk_token_id, tok.pad_token_id}
        return sorted(i for i in ids if i is not None and i != tok.eos_token_id)

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """A conversation as text through the tokenizer's chat template (the generation prompt added)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"conversational rows need a chat template, and the tokenizer of {self.tokenizer_origin()} "
                              "has none; use a tokenizer with one, or give --chat-template FILE")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenizer_origin(self) -> str:
        """Where the tokenizer comes from, for messages (a user setup: the option and its value)."""
        return repr(self.name)

    def prompt_token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of prompts, with BOS exactly when the tokenizer's convention adds one."""
        return bos_once_batch(self.tokenizer, list(prompts))

    def tokenizer_for_saving(self) -> Any:
        """The tokenizer a saved model ships with: a copy of the world's that encodes a prompt as the world
        does (BOS in front where the world puts one and the tokenizer itself would not, as on the built-in
        tasks) and pads on the left, as batched ``generate`` needs."""
        tok = copy.deepcopy(self.tokenizer)
        tok.padding_side = "left"
        tok.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
        bos = tok.bos_token_id
        if bos is not None and self.prompt_token_ids([""])[0][:1] == [bos] and bos_once(tok, "")[:1] != [bos]:
            tok.add_bos_token = True  # a BOS-adding post-processor (saved in tokenizer.json)
        return tok

    def response_token_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """Token ids of responses with EOS appended (no BOS)."""
        tok = self.tokenizer
        if not responses:
            return []
        ids = tok(list(responses), add_special_tokens=False)["input_ids"]
        return [[*r, tok.eos_token_id] for r in ids]

    def encode_prompts(self, prompts: Sequence[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids.  -> ids (B, P), mask (B, P)."""
        return pad_rows(self.prompt_token_ids(prompts), self.pad_token_id, left=True, device=device)

    def encode_responses(
        self, responses: Sequence[str], max_len: int | None = None, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded response ids with EOS appended (cut at ``max_len``).  -> ids (B, T), mask (B, T)."""
        rows = self.response_token_ids(responses)
        if max_len is not None:
            rows = [r[:max_len] for r in rows]
        return pad_rows(rows, self.pad_token_id, left=False, device=device, min_len=max_len or 0)

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Text of each row's real tokens, special tokens dropped."""
        rows = [[i for i, keep in zip(row, m, strict=True) if keep] for row, m in zip(ids.tolist(), mask.tolist(), strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def prompt_texts_from_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Prompt rows (left-padded ids) back to the prompt strings of `prompts` (rewards score text)."""
        return self.decode(ids, mask)

    def original_prompt(self, text: str) -> Any:
        """A prompt string as the user gave it (a user setup: the message list a chat prompt came from)."""
        return text

    # --- data and models (subclasses) ---------------------------------------------------------------
    def prompts(self, split: str) -> list[str]:
        """``train`` (RL prompts) or ``eval`` (held-out evaluation prompts)."""
        raise NotImplementedError

    def dataset(self, name: str) -> Any:
        """A `datasets.Dataset` by name (see `DATASETS`); `ConfigError` naming the option that provides it
        when the world has none."""
        raise NotImplementedError

    def load_policy(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The policy to start from (fp32, trainable)."""
        raise NotImplementedError

    def load_reference(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The frozen reference policy (default: the starting policy)."""
        return self.load_policy(device)

    def load_pretrained(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model ``sft`` starts from by default (before SFT; on a user setup the ``--model``)."""
        return self.load_policy(device)

    def load_critic(self, device: str | torch.device, policy: torch.nn.Module) -> tuple[torch.nn.Module, str]:
        """A trainable scalar-head model for PPO's values, and where it came from (config.json)."""
        raise NotImplementedError

    def reward_function(self, kind: str | None = None, device: str | torch.device = "cpu") -> Any:
        """The reward the environment pays: ``(input_ids, attention_mask, prompt_length) -> (B,)``."""
        raise NotImplementedError

    def gold(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """Gold objectives for each pair.  -> {objective: (B,) float64}; only when `has_gold`."""
        raise NotImplementedError

    def labeler_view(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """What simulated labelers perceive of each pair (``iterated-rlhf`` ranks by it): the gold, unless
        the world's labelers are biased (a built-in task's language may say so).  Only when `has_gold`."""
        return self.gold(prompts, responses)


def bos_once(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids with what the tokenizer adds in front of a sequence (BOS, where it adds one) and
    nothing it adds at the end (some tokenizers append EOS); a BOS the text already starts with (a chat
    template that writes it) is not doubled."""
    return bos_once_batch(tokenizer, [text])[0]


def bos_once_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`bos_once` of every text, with two batched tokenizer calls instead of two per text (a fast
    tokenizer encodes a batch in one Rust call: 512 rows went from 0.09 s to a few ms)."""
    if not texts:
        return []
    plains = tokenizer(texts, add_special_tokens=False)["input_ids"]
    fulls = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    out = []
    for plain, full in zip(plains, fulls, strict=True):
        if plain:
            prefix = _added_prefix(full, plain)
        else:  # the empty text: only a BOS counts as added in front
            prefix = full[:1] if full and full[0] == bos else []
        ids = [*prefix, *plain]
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        out.append(ids)
    return out


def _added_prefix(full: list[int], plain: list[int]) -> list[int]:
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == plain:
            return full[:start]
    return []


def pad_rows(
    rows: list[list[int]], pad_id: int, left: bool, device: str | torch.device, min_len: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids padded into (B, L) ids and mask, on the left (prompts) or the right (responses)."""
    width = max([min_len, *map(len, rows)])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)
