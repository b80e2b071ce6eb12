"""Model building, loading and the reward-model head.

Policies are Hugging Face causal LMs; reward models are Hugging Face ``*ForSequenceClassification``
models with one label, saved and loaded in the usual format (safetensors). The score of a sequence is
read at its last real token from the attention mask, never from ``id == pad`` (pad may equal eos).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedModel,
)

from rlhf_zoo.ops.logprobs import pack_rows
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


def reward_model_from_policy(policy: PreTrainedModel) -> PreTrainedModel:
    """A reward model whose trunk starts from the policy's weights (InstructGPT initialises the RM from
    the SFT model); the scalar head starts at zero so initial scores are 0."""
    rm = AutoModelForSequenceClassification.from_config(_one_label(policy.config), attn_implementation="eager")
    rm.base_model.load_state_dict(policy.base_model.state_dict())
    torch.nn.init.zeros_(_score_head(rm).weight)
    return rm.eval()


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
