"""Loading a user's models and tokenizers from a local directory or a Hugging Face Hub id.

Every loader takes the option the source came from (``--model``, ``--reward``, ...) so that any failure
is one `ConfigError` naming the option and the value: a directory without weights, an id that is not in
the local cache while offline (``HF_HUB_OFFLINE=1`` or no network), a tokenizer that cannot be read.
Weights load from safetensors only (a pickled ``pytorch_model.bin`` is refused, never unpickled) and code
from a model repository runs only when ``trust_remote_code`` is asked for.

Model options that matter at real sizes live here, once (`ModelOptions`): the attention implementation
(sdpa where the architecture has it, eager otherwise or on request) and the dtype of frozen models.
Trained models always load in fp32: they are the optimizer's master weights (forwards run under bf16
autocast on CUDA, `rlhf_zoo.accel`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf_zoo.errors import ConfigError

DType = Literal["auto", "bf16", "fp16", "fp32"]
AttnImplementation = Literal["sdpa", "eager"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelOptions:
    """How a user's models are loaded (run options ``--dtype``, ``--attn-implementation``,
    ``--trust-remote-code``)."""

    dtype: DType = "auto"
    attn_implementation: AttnImplementation = "sdpa"
    trust_remote_code: bool = False

    def frozen_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of models that are never trained (reference, reward models): ``auto`` is bf16 on a
        CUDA device that supports it and fp32 elsewhere (CPU matmuls in bf16 are slow on most machines)."""
        if self.dtype == "auto":
            cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda_bf16 else torch.float32
        return _DTYPES[self.dtype]


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") and " " not in p for p in parts) \
        and not source.startswith(("/", "~"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_kwargs() -> dict[str, Any]:
    """Keywords of ``from_pretrained``: the local cache only while offline. HF_HUB_OFFLINE is read now, not
    when huggingface_hub was imported (which is all it reads), so setting it in a running process counts."""
    return {"local_files_only": True} if offline() else {}


def _explain(option: str, source: str, what: str, exc: BaseException) -> ConfigError:
    """A one-line error for a source that cannot be loaded."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if not is_local(source):
        if not _looks_like_hub_id(source):
            return ConfigError(f"{option} {source!r}: no such directory (and not a Hugging Face Hub id)")
        where = ("the machine is offline (HF_HUB_OFFLINE is set)" if offline()
                 else "it could not be fetched from the Hub")
        return ConfigError(f"{option} {source!r}: not a local directory, and {where} and it is not in the local "
                           f"Hugging Face cache; download it on a machine with network access (huggingface-cli "
                           f"download {source}) or pass a local directory ({first})")
    return ConfigError(f"{option} {source!r}: cannot load {what} ({first})")


def _resolve(source: str | Path) -> str:
    return str(Path(source).expanduser()) if is_local(str(source)) else str(source)


def load_tokenizer(source: str | Path, option: str = "--tokenizer", trust_remote_code: bool = False) -> Any:
    """A tokenizer from a directory or hub id, set up by the project's conventions: a missing pad token
    becomes the EOS token (GPT-2's convention; masks, never ids, mark padding), and padding is left (for
    generation; training batches pad themselves). ConfigError naming ``option`` when it cannot be read."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(_resolve(source), trust_remote_code=trust_remote_code, **hub_kwargs())
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise _explain(option, str(source), "a tokenizer", e) from None
    if tok.eos_token_id is None:
        raise ConfigError(f"{option} {str(source)!r}: the tokenizer has no EOS token; responses need one to end "
                          "(set eos_token in its tokenizer_config.json)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(auto_cls: Any, source: str | Path, option: str, device: torch.device | str, *,
               options: ModelOptions = ModelOptions(), trainable: bool = True, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained`` with the project's safety and precision rules, on ``device``, in eval
    mode. ``trainable`` models load in fp32, frozen ones in ``options.frozen_dtype``."""
    device = torch.device(device)
    dtype = torch.float32 if trainable else options.frozen_dtype(device)
    path = _resolve(source)
    common = dict(trust_remote_code=options.trust_remote_code, dtype=dtype, **hub_kwargs(), **kwargs)
    try:
        try:
            model = auto_cls.from_pretrained(path, use_safetensors=True, attn_implementation=options.attn_implementation,
                                             **common)
        except ValueError as e:
            if options.attn_implementation != "sdpa" or "sdpa" not in str(e).lower():
                raise
            model = auto_cls.from_pretrained(path, use_safetensors=True, attn_implementation="eager",
                                             **common)  # the architecture has no sdpa kernel
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:
        what = "weights" if "safetensors" in str(e) or "weights" in str(e).lower() else "a model"
        if is_local(path) and not any(Path(path).glob("*.safetensors")) and any(Path(path).glob("*.bin")):
            raise ConfigError(f"{option} {str(source)!r}: only pickled weights (*.bin) are there; the zoo loads "
                              "safetensors only (convert with save_pretrained(..., safe_serialization=True))") from None
        raise _explain(option, str(source), what, e) from None
    return model.to(device).eval()


def load_causal_lm(source: str | Path, option: str, device: torch.device | str, *,
                   options: ModelOptions = ModelOptions(), trainable: bool = True) -> Any:
    from transformers import AutoModelForCausalLM

    return load_model(AutoModelForCausalLM, source, option, device, options=options, trainable=trainable)


def load_sequence_classifier(source: str | Path, option: str, device: torch.device | str, *,
                             options: ModelOptions = ModelOptions(), trainable: bool = False) -> Any:
    """A reward model: ``AutoModelForSequenceClassification`` with one label."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(_resolve(source), trust_remote_code=options.trust_remote_code,
                                            **hub_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _explain(option, str(source), "a model config", e) from None
    if getattr(config, "num_labels", 1) != 1:
        raise ConfigError(f"{option} {str(source)!r}: a reward model has one output label; this model has "
                          f"{config.num_labels}")
    return load_model(AutoModelForSequenceClassification, source, option, device, options=options,
                      trainable=trainable)


def context_length(config: Any) -> int | None:
    """The model's longest sequence in tokens (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
