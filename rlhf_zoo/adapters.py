"""LoRA through peft, gradient checkpointing: how a user's policy is prepared for training.

With ``--lora-r R`` the policy is wrapped by peft (``pip install 'rlhf-zoo[peft]'``): only the adapter's
weights train; the reference is the same model with its adapter disabled (`AdapterDisabled`), so there is
no second copy of the base weights. Checkpoints hold the whole state (base and adapter) and the optimizer's
state of the adapter, so ``--resume`` is exact; the final ``policy/`` is the merged model (loadable with
``AutoModelForCausalLM``) and ``adapter/`` the adapter alone (loadable with peft).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_zoo.errors import ConfigError


def prepare_policy(policy: torch.nn.Module, setup: dict[str, Any], model_options: Any) -> tuple[torch.nn.Module, Any]:
    """Apply ``gradient_checkpointing`` and LoRA (``lora_r`` > 0) from a run's setup options.
    -> (policy to train, reference or None when the world should load its own)"""
    if setup.get("gradient_checkpointing"):
        if hasattr(policy, "activation_checkpointing_enable"):  # newer transformers 5.x: the old name warns
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = True  # sampling (in eval mode) still uses the KV cache
    r = int(setup.get("lora_r") or 0)
    if r <= 0:
        return policy, None
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora-r needs peft: pip install 'rlhf-zoo[peft]'") from None
    if setup.get("ref_model"):
        raise ConfigError("--lora-r uses the base model with its adapter disabled as the reference; --ref-model "
                          "cannot be given with it")
    targets = setup.get("lora_target_modules") or "all-linear"
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) for m in policy.modules())  # GPT-2 keeps its linear weights transposed
    config = peft.LoraConfig(r=r, lora_alpha=float(setup.get("lora_alpha") or 2 * r),
                             lora_dropout=float(setup.get("lora_dropout") or 0.0), target_modules=targets,
                             task_type="CAUSAL_LM", bias="none", fan_in_fan_out=conv1d)
    try:
        with warnings.catch_warnings():  # peft reads transformers' `is_gradient_checkpointing`, which
            # transformers 5 deprecates: a warning about peft's code, not the user's to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = peft.get_peft_model(policy, config)
    except ValueError as e:
        raise ConfigError(f"--lora-target-modules {setup.get('lora_target_modules')!r}: {str(e).splitlines()[0]}") from None
    return wrapped, AdapterDisabled(wrapped)


class AdapterDisabled(torch.nn.Module):
    """The base model under a peft model: forwards run with the adapter disabled. It holds no parameters
    of its own (the peft model is kept outside the module tree), so freezing it or switching it to eval
    mode cannot touch the policy's trainable adapter."""

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_peft", peft_model)
        self.config = peft_model.get_base_model().config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft.disable_adapter():
            return self._peft(*args, **kwargs)

    def get_base_model(self) -> torch.nn.Module:  # the cache-argument lookup unwraps through this
        return self._peft.get_base_model()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self._peft.get_base_model().get_output_embeddings()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._peft.get_base_model().get_input_embeddings()

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self._peft.get_base_model().parameters(recurse)

    def requires_grad_(self, requires_grad: bool = True) -> AdapterDisabled:
        return self  # the base weights are frozen by peft already; the adapter belongs to the policy

    def train(self, mode: bool = True) -> AdapterDisabled:
        return self  # the policy's mode is the policy's; a reference forward never drops out (dropout 0)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        with self._peft.disable_adapter():
            return self._peft.get_base_model().state_dict(*args, **kwargs)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None))


def merged_for_saving(model: Any, adapter_dir: Path | None) -> Any:
    """A plain transformers model to save: a peft model's adapter saved to ``adapter_dir``, then merged
    into the base weights IN PLACE (no second copy of a large model; the run is over when it saves, and
    the adapter is on disk)."""
    if not is_peft(model):
        return model
    if adapter_dir is not None:
        model.save_pretrained(adapter_dir)
    return model.merge_and_unload()
