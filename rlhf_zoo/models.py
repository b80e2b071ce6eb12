"""Model building, loading and the reward-model head.

Policies are Hugging Face causal LMs; reward models are Hugging Face ``*ForSequenceClassification``
models with one label, saved and loaded in the usual format (safetensors). The score of a sequence is
read at its last real token from the attention mask, never from ``id == pad`` (pad may equal eos).
"""

from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    LlamaConfig,
    PreTrainedModel,
)

from rlhf_zoo.ops.kv_cache import NEW_NAME, OLD_NAME, cache_argument
from rlhf_zoo.ops.logprobs import PLAIN_HEAD_MODEL_TYPES, pack_rows
from rlhf_zoo.ops.masking import position_ids_from_mask


def tiny_llama_config(
    vocab_size: int,
    *,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
) -> LlamaConfig:
    """A few-layer Llama with dropout 0, small enough to train on two CPU cores in seconds."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def new_causal_lm(config: LlamaConfig, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def new_reward_model(config: LlamaConfig, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(
        _one_label(config), attn_implementation="eager"
    ).eval()


def reward_model_from_policy(policy: PreTrainedModel, *, take_trunk: bool = False) -> PreTrainedModel:
    """A reward model whose trunk starts from the policy's weights (InstructGPT initialises the RM from
    the SFT model); the scalar head starts at zero so initial scores are 0. Attention runs as the
    policy's does (sdpa for a user's model, eager for the tasks' own), on the policy's device.

    The model is laid out on the meta device first, so no random initialisation of a trunk that is
    overwritten anyway (1-2 s at 40M parameters); ``take_trunk=True`` moves the policy's trunk modules
    into the reward model instead of copying them (no second copy in memory; the policy's trunk is the
    reward model's from then on: for a caller that has no further use for the policy)."""
    attn = getattr(policy.config, "_attn_implementation", None) or "eager"
    with torch.device("meta"):
        rm = AutoModelForSequenceClassification.from_config(_one_label(policy.config), attn_implementation=attn)
    prefix, trunk = rm.base_model_prefix, policy.base_model
    if not take_trunk:
        trunk = copy.deepcopy(trunk)
    setattr(rm, prefix, trunk)
    head = _score_head(rm)
    device = next(trunk.parameters()).device
    head.to_empty(device=device)
    for name, param in head.named_parameters():
        torch.nn.init.zeros_(param)  # weight (and a bias, where the architecture has one) at zero
    missing = [n for n, p in rm.named_parameters() if p.is_meta] + [n for n, b in rm.named_buffers() if b.is_meta]
    if missing:  # an architecture with parts outside trunk and head: give up the shortcut
        return _reward_model_by_copy(policy, attn)
    return rm.float().eval()


def _reward_model_by_copy(policy: PreTrainedModel, attn: str) -> PreTrainedModel:
    rm = AutoModelForSequenceClassification.from_config(_one_label(policy.config), attn_implementation=attn)
    rm.base_model.load_state_dict(policy.base_model.state_dict())
    for param in _score_head(rm).parameters():
        torch.nn.init.zeros_(param)
    return rm.to(next(policy.parameters()).device).float().eval()


def _one_label(config):
    values = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    return config.__class__.from_dict({**values, "num_labels": 1})


def _load(auto_cls: Any, path: str | Path, device: str | torch.device, trust_remote_code: bool) -> PreTrainedModel:
    """Weights from safetensors only (a pickled ``pytorch_model.bin`` is refused, never unpickled); code
    from the model directory only when the caller passes ``trust_remote_code=True``."""
    model = auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True,
                                     attn_implementation="eager", dtype=torch.float32)
    return model.to(device).eval()


def load_policy(path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False) -> PreTrainedModel:
    return _load(AutoModelForCausalLM, path, device, trust_remote_code)


def load_reward_model(
    path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> PreTrainedModel:
    return _load(AutoModelForSequenceClassification, path, device, trust_remote_code)


def _score_head(model: PreTrainedModel) -> torch.nn.Module:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no scalar head named score, classifier or v_head")


def _packed_hidden(model: PreTrainedModel, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of rows packed to the front (`rlhf_zoo.ops.logprobs.pack_rows`: the same
    states as the padded layout, on fewer positions).  -> hidden (B, L', H), packed mask (B, L')"""
    ids, mask, _ = pack_rows(input_ids, attention_mask)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return hidden.last_hidden_state, mask


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each row, read at its last real token.  (B, T) -> (B,) fp32. A row's real tokens
    must be contiguous (left- and/or right-padded)."""
    hidden, mask = _packed_hidden(model, input_ids, attention_mask)  # (B, L', H)
    last = (mask.sum(-1) - 1).clamp(min=0)  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return _score_head(model)(pooled).squeeze(-1).float()


def supports_shared_prompt(model: torch.nn.Module) -> bool:
    """Whether `reward_scores_shared_prompt` can score with ``model``: a decoder-only transformers
    architecture (causal attention, a KV cache; the allow-list of `rlhf_zoo.ops.logprobs`). Anything
    else (an encoder such as BERT, remote code) scores whole rows with `reward_scores`."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and _cached_decoder(type(model.base_model))


@functools.lru_cache(maxsize=64)
def _cached_decoder(cls: type) -> bool:
    """A transformers decoder class (not remote code) whose forward takes the KV cache (checked once per class)."""
    params = inspect.signature(cls.forward).parameters
    return cls.__module__.startswith("transformers.") and (NEW_NAME in params or OLD_NAME in params)


def reward_scores_shared_prompt(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Scores of K responses per prompt with each prompt through the trunk once: the prompts (B, P,
    right-padded, at least one real token each) fill a KV cache, which is repeated K times and read by
    the (B * K, R) right-padded responses (rows b * K .. b * K + K - 1 answer prompt b), the prompt's
    padding masked out. Right padding, not left: every query of the prompt forward then sees at least
    one real token, so no row of the cache is a fully-masked (NaN-prone) softmax. Differentiable end to
    end (the cache's keys and values carry the prompt's gradient). Equal, to float rounding, to
    `reward_scores` on the concatenated rows.  -> (B * K,) fp32; every response needs a real token."""
    base = model.base_model
    k = response_ids.shape[0] // prompt_ids.shape[0]
    cache = DynamicCache()
    base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
         use_cache=True, **{cache_argument(base): cache})
    cache.batch_repeat_interleave(k)
    prompt_len = prompt_mask.sum(-1).repeat_interleave(k)  # (B K,)
    positions = prompt_len[:, None] + torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), response_mask], dim=1)
    hidden = base(input_ids=response_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  **{cache_argument(base): cache}).last_hidden_state  # (B K, R, H)
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return _score_head(model)(pooled).squeeze(-1).float()


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_start: int) -> torch.Tensor:
    """Per-token values of a critic with a scalar head: V(s_t) for response token t is the head read at
    the position just before it (the state ``prompt + response[:t]``).  (B, P + T) -> (B, T) fp32, rows
    a left-padded prompt then a right-padded response (values past a response's end are not meaningful)."""
    hidden, _ = _packed_hidden(model, input_ids, attention_mask)  # (B, L', H)
    prompt_len = attention_mask[:, :response_start].sum(-1, keepdim=True)  # (B, 1)
    T = input_ids.shape[1] - response_start
    cols = (prompt_len - 1 + torch.arange(T, device=hidden.device)).clamp(0, hidden.shape[1] - 1)  # (B, T)
    states = hidden.gather(1, cols.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, T, H)
    return _score_head(model)(states).squeeze(-1).float()
