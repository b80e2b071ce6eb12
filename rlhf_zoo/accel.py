"""Accelerator helpers: bf16 autocast on CUDA, measured peak FLOP/s and memory bandwidth, and the
roofline ratios the GPU benchmark reports (MFU for training, MBU for decoding).

    MFU = 6 * params * tokens / seconds / peak_flops                      (Kaplan et al. 2020: 6N FLOPs
                                                                           per trained token, forward 2N
                                                                           + backward 4N; PaLM's MFU)
    MBU = (weight_bytes + kv_bytes) / step_seconds / bandwidth            (one decode step reads every
                                                                           weight once and the whole KV
                                                                           cache once)
    kv_bytes = 2 * layers * kv_heads * head_dim * seq_len * batch * bytes_per_element
               (K and V, for every layer, head, cached position and row)

Precision policy (issue 6): parameters stay fp32 (the optimizer's master weights); on CUDA the forward
passes run under ``torch.autocast(dtype=torch.bfloat16)``; log-probs, KL, rewards and losses are fp32
because `rlhf_zoo.ops.logprobs.adjust_logits` casts logits to fp32 before any softmax. On CPU nothing is
cast (CPU bf16 matmuls are slow on most machines).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_zoo.ops.kv_cache import passed_cache

#: the low-precision dtype of forward passes on CUDA
CUDA_AUTOCAST_DTYPE = torch.bfloat16


# --- autocast ---------------------------------------------------------------------------------------------
def autocast(device: torch.device | str, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, a no-op on CPU (``enabled`` forces it on or off, e.g. to test on CPU).

    Safe to wrap a whole training loop: the weight-cast cache is OFF (``cache_enabled=False``). With the
    cache on, autocast keeps the bf16 copy of a weight made at its first use until the outermost autocast
    region exits, so a forward after ``optimizer.step()`` inside the same region would silently use the
    old weights. The decode loop turns the cache on for itself (`cached_weight_casts`), where the weights
    cannot change.
    """
    device = torch.device(device)
    on = device.type == "cuda" if enabled is None else enabled
    if not on:
        return contextlib.nullcontext()
    dtype = CUDA_AUTOCAST_DTYPE if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` right now, or None when autocast is off there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no device_type argument
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


@contextlib.contextmanager
def cached_weight_casts(device_type: str) -> Iterator[None]:
    """Within an autocast region, cache the low-precision copies of trainable weights while the block
    runs (a decode loop: the weights do not change), and drop them on the way in and out so that no cast
    made before or after an optimizer step is ever reused. A no-op when autocast is off.

    Without it, every decode step of an fp32 model under autocast re-casts every weight (read 4 bytes,
    write 2, read 2 per parameter instead of 2, and one more kernel per weight). Autocast caches casts of
    leaf tensors that require grad only, so a frozen model (the reference) is still cast at each step.
    """
    dtype = autocast_dtype(device_type)
    if dtype is None:
        yield
        return
    torch.clear_autocast_cache()
    try:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()  # the inner region's exit does not clear it when nested


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    """``torch.cuda.get_device_name`` on CUDA; the processor (or machine) on CPU."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


# --- measured peaks ---------------------------------------------------------------------------------------
def _best_rate(fn: Any, work: float, device: torch.device, reps: int, inner: int) -> float:
    """max over ``reps`` timings of ``inner`` calls of ``fn``: work per second (after one warm-up call)."""
    fn()
    synchronize(device)
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        best = max(best, work * inner / (time.perf_counter() - start))
    return best


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, size: int | None = None,
                       reps: int = 5) -> float:
    """Measured dense-matmul FLOP/s: the best of ``reps`` timed runs of square (n, n) @ (n, n) matmuls
    (2 n^3 FLOPs each). n = 8192 on CUDA (the GPU's tensor-core peak in practice), 256 on CPU (quick;
    an underestimate on many-core CPUs)."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 256)
    inner = 10 if device.type == "cuda" else 4
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n**3, device, reps, inner)


def measure_bandwidth(device: torch.device | str, nbytes: int | None = None, reps: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: the best of ``reps`` timed copies of an ``nbytes`` buffer,
    counting bytes read plus bytes written (2 * nbytes per copy). 1 GiB on CUDA, 64 MiB on CPU."""
    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**26)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    inner = 10 if device.type == "cuda" else 2
    return _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4, device, reps, inner)


# --- roofline ratios ----------------------------------------------------------------------------------------
def mfu(params: int, tokens: int, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: 6 * params * tokens / seconds / peak_flops.

    6N FLOPs per trained token: 2N for the forward pass, 4N for the backward (attention FLOPs left out,
    as the issue specifies; they are small next to 6N for short sequences)."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"seconds and peak_flops must be > 0, got {seconds} and {peak_flops}")
    return 6.0 * params * tokens / seconds / peak_flops


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, seq_len: int, batch: int, bytes_per_element: int) -> int:
    """Bytes of a KV cache: 2 (K and V) * layers * kv_heads * head_dim * seq_len * batch * bytes."""
    return 2 * layers * kv_heads * head_dim * seq_len * batch * bytes_per_element


def mbu(weight_bytes: float, kv_bytes: float, step_seconds: float, bandwidth: float) -> float:
    """Model bandwidth utilisation of decoding: (weight bytes + KV-cache bytes read) / step time / bandwidth.

    For one step pass that step's bytes and seconds; for a run of steps pass the totals (the result is
    the time-weighted mean over the steps)."""
    if step_seconds <= 0 or bandwidth <= 0:
        raise ValueError(f"step_seconds and bandwidth must be > 0, got {step_seconds} and {bandwidth}")
    return (weight_bytes + kv_bytes) / step_seconds / bandwidth


@dataclass(frozen=True)
class KVGeometry:
    """What the KV-cache formula needs from a model config."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVGeometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    def bytes(self, seq_len: int, batch: int, bytes_per_element: int) -> int:
        return kv_cache_bytes(self.layers, self.kv_heads, self.head_dim, seq_len, batch, bytes_per_element)


def count_params(model: torch.nn.Module) -> int:
    """Parameters of ``model`` (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


# --- decode meter ---------------------------------------------------------------------------------------------
@dataclass
class DecodeMeter:
    """Counts, times and sizes the forwards that run with a KV cache (a ``cache`` / ``past_key_values`` given) on the
    watched models: the prefill (empty cache) and the single-token decode steps that follow it, for
    `rlhf_zoo.generation.sample` and for transformers' ``generate`` alike. Forwards without a cache
    (training, reference and reward forwards) are ignored.

    Decode time runs from the end of a prefill to the end of its last decode forward, so a step's time
    includes the sampling work between forwards (log-softmax, multinomial); on CUDA the meter
    synchronizes at those points (the decode loop already does once per step to test for EOS).
    Bytes per decode step: every parameter once at ``weight_bytes_per_param`` (the compute dtype: 2 under
    bf16 autocast) plus the KV cache read at that step, ``KVGeometry.bytes(cached positions + 1, batch,
    kv_bytes_per_element)`` (the cache's physical length, left padding included).

    Use as a context manager: ``with DecodeMeter([policy], device, 2, 2) as meter: ...``.
    """

    models: Iterable[torch.nn.Module]
    device: torch.device
    weight_bytes_per_param: int
    kv_bytes_per_element: int
    prefills: int = 0
    prefill_seconds: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    sampled_tokens: int = 0  # rows x (decode steps + 1) per generation: finished rows included
    _handles: list[Any] = field(default_factory=list)
    _segment_start: float | None = None
    _segment_end: float | None = None
    _prefill_start: float = 0.0
    _pending: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self.models = list(self.models)
        self.device = torch.device(self.device)

    def __enter__(self) -> DecodeMeter:
        for model in self.models:
            params = count_params(model)
            geometry = KVGeometry.of(model.config)
            self._handles.append(model.register_forward_pre_hook(self._pre_hook(), with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._post_hook(params, geometry), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._close_segment()

    @staticmethod
    def _cache_state(kwargs: dict[str, Any]) -> tuple[int, int, int] | None:
        """(cached positions before the forward, new positions, batch), or None without a cache."""
        past, ids = passed_cache(kwargs), kwargs.get("input_ids")
        if past is None or ids is None:
            return None
        return int(past.get_seq_length()), ids.shape[1], ids.shape[0]

    def _close_segment(self) -> None:
        if self._segment_start is not None and self._segment_end is not None:
            self.seconds += self._segment_end - self._segment_start
        self._segment_start = self._segment_end = None

    def _pre_hook(self) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self._pending = self._cache_state(kwargs)
            if self._pending is not None and self._pending[0] == 0:  # a prefill: a new generation starts
                self._close_segment()
                synchronize(self.device)
                self._prefill_start = time.perf_counter()

        return hook

    def _post_hook(self, params: int, geometry: KVGeometry) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            state, self._pending = self._pending, None
            if state is None:
                return
            past, new, batch = state
            synchronize(self.device)
            now = time.perf_counter()
            self.sampled_tokens += batch  # one token per row is sampled from this forward's last logits
            if past == 0:  # prefill
                self.prefills += 1
                self.prefill_seconds += now - self._prefill_start
                self._segment_start = self._segment_end = now
            else:  # a decode step reads every weight and the K, V of all past + new positions
                self.steps += 1
                self.weight_bytes += params * self.weight_bytes_per_param
                self.kv_bytes += geometry.bytes(past + new, batch, self.kv_bytes_per_element)
                self._segment_end = now

        return hook

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    def mbu(self, bandwidth: float) -> float | None:
        """MBU over all metered decode steps (None when there were none)."""
        return mbu(self.weight_bytes, self.kv_bytes, self.seconds, bandwidth) if self.steps and self.seconds > 0 else None

    def summary(self, bandwidth: float) -> dict[str, Any]:
        return {"prefills": self.prefills, "prefill_seconds": self.prefill_seconds, "steps": self.steps,
                "seconds": self.seconds, "step_ms": 1e3 * self.seconds / self.steps if self.steps else None,
                "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
                "bytes_per_second": self.bytes / self.seconds if self.seconds > 0 else None,
                "mbu": self.mbu(bandwidth), "sampled_tokens": self.sampled_tokens}
