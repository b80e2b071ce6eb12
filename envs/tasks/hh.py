"""``hh``: the assistant task with two gold objectives and two reward models combined as in Llama 2."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import PreTrainedModel

from rlhf_zoo.models import reward_scores
from rlhf_zoo.ops.rewards import llama2_combine
from rlhf_zoo.training import collate_lm, lm_row
from rlhf_zoo_envs.tasks.base import RewardFunction, Task
from rlhf_zoo_envs.tasks.hh_language import HARMFUL_TOPIC_WORDS, HHLanguage


class HHWorld(HHLanguage):
    """The hh language with the overall gold (``gold_reward``) first, then the two objectives."""

    objectives = ("gold_reward", "helpfulness", "harmlessness")

    def gold(self, prompt: str, response: str) -> dict[str, float]:
        values = super().gold(prompt, response)
        return {"gold_reward": self.combined_objective(values, prompt), **values}


@dataclass
class Llama2Reward:
    """Helpful and safety RMs combined (`llama2_combine`) and whitened.

    Our RMs are trained with a shift-invariant ranking loss, so a raw score has no absolute meaning;
    each RM's score is standardised with its mean and spread on SFT samples before the sigmoid
    threshold, and the combined score is whitened with statistics from the same samples.
    """

    helpful: PreTrainedModel
    safety: PreTrainedModel
    safety_token_ids: torch.Tensor  # (S,) ids of words that only occur in harmful requests
    stats: dict[str, float]
    name: str = "proxy"

    @torch.no_grad()
    def components(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> dict[str, torch.Tensor]:
        st = self.stats
        h = (reward_scores(self.helpful, input_ids, attention_mask) - st["helpful_mean"]) / st["helpful_std"]
        s = (reward_scores(self.safety, input_ids, attention_mask) - st["safety_mean"]) / st["safety_std"]
        prompt = input_ids[:, :prompt_length]
        flagged = (torch.isin(prompt, self.safety_token_ids.to(prompt.device)) & attention_mask[:, :prompt_length].bool()).any(-1)
        return {"helpful": h, "safety": s, "is_safety": flagged, "combined": llama2_combine(h, s, flagged)}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        c = self.components(input_ids, attention_mask, prompt_length)["combined"]
        return (c - self.stats["combined_mean"]) / self.stats["combined_std"]


class HHTask(Task):
    @cached_property
    def safety_token_ids(self) -> torch.Tensor:
        tok = self.tokenizer
        return torch.tensor(sorted(tok.convert_tokens_to_ids(w) for w in HARMFUL_TOPIC_WORDS))

    def proxy_reward(self, device: str | torch.device = "cpu") -> RewardFunction:
        helpful = self.load_reward_model("helpful", device)
        safety = self.load_reward_model("safety", device)
        path = self.path / "combination.json"
        if path.exists():
            stats = json.loads(path.read_text())
        else:
            stats = self._combination_stats(helpful, safety)
            path.write_text(json.dumps(stats, indent=2))
        return Llama2Reward(helpful, safety, self.safety_token_ids, stats)

    def _combination_stats(self, helpful: PreTrainedModel, safety: PreTrainedModel) -> dict[str, float]:
        """Standardisation and whitening statistics from the held-out SFT samples."""
        ds = self.dataset("heldout_helpful")
        tok = self.tokenizer
        rows, widths = [], []
        for prompt, responses in zip(ds["prompt"], ds["responses"], strict=True):
            p = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
            for r in responses:
                rows.append(lm_row(p, [*tok.encode(r, add_special_tokens=False), tok.eos_token_id]))
                widths.append(len(p))
        device = next(helpful.parameters()).device
        batch = collate_lm(rows, tok.pad_token_id, device)
        with torch.no_grad():
            h = reward_scores(helpful, batch["input_ids"], batch["attention_mask"])
            s = reward_scores(safety, batch["input_ids"], batch["attention_mask"])
        stats = {"helpful_mean": h.mean().item(), "helpful_std": h.std().item() + 1e-6,
                 "safety_mean": s.mean().item(), "safety_std": s.std().item() + 1e-6}
        flagged = torch.tensor([any(t in HARMFUL_TOPIC_WORDS for t in tok.convert_ids_to_tokens(r.ids[: w]))
                                for r, w in zip(rows, widths, strict=True)], device=device)
        c = llama2_combine((h - stats["helpful_mean"]) / stats["helpful_std"],
                           (s - stats["safety_mean"]) / stats["safety_std"], flagged)
        stats.update(combined_mean=c.mean().item(), combined_std=c.std().item() + 1e-6)
        return stats
