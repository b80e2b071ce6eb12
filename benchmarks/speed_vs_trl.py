"""Speed side by side with TRL: zoo ``dpo`` vs ``trl.DPOTrainer``, zoo ``ppo`` vs ``trl.RLOOTrainer``, and a
``ResponseGen`` vector-env rollout vs plain ``generate`` + reward-model scoring. One process, one task
(``sentiment``: its tokenizer, SFT policy = reference, reward model, train prompts and ``pairs`` dataset),
CPU, fp32, the same number of torch threads for every side (``--threads``, default 1).

What is timed (wall clock, ``time.perf_counter``); models are loaded from the task cache before each timer
starts, so every repetition starts from the SFT weights:

1. DPO, pairs per second, end to end from the task's stored ``pairs`` dataset to a trained policy:
     zoo  the ``dpo`` plugin's ``train(ctx, config)`` (``rlhf_zoo.runner.make_context`` outside the timer):
          read and tokenise the first N pairs, reference log-probs of every pair once (precomputed), one
          epoch of steps (policy forward of chosen+rejected, sigmoid loss, backward, clip, AdamW, schedule),
          a metrics line per step.
     TRL  building the prompt/chosen/rejected ``datasets.Dataset`` of the same N pairs (BOS + prompt text,
          " " + response text; TRL appends EOS), ``DPOTrainer(...)`` with ``precompute_ref_log_probs=True``
          (tokenisation, reference log-probs of every pair once), then ``trainer.train()``: one epoch.
     Same policy and reference weights, pairs, batch size, learning rate and schedule (linear warmup 10
     steps, linear decay), beta (the task's), sigmoid loss, AdamW without weight decay (TRL: its default
     fused AdamW, the same update), grad-norm clip 1, reference precompute batch (the zoo's). The zoo caps responses at ``max_new_tokens`` tokens (EOS included) and TRL only has a whole-sequence
     ``max_length``: both caps are set so that nothing is truncated (zoo ``max_new_tokens`` = longest
     response + EOS, TRL ``max_length`` = longest prompt + that), and the script checks that TRL's token
     rows equal the zoo's, pair by pair. TRL: ``bf16=False``, activation (gradient) checkpointing off (its
     default is on), no eval, ``save_strategy="no"``, ``report_to="none"``, no progress bars, logging
     every 10^9 steps. Zoo: checkpoints off (``checkpoint_every=0``), no progress bar.
2. Online RL, samples (sampled responses) per second over whole iterations (generate + score + train):
     zoo  the ``ppo`` plugin's ``train`` for ``--iterations`` iterations of ``--samples`` prompts, one
          response each: sample (KV cache) -> ResponseGen env (reference forward, reward-model forward,
          KL-shaped rewards) -> critic values, GAE -> 4 epochs x 4 minibatches, each a clipped policy step
          AND a clipped value step of the separate critic (a second network as large as the policy).
     TRL  ``RLOOTrainer(...)`` + ``train()`` for the same number of generations of ``--samples``
          completions (``--samples / num_generations`` prompts x ``num_generations``): ``model.generate`` ->
          policy forward for old log-probs -> reference forward (beta > 0) -> reward = a Python callable
          that scores with the task's reward model exactly like the env (same prompt encoding, same
          missing-EOS penalty) -> leave-one-out advantages -> ``num_iterations=4`` passes over
          ``steps_per_generation=4`` minibatches: the same 16 policy steps per rollout as the zoo, no critic.
     Same policy, prompts, max completion length (the task's), temperature 1, sampling suppressed ids
     (bos, unk, pad; TRL through ``generation_kwargs={"suppress_tokens": ...}``), learning rate (zoo ppo's),
     constant schedule, clip 0.2, beta (the task's), grad-norm clip 1.
3. Env overhead, seconds per batch (as benchmarks/env_overhead.py, refactored here): ``plain`` =
   transformers ``generate`` + one reward-model forward; ``env`` = the zoo sampler + ``ResponseGen``
   ``step_tensors`` (reference forward, reward-model forward, per-token rewards): the env does strictly more.
   A third method, ``plain_ref`` = ``plain`` + one reference forward and the sampled tokens' log-probs (what
   an RLHF loop needs besides), gives the like-for-like ratio env / plain_ref as well.

Repetitions are interleaved (zoo, TRL, zoo, TRL, ...; plain, env, ...); the first round warms up and is
not counted; medians over the counted rounds; ratio = zoo median throughput / TRL median throughput
(targets: >= 1.5), env ratio = env median seconds / plain median seconds (target: <= 1.2). The same ratios
on the process's CPU time (``time.process_time``) are reported too: on a shared machine other processes
stretch wall time, not CPU time (with one torch thread the two measure the same work). TRL is an
optional benchmark dependency: without it (or with ``--no-trl``) the zoo sides still run and the TRL sides
are reported as skipped. After the counted rounds, one extra zoo ``dpo`` and ``ppo`` run each has the
plugin's functions timed by name (tokenise, reference, backward, critic, ...) for the "where the time goes"
breakdown; those runs are not counted.

4. Every trainer with a TRL counterpart, through the user-model path (``zoo run ALGO --model DIR --reward DIR
   --prompts FILE --dataset FILE``), at the shape's size (``--shape``; `USER_SHAPES`, `USER_WORK`):
   ``build_user_setup`` writes a byte-level BPE tokenizer trained in-process on generated pseudo-word text
   (realistic: 32k tokens), a Qwen2 causal LM from config (realistic: 8 layers x 512, ~42M parameters, random
   weights), a one-label AutoModelForSequenceClassification of the same architecture as the reward model,
   and JSONL data whose prompts are exactly ``prompt_tokens`` and responses ``response_tokens`` (EOS included)
   long (realistic: 64 + 64). Pairs: ``dpo`` vs ``DPOTrainer``, ``sft`` vs ``SFTTrainer``, ``reward-model``
   vs ``RewardTrainer``, ``rloo`` vs ``RLOOTrainer``, ``grpo`` vs ``GRPOTrainer``, each timed end to end
   from the files on disk to a trained model (zoo: ``make_context`` + the plugin's ``train``; TRL:
   ``from_pretrained``, the dataset, the trainer, ``train()``), interleaved as above, with each
   repetition's peak memory (VmHWM after ``/proc/self/clear_refs`` minus the resident set before, freed
   heap returned first: benchmarks/logprob_memory.py's method) and TRL's tokenised rows checked against the
   zoo's encoding (``user_token_checks``). The settings each side gets are in ``user_zoo_options`` and
   ``user_trl_args`` (same batch, steps, epochs x minibatches, beta, clip, learning rate, lengths).
5. ``ppo`` vs TRL's last ``PPOTrainer`` (``trl.experimental.ppo`` in trl 1.12; 1.13+ lack it), installed in
   a virtual environment of its own (``--trl-ppo-python``): each repetition of either side is a fresh
   process (``--ppo-child``), imports outside the timer, interleaved, one warm-up round.

``--shape tiny`` runs sections 1-3 on the sentiment task and 4-5 on a tiny user model; ``--shape
realistic`` runs 4-5 only. ``--user-only`` / ``--no-user`` pick; ``--merge-into`` adds this run's 4-5 to
an earlier result (each section says which run, commit and load its figures come from).

    OMP_NUM_THREADS=1 python benchmarks/speed_vs_trl.py --threads 1 \\
        --out benchmarks/results/speed_vs_trl.json --md benchmarks/results/speed_vs_trl.md
    python -m venv /tmp/trl-old && /tmp/trl-old/bin/pip install torch==2.13.0 trl==1.12.0 transformers==5.24.0
    OMP_NUM_THREADS=1 python benchmarks/speed_vs_trl.py --shape realistic --threads 1 --user-reps 1 \\
        --trl-ppo-python /tmp/trl-old/bin/python --out benchmarks/results/speed_vs_trl_realistic.json
    python benchmarks/speed_vs_trl.py --quick --out /tmp/speed.json      # tiny configuration (the test's)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import inspect
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

# TRL's trainers send telemetry and may look up the Hub: this benchmark is offline
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute bar reads this

import torch  # noqa: E402

DEFAULTS = {"pairs": 4096, "dpo_batch": 64, "iterations": 8, "samples": 64, "num_generations": 4,
            "env_batch": 64, "reps": 7, "env_reps": 21}
QUICK = {"pairs": 128, "dpo_batch": 16, "iterations": 1, "samples": 16, "num_generations": 4,
         "env_batch": 16, "reps": 1, "env_reps": 2}
PPO_EPOCHS, PPO_MINIBATCHES = 4, 4  # zoo ppo defaults; TRL: num_iterations, steps_per_generation
TARGET_THROUGHPUT_RATIO = 1.5
TARGET_ENV_RATIO = 1.2


# --- helpers -------------------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from rlhf_zoo.runner import versions

    out = versions()
    for dist in ("trl", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cpus": usable, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": "cpu", "dtype": "float32",
            "load_average_at_start": _load()}


def _load() -> list[float] | None:
    """1, 5, 15-minute load averages (other processes on the machine slow both sides alike)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _import_trl() -> tuple[Any, str | None]:
    """(the trl module, None) or (None, why it is skipped)."""
    try:
        import trl
        from trl import DPOConfig, DPOTrainer, RLOOConfig, RLOOTrainer  # noqa: F401
    except Exception as e:  # ImportError, or a trl incompatible with the installed transformers
        return None, f"trl is not usable ({type(e).__name__}: {e}); install the benchmark extra, e.g. pip install trl==1.16.0"
    return trl, None


def _quiet() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@contextlib.contextmanager
def _silence() -> Any:
    """Swallow what the trainers print (the end-of-train metrics line)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _config_kwargs(cls: type, **kwargs: Any) -> dict[str, Any]:
    """TRL/transformers config kwargs: activation checkpointing off under whichever name this version has."""
    fields = set(inspect.signature(cls).parameters)
    key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {**kwargs, key: False}


def _zoo_context(algorithm: str, task: str, out: Path, options: dict[str, Any]) -> Any:
    from rlhf_zoo.runner import make_context

    kwargs: dict[str, Any] = {"task": task, "seed": 0, "out": out, "device": "cpu", "options": options, "progress": False}
    if "checkpoint_every" in inspect.signature(make_context).parameters:
        kwargs["checkpoint_every"] = 0  # no checkpoints (TRL: save_strategy="no")
    return make_context(algorithm, **kwargs)


class Timer:
    """Accumulates the wall time of calls to wrapped functions (for per-phase figures)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


@contextlib.contextmanager
def _timed_functions(module: Any, names: list[str], split: Callable[..., str] | None = None) -> Any:
    """Temporarily wrap ``module.<name>`` for each name with a timer (for a breakdown run, never for the
    timed repetitions). ``split(name, *args, **kwargs)`` may rename a call's bucket. Yields {bucket: Timer};
    names the module lacks are skipped."""
    timers: dict[str, Timer] = {}
    saved = {n: getattr(module, n) for n in names if callable(getattr(module, n, None))}

    def wrapper(name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            bucket = split(name, *args, **kwargs) if split else name
            return timers.setdefault(bucket, Timer()).wrap(fn)(*args, **kwargs)
        return timed

    try:
        for n, fn in saved.items():
            setattr(module, n, wrapper(n, fn))
        yield timers
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def split_by_term(name: str, *args: Any, **kwargs: Any) -> str:
    """Bucket of a timed plugin call: ``backward(loss, term)`` and ``optimizer_step(loss, opt, clip, term)``
    by whether their ``term`` is the critic's value loss; ``token_values`` is the critic's forward."""
    if name in ("backward", "optimizer_step"):
        pos = 1 if name == "backward" else 3
        term = kwargs.get("term", args[pos] if len(args) > pos else "")
        return f"{name} ({'critic' if 'value' in str(term) else 'policy'})"
    if name == "token_values":
        return "token_values (critic forward)"
    return name


def zoo_breakdown(algorithm: str, run_once: Callable[[], dict[str, Any]], names: list[str],
                  split: Callable[..., str] | None = None) -> dict[str, Any]:
    """One extra, uncounted zoo run with the plugin's named functions timed (nested calls overlap)."""
    from rlhf_zoo.registry import get_registry

    module = sys.modules.get(get_registry().algorithm(algorithm).train.__module__)
    if module is None:
        return {"skipped": f"plugin module of {algorithm!r} not found"}
    with _timed_functions(module, names, split) as timers:
        r = run_once()
    return {"seconds": r["seconds"], "functions": {k: {"seconds": t.seconds, "calls": t.calls} for k, t in timers.items()},
            "phases": r["phases"]}


# --- 1. DPO --------------------------------------------------------------------------------------------
def dpo_lengths(task: Any, n_pairs: int) -> dict[str, int]:
    """Longest prompt (BOS included) and response (EOS included) among the first n pairs, in tokens."""
    cols = task.dataset("pairs")[:n_pairs]
    tok = task.tokenizer
    longest = max(len(tok.encode(r, add_special_tokens=False)) for r in cols["chosen"] + cols["rejected"])
    prompt = max(len(tok.encode(p, add_special_tokens=False)) for p in cols["prompt"])
    return {"max_prompt_tokens": prompt + 1, "max_completion_tokens": longest + 1}


def zoo_dpo(task_name: str, s: dict[str, Any], out: Path) -> dict[str, Any]:
    ctx = _zoo_context("dpo", task_name, out, {
        "max_pairs": s["pairs"], "batch_size": s["dpo_batch"], "epochs": 1, "steps": 0,
        "learning_rate": s["dpo_learning_rate"], "warmup_steps": s["warmup_steps"], "loss_type": "sigmoid",
        "max_new_tokens": s["max_completion_tokens"]})
    start, cpu = time.perf_counter(), time.process_time()
    result = ctx.algorithm.train(ctx, ctx.config)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = result.extra_metrics() if hasattr(result, "extra_metrics") else {}
    pairs = int(extra.get("pairs", s["pairs"]))
    phases = {k: v for k, v in ctx.phase_seconds.items()}
    phases["data"] = seconds - sum(phases.values())  # read + tokenise the pairs, optimiser setup
    return {"seconds": seconds, "pairs": pairs, "pairs_per_second": pairs / seconds, "cpu_seconds": cpu,
            "phases": phases, "trained_tokens": int(ctx.counters.get("trained_tokens", 0))}


def trl_pairs_dataset(task: Any, n_pairs: int) -> Any:
    """The first n pairs as TRL's plain-text preference format. The task's tokenizer adds no special
    tokens, so BOS is written into the prompt (as the zoo's encode_prompts puts it first); a space
    separates prompt and response (TRL concatenates the strings); TRL appends EOS itself. Pairs with
    identical chosen and rejected text carry no preference and are dropped, as the zoo drops them."""
    from datasets import Dataset

    cols = task.dataset("pairs")[:n_pairs]
    bos = task.tokenizer.bos_token
    keep = [i for i, (c, r) in enumerate(zip(cols["chosen"], cols["rejected"], strict=True)) if c != r]
    return Dataset.from_dict({"prompt": [f"{bos} {cols['prompt'][i]}" for i in keep],
                              "chosen": [" " + cols["chosen"][i] for i in keep],
                              "rejected": [" " + cols["rejected"][i] for i in keep]})


def trl_dpo(task: Any, s: dict[str, Any], out: Path) -> tuple[dict[str, Any], Any]:
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    policy, reference = task.load_policy(), task.load_policy().requires_grad_(False)
    args = DPOConfig(**_config_kwargs(
        DPOConfig, output_dir=str(out), per_device_train_batch_size=s["dpo_batch"], num_train_epochs=1,
        learning_rate=s["dpo_learning_rate"], lr_scheduler_type="linear", warmup_steps=s["warmup_steps"],
        weight_decay=0.0, max_grad_norm=1.0, beta=float(task.beta), loss_type=["sigmoid"],
        max_length=s["max_prompt_tokens"] + s["max_completion_tokens"], precompute_ref_log_probs=True,
        precompute_ref_batch_size=s["reference_batch_pairs"], bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0, seed=0))
    start, cpu = time.perf_counter(), time.process_time()
    data = trl_pairs_dataset(task, s["pairs"])
    t_data = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                         processing_class=task.tokenizer)
    trainer.remove_callback(PrinterCallback)
    t_init = time.perf_counter()
    with _silence():
        trainer.train()
    end, cpu = time.perf_counter(), time.process_time() - cpu
    seconds = end - start
    pairs = len(data)
    return ({"seconds": seconds, "pairs": pairs, "pairs_per_second": pairs / seconds, "cpu_seconds": cpu, "steps": trainer.state.global_step,
             "phases": {"data": t_data - start, "init_tokenise_reference": t_init - t_data, "train": end - t_init}},
            trainer)


def check_dpo_tokens(task: Any, trainer: Any, s: dict[str, Any]) -> dict[str, Any]:
    """TRL's tokenised rows against the zoo's encoding (encode_prompts / encode_responses at the cap)."""
    cols = task.dataset("pairs")[: s["pairs"]]
    keep = [i for i, (c, r) in enumerate(zip(cols["chosen"], cols["rejected"], strict=True)) if c != r]
    prompts = [cols["prompt"][i] for i in keep]
    chosen, rejected = [cols["chosen"][i] for i in keep], [cols["rejected"][i] for i in keep]
    p_ids, p_mask = task.encode_prompts(prompts)
    r_ids, r_mask = task.encode_responses(chosen + rejected, max_len=s["max_completion_tokens"])
    n = len(keep)
    ds = trainer.train_dataset
    got = {k: ds[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    same = 0
    for i in range(n):
        zoo = (p_ids[i][p_mask[i].bool()].tolist(), r_ids[i][r_mask[i].bool()].tolist(),
               r_ids[n + i][r_mask[n + i].bool()].tolist())
        same += zoo == (list(got["prompt_ids"][i]), list(got["chosen_ids"][i]), list(got["rejected_ids"][i]))
    # columns per forward row, over a seeded shuffle into batches: the zoo's layout is [prompt left-padded to
    # the batch's longest | response right-padded to the batch's longest]; TRL's collator flushes each
    # prompt+response left, so its width is the batch's longest prompt+response
    p_len, c_len, x_len = p_mask.sum(-1), r_mask[:n].sum(-1), r_mask[n:].sum(-1)
    zoo_w, trl_w = [], []
    for idx in torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(s["dpo_batch"]):
        zoo_w.append(int(p_len[idx].max() + torch.maximum(c_len[idx], x_len[idx]).max()))
        trl_w.append(int(torch.maximum(p_len[idx] + c_len[idx], p_len[idx] + x_len[idx]).max()))
    return {"rows": n, "rows_identical": same, "trl_rows": len(ds),
            "mean_batch_width_tokens": {"zoo": sum(zoo_w) / len(zoo_w), "trl": sum(trl_w) / len(trl_w)}}


# --- 2. online RL --------------------------------------------------------------------------------------
def zoo_ppo(task_name: str, s: dict[str, Any], out: Path) -> dict[str, Any]:
    ctx = _zoo_context("ppo", task_name, out, {
        "iterations": s["iterations"], "batch_prompts": s["samples"], "epochs": PPO_EPOCHS,
        "minibatches": PPO_MINIBATCHES, "learning_rate": s["ppo_learning_rate"]})
    start, cpu = time.perf_counter(), time.process_time()
    ctx.algorithm.train(ctx, ctx.config)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    samples = s["iterations"] * s["samples"]
    phases = {k: v for k, v in ctx.phase_seconds.items()}
    phases["other"] = seconds - sum(phases.values())  # critic load, env creation, KL control, logging
    gen = int(ctx.counters.get("generated_tokens", 0))
    return {"seconds": seconds, "samples": samples, "samples_per_second": samples / seconds, "cpu_seconds": cpu,
            "phases": phases, "generated_tokens": gen, "mean_response_tokens": gen / samples}


class RewardModelScore:
    """TRL reward function: the task's reward model scored exactly as the ResponseGen env scores
    (prompt left-padded from the encoded prompt table, response right-padded, one RM forward, minus the
    missing-EOS penalty). Built inside TRL's timer, as the env's prompt table is built inside the zoo's."""

    def __init__(self, task: Any, timer: Timer) -> None:
        self.task, self.timer = task, timer
        self.table_ids, self.table_mask = task.encode_prompts(task.prompts("train"))
        self.reward_fn = task.reward_function("proxy")
        self.eos, self.pad, self.penalty = task.eos_token_id, task.pad_token_id, float(task.missing_eos_penalty)
        self.suppressed = torch.tensor(task.suppress_ids)
        self.__name__ = "rm_score"
        self.tokens = 0
        self.suppressed_sampled = 0

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], prompt_index: list[int],
                 **_: Any) -> list[float]:
        start = time.perf_counter()
        idx = torch.as_tensor(prompt_index, dtype=torch.long)
        p_ids, p_mask = self.table_ids[idx], self.table_mask[idx]
        width = max(1, max(len(c) for c in completion_ids))
        r_ids = torch.full((len(completion_ids), width), self.pad, dtype=torch.long)
        r_mask = torch.zeros_like(r_ids)
        for i, c in enumerate(completion_ids):
            r_ids[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            r_mask[i, : len(c)] = 1
        has_eos = ((r_ids == self.eos) & r_mask.bool()).any(-1)
        score = self.reward_fn(torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1])
        self.tokens += int(r_mask.sum())
        self.suppressed_sampled += int((torch.isin(r_ids, self.suppressed) & r_mask.bool()).sum())
        out = (score.float() - self.penalty * (~has_eos).float()).tolist()
        self.timer.seconds += time.perf_counter() - start
        self.timer.calls += 1
        return out


def trl_rloo(task: Any, s: dict[str, Any], out: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    per_step = s["samples"] // PPO_MINIBATCHES
    policy = task.load_policy()
    args = RLOOConfig(**_config_kwargs(
        RLOOConfig, output_dir=str(out), per_device_train_batch_size=per_step, steps_per_generation=PPO_MINIBATCHES,
        num_generations=s["num_generations"], num_iterations=PPO_EPOCHS,
        max_steps=s["iterations"] * PPO_MINIBATCHES * PPO_EPOCHS, learning_rate=s["ppo_learning_rate"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, epsilon=0.2,
        beta=float(task.beta), max_completion_length=int(task.max_new_tokens), temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"suppress_tokens": list(task.suppress_ids)}, bf16=False, use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0,
        seed=0))
    reward_time, rollout_time = Timer(), Timer()
    start, cpu = time.perf_counter(), time.process_time()
    prompts = task.prompts("train")
    data = Dataset.from_dict({"prompt": [f"{task.tokenizer.bos_token} {p}" for p in prompts],
                              "prompt_index": list(range(len(prompts)))})
    reward = RewardModelScore(task, reward_time)
    trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=task.tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer._generate_and_score_completions = rollout_time.wrap(trainer._generate_and_score_completions)
    t_init = time.perf_counter()
    with _silence():
        trainer.train()
    end, cpu = time.perf_counter(), time.process_time() - cpu
    seconds = end - start
    generations = rollout_time.calls
    samples = generations * args.generation_batch_size
    expected = s["iterations"] * s["samples"]
    if samples != expected:
        raise RuntimeError(f"TRL RLOO generated {samples} samples, expected {expected} (check the batch settings)")
    return {"seconds": seconds, "samples": samples, "samples_per_second": samples / seconds, "cpu_seconds": cpu,
            "optimizer_steps": trainer.state.global_step,
            "phases": {"setup": t_init - start,
                       "rollout (generate, old+ref logprobs, reward)": rollout_time.seconds,
                       "reward (inside rollout)": reward_time.seconds,
                       "train": end - t_init - rollout_time.seconds},
            "generated_tokens": reward.tokens, "mean_response_tokens": reward.tokens / samples,
            "suppressed_tokens_sampled": reward.suppressed_sampled}


# --- 3. env overhead (benchmarks/env_overhead.py's plain and response methods) -------------------------
def env_methods(task: Any, batch: int) -> dict[str, Callable[[], dict[str, float]]]:
    """``plain`` and ``env`` rollouts of one batch (env_overhead.py's ``plain`` and ``response``); each
    returns the seconds of its two parts."""
    import gymnasium

    import rlhf_zoo  # noqa: F401  (registers the environment ids)
    from rlhf_zoo.generation import sample
    from rlhf_zoo.models import reward_scores

    policy = task.load_policy()
    rm = task.load_reward_model(task.reward_models[0])
    T = task.max_new_tokens
    idx = list(range(batch))
    prompts = [task.prompts("train")[i] for i in idx]
    p_ids, p_mask = task.encode_prompts(prompts)
    renv = gymnasium.make_vec("rlhf_zoo/ResponseGen-v0", num_envs=batch, task=task, reward="proxy")
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def plain() -> dict[str, float]:
        t0 = time.perf_counter()
        out = policy.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True, max_new_tokens=T,
                              top_k=None, top_p=None, temperature=1.0, eos_token_id=task.eos_token_id,
                              pad_token_id=task.pad_token_id, suppress_tokens=task.suppress_ids)
        t1 = time.perf_counter()
        resp = out[:, p_ids.shape[1]:]
        is_eos = (resp == task.eos_token_id).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # (B, T') positions after the first EOS
        mask = torch.cat([p_mask, (~after_eos).long()], 1)
        reward_scores(rm, out, mask)
        return {"generate": t1 - t0, "score": time.perf_counter() - t1, "_out": out, "_mask": mask}

    reference = task.load_policy().requires_grad_(False)

    @torch.no_grad()
    def plain_ref() -> dict[str, float]:
        """``plain`` plus the reference log-probs of the sampled tokens (one forward), which an RLHF loop
        needs for its KL penalty and the env computes: the like-for-like baseline of the env."""
        parts = plain()
        t0 = time.perf_counter()
        out, mask = parts.pop("_out"), parts.pop("_mask")
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = reference(input_ids=out, attention_mask=mask, position_ids=pos).logits[:, p_ids.shape[1] - 1:-1]
        resp = out[:, p_ids.shape[1]:]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, resp[..., None])[..., 0]
        (lp * mask[:, p_ids.shape[1]:]).sum()
        parts["reference"] = time.perf_counter() - t0
        return parts

    def env() -> dict[str, float]:
        t0 = time.perf_counter()
        renv.reset(options={"prompt_indices": idx})
        s = sample(policy, renv.prompt_ids, renv.prompt_mask, T, eos_token_id=task.eos_token_id,
                   pad_token_id=task.pad_token_id, suppress_ids=task.suppress_ids, generator=gen)
        t1 = time.perf_counter()
        renv.step_tensors(s.response_ids, s.response_mask, s.logprobs)
        return {"reset_sample": t1 - t0, "step_tensors (reference + RM + rewards)": time.perf_counter() - t1}

    def plain_only() -> dict[str, float]:
        parts = plain()
        del parts["_out"], parts["_mask"]
        return parts

    return {"plain": plain_only, "env": env, "plain_ref": plain_ref}


# --- 4. every trainer through the user-model path (both shapes) ----------------------------------------
#: model and data shapes built from config for the user-model comparisons (``zoo run ALGO --model DIR ...``).
#: realistic: byte-level BPE of ~32k tokens trained in-process on generated text, a Qwen2 of 8 layers x 512
#: (~42M parameters, tied embeddings), prompts of 64 tokens, responses of up to 64 (EOS included); tiny: the
#: same builder at the scale of the sentiment task's model; mini: the test's.
USER_SHAPES: dict[str, dict[str, int]] = {
    "realistic": {"vocab_size": 32000, "hidden": 512, "layers": 8, "heads": 8, "intermediate": 1408,
                  "prompt_tokens": 64, "response_tokens": 64, "lexicon": 40000, "corpus_lines": 12000,
                  "words_per_line": 40, "rows": 64},
    "tiny": {"vocab_size": 512, "hidden": 64, "layers": 2, "heads": 2, "intermediate": 128,
             "prompt_tokens": 16, "response_tokens": 16, "lexicon": 2000, "corpus_lines": 2000,
             "words_per_line": 20, "rows": 512},
    "mini": {"vocab_size": 400, "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64,
             "prompt_tokens": 12, "response_tokens": 10, "lexicon": 600, "corpus_lines": 400,
             "words_per_line": 16, "rows": 16},
}
#: the work of one repetition per shape: DPO / reward-model pairs and SFT rows (one epoch of ``batch``),
#: online rollouts of ``prompts`` x ``k`` samples; ``reps`` counted repetitions after one warm-up
USER_WORK: dict[str, dict[str, int]] = {
    "realistic": {"pairs": 16, "batch": 8, "prompts": 4, "k": 4, "iterations": 1, "reps": 2},
    "tiny": {"pairs": 512, "batch": 64, "prompts": 16, "k": 4, "iterations": 4, "reps": 5},
    "mini": {"pairs": 8, "batch": 4, "prompts": 2, "k": 2, "iterations": 1, "reps": 1},
}
USER_ALGORITHMS = ("dpo", "sft", "reward-model", "rloo", "grpo")
TRL_COUNTERPART = {"dpo": "DPOTrainer", "sft": "SFTTrainer", "reward-model": "RewardTrainer", "rloo": "RLOOTrainer",
                   "grpo": "GRPOTrainer", "ppo": "PPOTrainer (trl.experimental.ppo)"}
USER_BETA, USER_LR = 0.1, 1e-5
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
TARGET_REALISTIC_RATIO = 1.3
LOAD_QUIET = 1.5  # a 1-minute load average above this on 2 cores: the figures were measured under load


def _lexicon(n: int, rng: Any) -> list[str]:
    """n distinct pseudo-words of 1-4 syllables (a Zipf-like corpus of them trains a BPE of any size)."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
              "ch", "dr", "fl", "gr", "kl", "pr", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
    codas = ["", "", "", "n", "r", "s", "l", "m", "t", "ck", "nd", "st"]
    words: dict[str, None] = {}
    while len(words) < n:
        k = rng.choice((1, 2, 2, 3, 3, 4))
        words["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(k))] = None
    return list(words)


def build_user_setup(out: Path, shape: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """Everything the user-model comparisons read, in ``out``: ``policy/`` (a Qwen2 causal LM from config,
    random weights, with the tokenizer), ``rm/`` (the same architecture as a one-label
    AutoModelForSequenceClassification, same tokenizer), ``prefs.jsonl`` (prompt/chosen/rejected),
    ``demos.jsonl`` (prompt/completion) and ``prompts.jsonl``. The tokenizer is a byte-level BPE trained
    here on generated text (no BOS, EOS ``<|im_end|>``, pad ``<|endoftext|>``). Every prompt is exactly
    ``prompt_tokens`` tokens and every response ``response_tokens - 1`` tokens + EOS: with a byte-level
    pre-tokenizer each " word" tokenises on its own, so a text's length is the sum of its words'.
    -> {paths, tokens (per-word counts checked), parameters, seconds}"""
    import random

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

    from rlhf_zoo.fixtures import bpe_tokenizer

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lex = _lexicon(shape["lexicon"], rng)
    weights = [1.0 / (i + 10) for i in range(len(lex))]  # Zipf-like: frequent words become single tokens
    lines = [" ".join(rng.choices(lex, weights, k=shape["words_per_line"])) for _ in range(shape["corpus_lines"])]
    tok = bpe_tokenizer(lines, vocab_size=shape["vocab_size"], special={"eos": EOS_TOKEN, "pad": PAD_TOKEN},
                        add_bos=False, chat_template=None)
    t_tok = time.perf_counter()
    counts = dict(zip(lex, (len(x) for x in tok([" " + w for w in lex], add_special_tokens=False)["input_ids"]),
                      strict=True))
    singles = [w for w in lex if counts[w] == 1]

    def text(n_tokens: int) -> str:
        """" w1 w2 ..." of exactly n_tokens tokens (words drawn by frequency, the last one to fit)."""
        words, n = [], 0
        while n < n_tokens:
            w = rng.choices(lex, weights)[0]
            if n + counts[w] > n_tokens:
                w = rng.choice(singles)
            words.append(w)
            n += counts[w]
        return "".join(" " + w for w in words)

    P, R, rows = shape["prompt_tokens"], shape["response_tokens"] - 1, shape["rows"]
    prefs, demos, prompts = [], [], []
    for _ in range(rows):
        p = text(P)
        chosen, rejected = text(R), text(R)
        prefs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
        demos.append({"prompt": p, "completion": chosen})
        prompts.append({"prompt": p})
    paths = {"policy": out / "policy", "rm": out / "rm", "prefs": out / "prefs.jsonl", "demos": out / "demos.jsonl",
             "prompts": out / "prompts.jsonl"}
    for key, data in (("prefs", prefs), ("demos", demos), ("prompts", prompts)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in data))
    config = Qwen2Config(vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], max_position_embeddings=4 * (P + R + 1),
                         tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config)
    policy.generation_config.eos_token_id = tok.eos_token_id
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.save_pretrained(paths["policy"])
    tok.save_pretrained(paths["policy"])
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(paths["rm"])
    tok.save_pretrained(paths["rm"])
    n_params = sum(p.numel() for p in policy.parameters())
    del policy, rm
    return {"paths": paths, "parameters": n_params, "vocab_size": len(tok), "tokenizer_seconds": t_tok - t0,
            "seconds": time.perf_counter() - t0}


def _read_jsonl(path: Path, n: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n] if n else rows


# peak memory of a repetition, in the process (benchmarks/logprob_memory.py's method): the freed heap goes
# back to the system (malloc_trim), the kernel's peak-RSS counter is reset (/proc/self/clear_refs 5), and
# VmHWM after the run minus VmRSS before it is the run's peak: models, data, activations, optimiser state
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def with_peak_memory(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    r = fn()
    peak = _status_kib("VmHWM")
    r["peak_rss_mb"] = (peak - before) / 1024 if reset and peak is not None and before is not None else float("nan")
    return r


def _user_context(algorithm: str, paths: dict[str, Path], out: Path, options: dict[str, Any], online: bool) -> Any:
    from rlhf_zoo.runner import make_context

    setup: dict[str, Any] = {"model": str(paths["policy"])}
    if online:
        setup.update(reward=[str(paths["rm"])], prompts=str(paths["prompts"]))
    return make_context(algorithm, seed=0, out=out, device="cpu", options=options, progress=False,
                        checkpoint_every=0, setup=setup)


def user_zoo_options(algorithm: str, shape: dict[str, int], w: dict[str, int]) -> dict[str, Any]:
    """The zoo side's options, matched to the TRL side's config (``user_trl_args``)."""
    R = shape["response_tokens"]
    steps = math.ceil(w["pairs"] / w["batch"])
    if algorithm == "dpo":
        return {"dataset": "prefs", "max_pairs": w["pairs"], "batch_size": w["batch"], "epochs": 1, "steps": 0,
                "learning_rate": USER_LR, "warmup_steps": 0, "loss_type": "sigmoid", "beta": USER_BETA,
                "max_new_tokens": R}
    if algorithm == "sft":
        return {"dataset": "demos", "steps": steps, "batch_size": w["batch"], "learning_rate": USER_LR, "max_new_tokens": R}
    if algorithm == "reward-model":
        return {"dataset": "prefs", "steps": steps, "batch_size": w["batch"], "learning_rate": USER_LR,
                "heldout_fraction": 0.05, "max_new_tokens": R}
    if algorithm == "rloo":
        return {"iterations": w["iterations"], "prompts_per_iteration": w["prompts"], "k": w["k"], "epochs": 1,
                "minibatches": 1, "learning_rate": USER_LR, "beta": USER_BETA, "max_new_tokens": R}
    if algorithm == "grpo":
        return {"iterations": w["iterations"], "prompts_per_iteration": w["prompts"], "k": w["k"], "epochs": 2,
                "minibatches": 2, "learning_rate": USER_LR, "beta": USER_BETA, "loss_type": "grpo", "max_new_tokens": R}
    raise ValueError(algorithm)


def user_units(algorithm: str, shape: dict[str, int], w: dict[str, int]) -> tuple[str, float]:
    """(unit, amount of work per repetition): pairs, rows x tokens, or sampled responses."""
    steps = math.ceil(w["pairs"] / w["batch"])
    if algorithm == "dpo":
        return "pairs", float(w["pairs"])
    if algorithm == "reward-model":
        return "pairs", float(steps * w["batch"])
    if algorithm == "sft":
        return "tokens", float(steps * w["batch"] * (shape["prompt_tokens"] + shape["response_tokens"]))
    return "samples", float(w["iterations"] * w["prompts"] * w["k"])


def zoo_user(algorithm: str, paths: dict[str, Path], shape: dict[str, int], w: dict[str, int], out: Path) -> dict[str, Any]:
    opts = user_zoo_options(algorithm, shape, w)
    if "dataset" in opts:
        opts["dataset"] = str(paths[opts["dataset"]])
    start, cpu = time.perf_counter(), time.process_time()
    ctx = _user_context(algorithm, paths, out, opts, online=algorithm in ("rloo", "grpo", "ppo"))
    t_train = time.perf_counter()
    ctx.algorithm.train(ctx, ctx.config)
    end, cpu = time.perf_counter(), time.process_time() - cpu
    seconds = end - start
    unit, work = user_units(algorithm, shape, w)
    phases = {"setup (make_context: models, reward, prompts)": t_train - start, **ctx.phase_seconds}
    phases["other (data, optimiser, bookkeeping)"] = seconds - sum(phases.values())
    return {"seconds": seconds, "cpu_seconds": cpu, unit: work, f"{unit}_per_second": work / seconds,
            "train_seconds": end - t_train, "phases": phases}


def user_trl_args(algorithm: str, shape: dict[str, int], w: dict[str, int], out: Path) -> Any:
    """The TRL config of ``algorithm``'s counterpart, the zoo side's settings (``user_zoo_options``)."""
    import trl

    P, R = shape["prompt_tokens"], shape["response_tokens"]
    steps = math.ceil(w["pairs"] / w["batch"])
    common = dict(output_dir=str(out), learning_rate=USER_LR, weight_decay=0.0, max_grad_norm=1.0, bf16=False,
                  use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10**9,
                  disable_tqdm=True, dataloader_num_workers=0, seed=0, warmup_steps=0)
    if algorithm == "dpo":
        return trl.DPOConfig(**_config_kwargs(
            trl.DPOConfig, **common, per_device_train_batch_size=w["batch"], num_train_epochs=1,
            lr_scheduler_type="linear", beta=USER_BETA, loss_type=["sigmoid"], max_length=P + R,
            precompute_ref_log_probs=True, precompute_ref_batch_size=w["batch"]))
    if algorithm == "sft":
        return trl.SFTConfig(**_config_kwargs(trl.SFTConfig, **common, per_device_train_batch_size=w["batch"],
                                              max_steps=steps, max_length=P + R, packing=False,
                                              completion_only_loss=True))
    if algorithm == "reward-model":
        return trl.RewardConfig(**_config_kwargs(trl.RewardConfig, **common, per_device_train_batch_size=w["batch"],
                                                 max_steps=steps, max_length=P + R, center_rewards_coefficient=None))
    epochs, minibatches = (1, 1) if algorithm == "rloo" else (2, 2)
    cls = trl.RLOOConfig if algorithm == "rloo" else trl.GRPOConfig
    extra = {"loss_type": "grpo", "scale_rewards": "group"} if algorithm == "grpo" else {}
    return cls(**_config_kwargs(
        cls, **common, per_device_train_batch_size=w["prompts"] * w["k"] // minibatches,
        steps_per_generation=minibatches, num_generations=w["k"], num_iterations=epochs,
        max_steps=w["iterations"] * minibatches * epochs, lr_scheduler_type="constant", epsilon=0.2, beta=USER_BETA,
        max_completion_length=R, temperature=1.0, top_p=1.0, top_k=0, **extra))


def trl_user(algorithm: str, paths: dict[str, Path], shape: dict[str, int], w: dict[str, int], out: Path,
             train: bool = True) -> tuple[dict[str, Any], Any]:
    """TRL's counterpart of ``algorithm`` on the same model dirs and data; models load outside the timer,
    as the zoo's make_context loads them outside its own. ``train=False``: only build the trainer (its
    tokenised dataset, for the identity checks)."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback

    start, cpu = time.perf_counter(), time.process_time()
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    args = user_trl_args(algorithm, shape, w, out)
    if not train and algorithm == "dpo":
        args.precompute_ref_log_probs = False
    if algorithm == "reward-model":
        model = AutoModelForSequenceClassification.from_pretrained(paths["policy"], num_labels=1, use_safetensors=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(paths["policy"], use_safetensors=True)
    extra: dict[str, Any] = {}
    if algorithm == "dpo":
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(paths["policy"], use_safetensors=True).requires_grad_(False)
    if algorithm in ("rloo", "grpo"):
        extra["reward_funcs"] = AutoModelForSequenceClassification.from_pretrained(paths["rm"], use_safetensors=True).requires_grad_(False)
        extra["reward_processing_classes"] = tok
    t_data = time.perf_counter()
    if algorithm in ("dpo", "reward-model"):
        rows = _read_jsonl(paths["prefs"], w["pairs"])
        data = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})
    elif algorithm == "sft":
        rows = _read_jsonl(paths["demos"], w["pairs"])
        data = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "completion")})
    else:
        data = Dataset.from_dict({"prompt": [r["prompt"] for r in _read_jsonl(paths["prompts"])]})
    cls = {"dpo": trl.DPOTrainer, "sft": trl.SFTTrainer, "reward-model": trl.RewardTrainer, "rloo": trl.RLOOTrainer,
           "grpo": trl.GRPOTrainer}[algorithm]
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok, **extra)
    trainer.remove_callback(PrinterCallback)
    if not train:
        return {}, trainer
    rollout = Timer()
    if hasattr(trainer, "_generate_and_score_completions"):
        trainer._generate_and_score_completions = rollout.wrap(trainer._generate_and_score_completions)
    t_init = time.perf_counter()
    with _silence():
        trainer.train()
    end, cpu = time.perf_counter(), time.process_time() - cpu
    seconds = end - start
    unit, work = user_units(algorithm, shape, w)
    phases = {"setup (load models)": t_data - start,
              "data and trainer init (tokenise; DPO: reference log-probs; RLOO/GRPO: reference model)": t_init - t_data}
    if rollout.calls:
        phases["rollout (generate, old+ref logprobs, reward)"] = rollout.seconds
    phases["train"] = end - t_init - rollout.seconds
    if algorithm in ("rloo", "grpo"):
        samples = rollout.calls * args.generation_batch_size
        if samples != work:
            raise RuntimeError(f"TRL {cls.__name__} generated {samples} samples, expected {work}")
    return ({"seconds": seconds, "cpu_seconds": cpu, unit: work, f"{unit}_per_second": work / seconds,
             "train_seconds": end - t_init, "optimizer_steps": trainer.state.global_step, "phases": phases}, trainer)


def user_token_checks(paths: dict[str, Path], shape: dict[str, int], w: dict[str, int], out: Path) -> dict[str, Any]:
    """TRL's tokenised rows against the zoo's encoding of the same rows (``World.prompt_token_ids`` and
    ``response_token_ids`` of the user setup: prompt as the tokenizer writes it, BOS only where it adds
    one; response + EOS), for DPO (prompt / chosen / rejected), the reward model (prompt + chosen,
    prompt + rejected) and SFT (prompt + completion, loss mask on the completion)."""
    from rlhf_zoo.user_setup import UserSetup

    world = UserSetup.from_sources(str(paths["policy"]))
    prefs, demos = _read_jsonl(paths["prefs"], w["pairs"]), _read_jsonl(paths["demos"], w["pairs"])
    out_checks: dict[str, Any] = {}
    P = world.prompt_token_ids([r["prompt"] for r in prefs])
    C = world.response_token_ids([r["chosen"] for r in prefs])
    X = world.response_token_ids([r["rejected"] for r in prefs])
    _, dpo = trl_user("dpo", paths, shape, w, out / "check-dpo", train=False)
    ds = dpo.train_dataset
    same = sum((P[i], C[i], X[i]) == (list(ds["prompt_ids"][i]), list(ds["chosen_ids"][i]), list(ds["rejected_ids"][i]))
               for i in range(len(prefs)))
    out_checks["dpo"] = {"rows": len(prefs), "rows_identical": same, "trl_rows": len(ds)}
    _, rm = trl_user("reward-model", paths, shape, w, out / "check-rm", train=False)
    ds = rm.train_dataset
    same = sum((P[i] + C[i], P[i] + X[i]) == (list(ds["chosen_ids"][i]), list(ds["rejected_ids"][i]))
               for i in range(len(prefs)))
    out_checks["reward-model"] = {"rows": len(prefs), "rows_identical": same, "trl_rows": len(ds)}
    SP = world.prompt_token_ids([r["prompt"] for r in demos])
    SC = world.response_token_ids([r["completion"] for r in demos])
    _, sft = trl_user("sft", paths, shape, w, out / "check-sft", train=False)
    ds = sft.train_dataset
    if "completion_mask" in ds.column_names:
        masks = [list(m) for m in ds["completion_mask"]]
    else:  # folded into the labels: -100 where no loss is taken
        masks = [[int(x != -100) for x in row] for row in ds["labels"]]
    same = sum((SP[i] + SC[i], [0] * len(SP[i]) + [1] * len(SC[i])) == (list(ds["input_ids"][i]), masks[i])
               for i in range(len(demos)))
    out_checks["sft"] = {"rows": len(demos), "rows_identical": same, "trl_rows": len(ds)}
    lengths = {"prompt_tokens": sorted({len(p) for p in P}), "response_tokens_with_eos": sorted({len(c) for c in C + X})}
    out_checks["lengths"] = lengths
    return out_checks


def run_user_comparisons(args: argparse.Namespace, shape_name: str, trl: Any, tmp: Path) -> dict[str, Any]:
    """Build the shape's model and data, check tokenisation, then for every algorithm zoo and TRL
    interleaved (one warm-up round, ``reps`` counted), throughput and peak memory per repetition."""
    shape, w = dict(USER_SHAPES[shape_name]), dict(USER_WORK[shape_name])
    if args.user_reps is not None:
        w["reps"] = args.user_reps
    algorithms = [a for a in (args.algorithms or USER_ALGORITHMS) if a in USER_ALGORITHMS]
    print(f"user-model path, shape {shape_name}: building {shape}", flush=True)
    where = args.setup_dir or tmp / f"user-{shape_name}"
    built = build_user_setup(where, shape)
    paths = built["paths"]
    section_dir = where
    section: dict[str, Any] = {"shape": shape, "work": w, "parameters": built["parameters"],
                               "vocab_size": built["vocab_size"], "build_seconds": built["seconds"],
                               "tokenizer_train_seconds": built["tokenizer_seconds"], "algorithms": {},
                               "setup_dir": section_dir, "shape_name": shape_name}
    if trl is not None:
        section["checks"] = user_token_checks(paths, shape, w, tmp / "checks")
        print(f"  checks: {section['checks']}", flush=True)
    for algo in algorithms:
        unit, _ = user_units(algo, shape, w)
        key = f"{unit}_per_second"
        fns: dict[str, Callable[[int], dict[str, Any]]] = {
            "zoo": lambda rep, a=algo: with_peak_memory(lambda: zoo_user(a, paths, shape, w, tmp / f"zoo-{a}-{rep}"))}
        if trl is not None:
            fns["trl"] = lambda rep, a=algo: with_peak_memory(
                lambda: trl_user(a, paths, shape, w, tmp / f"trl-{a}-{rep}")[0])
        print(f"  {algo}: {unit} per repetition {user_units(algo, shape, w)[1]:.0f}, load {_load()}", flush=True)
        runs = _interleave(list(fns), fns, w["reps"])
        r: dict[str, Any] = {name: _summarise(side, key) for name, side in runs.items()}
        r["unit"] = key
        r["counterpart"] = TRL_COUNTERPART[algo]
        r["load_average"] = _load()
        for name in r:
            if isinstance(r[name], dict) and "median_peak_rss_mb" not in r[name] and name in runs:
                r[name]["median_peak_rss_mb"] = _median([x["peak_rss_mb"] for x in runs[name]["reps"]])
        if "trl" in r:
            r["ratio_zoo_vs_trl"] = r["zoo"][f"median_{key}"] / r["trl"][f"median_{key}"]
            r["ratio_zoo_vs_trl_cpu_time"] = r["trl"]["median_cpu_seconds"] / r["zoo"]["median_cpu_seconds"]
            r["ratio_per_rep"] = [z / t for z, t in zip(r["zoo"][key], r["trl"][key], strict=True)]
            r["memory_ratio_zoo_vs_trl"] = r["zoo"]["median_peak_rss_mb"] / r["trl"]["median_peak_rss_mb"]
        section["algorithms"][algo] = r
    return section


# --- 5. ppo vs TRL's last PPOTrainer (its own virtual environment) -------------------------------------
#: samples per rollout, rollouts per run, counted repetitions (4 epochs x 4 minibatches on both sides)
PPO_USER_WORK: dict[str, dict[str, int]] = {"realistic": {"samples": 8, "iterations": 1, "reps": 2},
                                            "tiny": {"samples": 64, "iterations": 2, "reps": 3},
                                            "mini": {"samples": 4, "iterations": 1, "reps": 1}}


def zoo_ppo_user(paths: dict[str, Path], shape: dict[str, int], w: dict[str, int], out: Path) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    ctx = _user_context("ppo", paths, out, {
        "iterations": w["iterations"], "batch_prompts": w["samples"], "epochs": PPO_EPOCHS, "minibatches": PPO_MINIBATCHES,
        "learning_rate": USER_LR, "critic_learning_rate": USER_LR, "beta": USER_BETA, "clip": 0.2, "value_clip": 0.2,
        "max_new_tokens": shape["response_tokens"]}, online=True)
    t_train = time.perf_counter()
    ctx.algorithm.train(ctx, ctx.config)
    end, cpu = time.perf_counter(), time.process_time() - cpu
    samples = w["iterations"] * w["samples"]
    phases = {"setup (make_context: models, reward, prompts)": t_train - start, **ctx.phase_seconds}
    phases["other (critic load, env, data, bookkeeping)"] = end - start - sum(phases.values())
    return {"seconds": end - start, "cpu_seconds": cpu, "samples": samples, "samples_per_second": samples / (end - start),
            "train_seconds": end - t_train, "phases": phases}


def trl_ppo_user(paths: dict[str, Path], shape: dict[str, int], w: dict[str, int], out: Path) -> dict[str, Any]:
    """TRL's PPOTrainer (trl.experimental.ppo, trl <= 1.12): policy and reference from the policy dir,
    reward model and value model (critic) from the RM dir, as the zoo's critic starts from an RM that reads
    the policy's tokens; the prompts tokenised as the zoo does (no special tokens added by this tokenizer)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    start, cpu = time.perf_counter(), time.process_time()
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"], use_safetensors=True)
    ref = AutoModelForCausalLM.from_pretrained(paths["policy"], use_safetensors=True).requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(paths["rm"], num_labels=1, use_safetensors=True).requires_grad_(False)
    value = AutoModelForSequenceClassification.from_pretrained(paths["rm"], num_labels=1, use_safetensors=True)
    prompts = [r["prompt"] for r in _read_jsonl(paths["prompts"])]
    data = Dataset.from_dict({"input_ids": tok(prompts, add_special_tokens=False)["input_ids"]})
    args = PPOConfig(**_config_kwargs(
        PPOConfig, output_dir=str(out), per_device_train_batch_size=w["samples"],  # the rollout; minibatches of it
        gradient_accumulation_steps=1, num_mini_batches=PPO_MINIBATCHES, num_ppo_epochs=PPO_EPOCHS,
        total_episodes=w["samples"] * w["iterations"], response_length=shape["response_tokens"], temperature=1.0,
        kl_coef=USER_BETA, cliprange=0.2, cliprange_value=0.2, learning_rate=USER_LR,
        local_rollout_forward_batch_size=w["samples"], num_sample_generations=0, stop_token="eos",
        bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**9, disable_tqdm=True,
        dataloader_num_workers=0, seed=0))
    t_init = time.perf_counter()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=data)
    trainer.remove_callback(PrinterCallback)
    t_train = time.perf_counter()
    with _silence():
        trainer.train()
    end, cpu = time.perf_counter(), time.process_time() - cpu
    samples = w["iterations"] * w["samples"]
    return {"seconds": end - start, "cpu_seconds": cpu, "samples": samples, "samples_per_second": samples / (end - start),
            "train_seconds": end - t_train,
            "phases": {"setup (load models, tokenise prompts)": t_init - start, "trainer init": t_train - t_init,
                       "train (rollout + 4 x 4 policy and value steps)": end - t_train}}


def ppo_child(args: argparse.Namespace) -> None:
    """One ppo repetition in this (fresh) process, written as JSON to --child-out."""
    torch.set_num_threads(args.threads)
    _quiet()
    shape_name = "mini" if args.quick else args.shape
    shape, w = USER_SHAPES[shape_name], PPO_USER_WORK[shape_name]
    d = args.setup_dir
    paths = {"policy": d / "policy", "rm": d / "rm", "prompts": d / "prompts.jsonl"}
    out = Path(tempfile.mkdtemp(prefix=f"ppo-{args.ppo_child}-"))
    # imports outside the timer on both sides (TRL's trl_ppo_user imports before its clock starts)
    if args.ppo_child == "zoo":
        import gymnasium  # noqa: F401

        import rlhf_zoo.runner  # noqa: F401
        from rlhf_zoo.registry import get_registry

        get_registry().algorithm("ppo").config_cls()
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import trl.experimental.ppo  # noqa: F401
    try:
        fn = zoo_ppo_user if args.ppo_child == "zoo" else trl_ppo_user
        r = with_peak_memory(lambda: fn(paths, shape, w, out))
        if args.ppo_child == "trl":
            import trl
            r["trl_version"] = trl.__version__
        import transformers
        r["torch_version"], r["transformers_version"] = torch.__version__, transformers.__version__
    finally:
        shutil.rmtree(out, True)
    args.child_out.write_text(json.dumps(r))


def run_ppo(args: argparse.Namespace, setup_dir: Path) -> dict[str, Any]:
    """zoo ppo (this interpreter) and TRL's PPOTrainer (--trl-ppo-python, another virtual environment),
    each repetition a fresh process, interleaved, one warm-up round."""
    shape_name = "mini" if args.quick else args.shape
    w = dict(PPO_USER_WORK[shape_name])
    if args.user_reps is not None:
        w["reps"] = args.user_reps
    pythons = {"zoo": sys.executable}
    if args.trl_ppo_python:
        pythons["trl"] = str(args.trl_ppo_python)
    base = [__file__, "--shape", args.shape, "--threads", str(args.threads), "--setup-dir", str(setup_dir)]
    if args.quick:
        base.append("--quick")
    out: dict[str, Any] = {n: {"warmup": None, "reps": []} for n in pythons}
    errors: dict[str, str] = {}
    for rep in range(w["reps"] + 1):
        for side, python in pythons.items():
            if side in errors:
                continue
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                child_out = Path(f.name)
            proc = subprocess.run([python, *base, "--ppo-child", side, "--child-out", str(child_out)],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode:
                errors[side] = (proc.stdout + proc.stderr)[-2000:]
                print(f"  ppo {side} failed:\n{errors[side]}", flush=True)
                continue
            r = json.loads(child_out.read_text())
            child_out.unlink()
            out[side]["warmup" if rep == 0 else "reps"] = r if rep == 0 else [*out[side]["reps"], r]
            print(f"  {'warm-up' if rep == 0 else f'rep {rep}'} ppo {side}: {r['seconds']:.2f} s, "
                  f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
    res: dict[str, Any] = {"work": w, "pythons": pythons, "errors": errors, "load_average": _load()}
    for side in pythons:
        if out[side]["reps"]:
            res[side] = _summarise(out[side], "samples_per_second")
            res[side]["versions"] = {k: out[side]["reps"][0].get(k) for k in ("trl_version", "torch_version",
                                                                               "transformers_version")}
    if "trl" in res and "zoo" in res:
        res["ratio_zoo_vs_trl"] = res["zoo"]["median_samples_per_second"] / res["trl"]["median_samples_per_second"]
        res["ratio_zoo_vs_trl_cpu_time"] = res["trl"]["median_cpu_seconds"] / res["zoo"]["median_cpu_seconds"]
        res["ratio_per_rep"] = [z / t for z, t in zip(res["zoo"]["samples_per_second"], res["trl"]["samples_per_second"],
                                                      strict=True)]
        res["memory_ratio_zoo_vs_trl"] = res["zoo"]["median_peak_rss_mb"] / res["trl"]["median_peak_rss_mb"]
    return res


# --- driver --------------------------------------------------------------------------------------------
def _interleave(names: list[str], fns: dict[str, Callable[[int], dict[str, Any]]], reps: int) -> dict[str, Any]:
    """Run fns round-robin reps + 1 times; round 0 is the warm-up. -> {name: {"warmup": r0, "reps": [...]}}"""
    out: dict[str, Any] = {n: {"warmup": None, "reps": []} for n in names}
    for rep in range(reps + 1):
        for n in names:
            r = fns[n](rep)
            if rep == 0:
                out[n]["warmup"] = r
            else:
                out[n]["reps"].append(r)
            print(f"  {'warm-up' if rep == 0 else f'rep {rep}'} {n}: {r['seconds']:.3f} s", flush=True)
    return out


def _summarise(side: dict[str, Any], key: str) -> dict[str, Any]:
    """Medians over the counted repetitions of the throughput ``key``, the seconds, each phase and every
    other numeric figure a repetition reports; the per-rep lists of seconds and throughput."""
    reps = side["reps"]
    out: dict[str, Any] = {f"median_{key}": _median([r[key] for r in reps]),
                           "median_seconds": _median([r["seconds"] for r in reps]),
                           "seconds": [r["seconds"] for r in reps], key: [r[key] for r in reps],
                           "median_phase_seconds": {p: _median([r["phases"][p] for r in reps]) for p in reps[0]["phases"]},
                           "warmup_seconds": side["warmup"]["seconds"]}
    for k, x in reps[0].items():
        if k not in ("seconds", key, "phases") and isinstance(x, (int, float)):
            out[f"median_{k}"] = _median([r[k] for r in reps])
    return out


def _header(args: argparse.Namespace, settings: dict[str, Any], trl: Any, skipped: str | None) -> dict[str, Any]:
    return {"benchmark": "speed_vs_trl", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "shape": args.shape, "machine": _machine(), "versions": _versions(), "git_commit": _git_commit(),
            "settings": settings, "trl": {"available": trl is not None, "skipped_reason": skipped},
            "targets": {"throughput_ratio_min": TARGET_THROUGHPUT_RATIO, "env_ratio_max": TARGET_ENV_RATIO,
                        "realistic_throughput_ratio_min": TARGET_REALISTIC_RATIO,
                        "realistic_peak_memory": "<= TRL's"}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The sentiment-task sections (tiny shape, unless --user-only), then every trainer through the
    user-model path at the shape's size (unless --no-user; --quick: the test's mini shape)."""
    torch.set_num_threads(args.threads)
    _quiet()
    trl, skipped = (None, "--no-trl given") if args.no_trl else _import_trl()
    if args.shape == "tiny" and not args.user_only:
        result = run_task_sections(args, trl, skipped)
    else:
        if skipped:
            print(f"TRL sides skipped: {skipped}", flush=True)
        result = _header(args, {"threads": args.threads, "quick": args.quick}, trl, skipped)
    if not args.no_user:
        tmp = Path(tempfile.mkdtemp(prefix="speed_vs_trl-user-"))
        atexit.register(shutil.rmtree, tmp, True)
        shape = "mini" if args.quick else args.shape
        result["user"] = run_user_comparisons(args, shape, trl, tmp)
        result["user"]["run_info"] = {"command": result["command"], "git_commit": _git_commit(),
                                      "versions": _versions(), "load_average_at_start": result["machine"]["load_average_at_start"]}
        if "ppo" in (args.algorithms or ["ppo"]):
            print(f"ppo: zoo vs {args.trl_ppo_python or '(no --trl-ppo-python: zoo side only)'}", flush=True)
            result["ppo"] = run_ppo(args, result["user"]["setup_dir"])
        for r in result["user"]["algorithms"].values():
            ratio = r.get("ratio_zoo_vs_trl")
            target = TARGET_REALISTIC_RATIO if shape == "realistic" else 2.0
            r["target"] = target
            r["meets_target"] = None if ratio is None else bool(ratio >= target)
            if shape == "realistic" and ratio is not None:
                r["meets_memory_target"] = bool(r["memory_ratio_zoo_vs_trl"] <= 1.0)
    result["machine"]["load_average_at_end"] = _load()
    return result


def run_task_sections(args: argparse.Namespace, trl: Any, skipped: str | None) -> dict[str, Any]:
    from rlhf_zoo.registry import get_registry

    s = dict(QUICK if args.quick else DEFAULTS)
    for k in DEFAULTS:
        if getattr(args, k, None) is not None:
            s[k] = getattr(args, k)
    if s["samples"] % (PPO_MINIBATCHES * s["num_generations"]) or s["samples"] % PPO_MINIBATCHES:
        raise SystemExit(f"--samples must be a multiple of {PPO_MINIBATCHES} x num_generations")
    registry = get_registry()
    task = registry.task(args.task).load(seed=0, progress=True)
    dpo_defaults = registry.algorithm("dpo").config_cls()
    ppo_defaults = registry.algorithm("ppo").config_cls()
    s.update(dpo_lengths(task, s["pairs"]))
    s["vocab_size"] = len(task.tokenizer)
    dpo_module = sys.modules.get(registry.algorithm("dpo").train.__module__)
    s["reference_batch_pairs"] = int(getattr(dpo_module, "REFERENCE_BATCH", 256))  # TRL precompute: the same
    s.update({"task": args.task, "threads": args.threads, "quick": args.quick,
              "dpo_learning_rate": dpo_defaults.learning_rate, "warmup_steps": dpo_defaults.warmup_steps,
              "ppo_learning_rate": ppo_defaults.learning_rate, "beta": float(task.beta),
              "max_new_tokens": int(task.max_new_tokens), "ppo_epochs": PPO_EPOCHS,
              "ppo_minibatches": PPO_MINIBATCHES})
    if skipped:
        print(f"TRL sides skipped: {skipped}", flush=True)
    result = _header(args, s, trl, skipped)
    tmp = Path(tempfile.mkdtemp(prefix="speed_vs_trl-"))  # run directories of both sides, removed at exit
    atexit.register(shutil.rmtree, tmp, True)

    # 1) DPO
    print(f"DPO: {s['pairs']} pairs, batch {s['dpo_batch']}", flush=True)
    fns: dict[str, Callable[[int], dict[str, Any]]] = {"zoo": lambda rep: zoo_dpo(args.task, s, tmp / f"zoo-dpo-{rep}")}
    trainers: list[Any] = []
    if trl is not None:
        def _trl_dpo(rep: int) -> dict[str, Any]:
            r, trainer = trl_dpo(task, s, tmp / f"trl-dpo-{rep}")
            if not trainers:
                trainers.append(trainer)
            return r
        fns["trl"] = _trl_dpo
    runs = _interleave(list(fns), fns, s["reps"])
    dpo: dict[str, Any] = {name: _summarise(side, "pairs_per_second") for name, side in runs.items()}
    dpo["work_per_pair"] = {
        "zoo": "tokenise once; 1 reference forward of chosen+rejected (precomputed, no grad); 1 policy forward of "
               "chosen+rejected with backward; AdamW step per batch",
        "trl": "tokenise once (datasets.map); 1 reference forward (precompute_ref_log_probs=True); 1 policy forward "
               "(fused LM head: log-probs, entropy, logit metrics) with backward; AdamW (fused) step per batch"}
    if trl is not None:
        dpo["ratio_zoo_vs_trl"] = dpo["zoo"]["median_pairs_per_second"] / dpo["trl"]["median_pairs_per_second"]
        dpo["ratio_zoo_vs_trl_cpu_time"] = ((dpo["zoo"]["median_pairs"] / dpo["zoo"]["median_cpu_seconds"])
                                            / (dpo["trl"]["median_pairs"] / dpo["trl"]["median_cpu_seconds"]))
        dpo["ratio_per_rep"] = [z / t for z, t in zip(dpo["zoo"]["pairs_per_second"], dpo["trl"]["pairs_per_second"],
                                                      strict=True)]
        dpo["checks"] = check_dpo_tokens(task, trainers[0], s)
        dpo["checks"]["zoo_pairs"] = int(dpo["zoo"]["median_pairs"])
        dpo["checks"]["trl_steps"] = int(dpo["trl"]["median_steps"])
        if dpo["checks"]["rows_identical"] != dpo["checks"]["rows"]:
            print(f"WARNING: TRL's token rows differ from the zoo's: {dpo['checks']}", flush=True)
    dpo["zoo_breakdown"] = zoo_breakdown("dpo", lambda: zoo_dpo(args.task, s, tmp / "zoo-dpo-breakdown"),
                                         ["load_pairs", "load_pairs_with_report", "encode_pairs", "reference_logprobs",
                                          "pair_logprobs", "backward", "optimizer_step"], split_by_term)
    result["dpo"] = dpo

    # 2) online
    print(f"online: {s['iterations']} iterations x {s['samples']} samples", flush=True)
    fns = {"zoo": lambda rep: zoo_ppo(args.task, s, tmp / f"zoo-ppo-{rep}")}
    if trl is not None:
        fns["trl"] = lambda rep: trl_rloo(task, s, tmp / f"trl-rloo-{rep}")
    runs = _interleave(list(fns), fns, s["reps"])
    online: dict[str, Any] = {name: _summarise(side, "samples_per_second") for name, side in runs.items()}
    online["algorithms"] = {"zoo": "ppo", "trl": "RLOOTrainer"}
    online["work_per_rollout"] = {
        "zoo": f"{s['samples']} prompts x 1 sample; sample with log-probs (KV cache); env: 1 reference forward + "
               f"1 RM forward; 1 critic forward (old values); {PPO_EPOCHS} epochs x {PPO_MINIBATCHES} minibatches, "
               "each 1 policy forward+backward+AdamW AND 1 critic forward+backward+AdamW",
        "trl": f"{s['samples'] // s['num_generations']} prompts x {s['num_generations']} samples; HF generate; 1 policy "
               "forward (old log-probs); 1 reference forward (beta > 0); 1 RM forward (callable); num_iterations="
               f"{PPO_EPOCHS} x steps_per_generation={PPO_MINIBATCHES}, each 1 policy forward+backward+AdamW; no critic"}
    if trl is not None:
        online["ratio_zoo_vs_trl"] = (online["zoo"]["median_samples_per_second"]
                                      / online["trl"]["median_samples_per_second"])
        online["ratio_zoo_vs_trl_cpu_time"] = ((online["zoo"]["median_samples"] / online["zoo"]["median_cpu_seconds"])
                                               / (online["trl"]["median_samples"] / online["trl"]["median_cpu_seconds"]))
        online["ratio_per_rep"] = [z / t for z, t in zip(online["zoo"]["samples_per_second"],
                                                         online["trl"]["samples_per_second"], strict=True)]

    bd = zoo_breakdown("ppo", lambda: zoo_ppo(args.task, s, tmp / "zoo-ppo-breakdown"),
                       ["collect", "token_values", "policy_step", "policy_loss", "backward", "optimizer_step"],
                       split_by_term)
    if "functions" in bd:
        critic = sum(v["seconds"] for k, v in bd["functions"].items() if "critic" in k)
        if critic > 0:
            bd["critic_seconds"] = critic
            bd["critic_share"] = critic / bd["seconds"]
            # what zoo ppo would do without its critic, at the measured median: an estimate, not a measurement
            zoo_wo = online["zoo"]["median_seconds"] * (1 - bd["critic_share"])
            bd["samples_per_second_without_critic_estimate"] = s["iterations"] * s["samples"] / zoo_wo
            if trl is not None:
                bd["ratio_without_critic_estimate"] = (bd["samples_per_second_without_critic_estimate"]
                                                       / online["trl"]["median_samples_per_second"])
    online["zoo_breakdown"] = bd
    result["online"] = online

    # 3) env overhead
    print(f"env: batch {s['env_batch']}, {s['env_reps']} reps", flush=True)
    methods = env_methods(task, s["env_batch"])

    times: dict[str, list[float]] = {"plain": [], "env": [], "plain_ref": []}
    cpus: dict[str, list[float]] = {name: [] for name in times}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in times}
    for rep in range(s["env_reps"] + 1):  # round 0 warms up
        for name in times:
            start, cpu = time.perf_counter(), time.process_time()
            split = methods[name]()
            if rep:
                times[name].append(time.perf_counter() - start)
                cpus[name].append(time.process_time() - cpu)
                parts[name].append(split)
    env: dict[str, Any] = {name: {"seconds": v, "median_seconds": _median(v), "median_cpu_seconds": _median(cpus[name]),
                                  "median_part_seconds": {k: _median([p[k] for p in parts[name]]) for k in parts[name][0]}}
                           for name, v in times.items()}
    env["ratio_env_vs_plain"] = env["env"]["median_seconds"] / env["plain"]["median_seconds"]
    env["ratio_env_vs_plain_cpu_time"] = env["env"]["median_cpu_seconds"] / env["plain"]["median_cpu_seconds"]
    env["ratio_per_rep"] = [e / p for e, p in zip(env["env"]["seconds"], env["plain"]["seconds"], strict=True)]
    env["ratio_env_vs_plain_ref"] = env["env"]["median_seconds"] / env["plain_ref"]["median_seconds"]
    env["work"] = {"plain": "transformers generate (sampling, KV cache) + 1 RM forward",
                   "plain_ref": "plain + 1 reference forward and the log-probs of the sampled tokens",
                   "env": "zoo sampler (KV cache, log-probs) + ResponseGen step_tensors: 1 reference forward, "
                          "1 RM forward, per-token KL-shaped rewards"}
    result["env"] = env

    for section in ("dpo", "online"):
        r = result[section].get("ratio_zoo_vs_trl")
        result[section]["meets_target"] = None if r is None else bool(r >= TARGET_THROUGHPUT_RATIO)
    result["env"]["meets_target"] = bool(result["env"]["ratio_env_vs_plain"] <= TARGET_ENV_RATIO)
    result["machine"]["load_average_at_end"] = _load()
    return result


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def spread(section: dict[str, Any]) -> str:
    xs = section.get("ratio_per_rep")
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "n/a"


def markdown(r: dict[str, Any]) -> str:
    """The task sections' report (tiny shape) and/or the user-model comparisons'."""
    text = markdown_task(r) if "dpo" in r else markdown_header(r)
    if "user" in r:
        text += "\n" + markdown_user(r)
    if "ppo" in r:
        text += "\n" + markdown_ppo(r)
    return text


def markdown_header(r: dict[str, Any]) -> str:
    m, v = r["machine"], r["versions"]
    shape = "mini (--quick)" if r["settings"].get("quick") else r.get("shape", "tiny")
    lines = [f"# Speed: rlhf_zoo vs TRL, {shape} shape", "",
             f"`{r['command']}` (written by benchmarks/speed_vs_trl.py; its docstring says exactly what is timed).", "",
             f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), torch "
             f"threads {m['torch_threads']} for every side (OMP_NUM_THREADS={m['OMP_NUM_THREADS']}), CPU fp32; load "
             f"average (1, 5, 15 min) {m['load_average_at_start']} at the start, {m.get('load_average_at_end')} at "
             f"the end. Versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, accelerate "
             f"{v['accelerate']}, datasets {v['datasets']}, rlhf-zoo {v['rlhf-zoo']}, python {v['python']}. "
             f"Commit {r['git_commit']} (plus uncommitted changes where the tree had them).", ""]
    if not r["trl"]["available"]:
        lines += [f"**TRL sides skipped**: {r['trl']['skipped_reason']}", ""]
    return "\n".join(lines) + "\n"


def markdown_user(r: dict[str, Any]) -> str:
    u = r["user"]
    sh, w = u["shape"], u["work"]
    steps = math.ceil(w["pairs"] / w["batch"])
    info = u.get("run_info", {})
    run_line = []
    if info and info.get("command") != r.get("command"):  # merged into an earlier result: say where these came from
        iv = info.get("versions", {})
        run_line = [f"These figures (and the ppo section's) come from a later run: `{info.get('command')}`, commit "
                    f"{info.get('git_commit')} plus uncommitted changes, torch {iv.get('torch')}, transformers "
                    f"{iv.get('transformers')}, trl {iv.get('trl')}; load average at its start "
                    f"{info.get('load_average_at_start')}, at its end "
                    f"{info.get('machine', {}).get('load_average_at_end')}.", ""]
    loads = [a.get("load_average") for a in u["algorithms"].values() if a.get("load_average")]
    busy = max((x[0] for x in loads), default=0.0) > LOAD_QUIET
    lines = [
        f"## Every trainer through the user-model path ({u.get('shape_name', r.get('shape', 'tiny'))} shape)", "",
        *run_line,
        *([f"**Measured under load**: the 1-minute load average was above {LOAD_QUIET} on this 2-core machine "
           "during these comparisons (other benchmarks and a CI run shared it; the last column says how busy). "
           "Wall-clock ratios are less reliable than on a quiet machine; the CPU-time ratios, which other "
           "processes inflate less, are beside them.", ""] if busy else []),
        *([f"**One counted repetition** per side (after a warm-up): the medians are that repetition and the "
           "spread is one pair.", ""] if w["reps"] == 1 else []),
        f"Built from config in-process (`build_user_setup`, {u['build_seconds']:.0f} s): a byte-level BPE tokenizer "
        f"of {u['vocab_size']} tokens trained on generated text ({u['tokenizer_train_seconds']:.0f} s), a Qwen2 causal "
        f"LM of {sh['layers']} layers x {sh['hidden']} ({u['parameters'] / 1e6:.1f}M parameters, random weights), a "
        f"reward model of the same architecture (AutoModelForSequenceClassification, one label); prompts of "
        f"{sh['prompt_tokens']} tokens, responses of {sh['response_tokens']} (EOS included; sampled ones: up to "
        f"{sh['response_tokens']}). Both sides read the same model directories and JSONL files "
        "(`zoo`: make_context with `--model`/`--reward`/`--prompts`/`--dataset`, then the plugin's train; TRL: "
        "from_pretrained, a datasets.Dataset of the same rows, the trainer and `train()`), timed end to end from "
        "the files to a trained model.",
        "",
        f"Work per repetition: dpo {w['pairs']} pairs, batch {w['batch']}, 1 epoch (reference log-probs precomputed "
        f"on both sides); sft and reward-model {steps} steps of {w['batch']} rows/pairs; rloo {w['iterations']} "
        f"iteration(s) of {w['prompts']} prompts x {w['k']} samples, 1 epoch x 1 minibatch; grpo the same rollouts, "
        f"2 epochs x 2 minibatches; beta {USER_BETA}, learning rate {USER_LR}, clip 0.2, grad-norm clip 1. Medians "
        f"over {w['reps']} interleaved repetitions (zoo, TRL, zoo, TRL, ...) after one warm-up round. Peak memory: "
        "the repetition's peak resident set (VmHWM, reset before it) above the resident set just before it "
        "(freed heap returned first), i.e. models, data, activations and optimiser state of that run.",
        "",
        "| zoo | TRL | unit | zoo | TRL | ratio | per-pair spread | ratio on CPU time | target | met | peak MB zoo | "
        "peak MB TRL | memory <= TRL | load during it |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, a in u["algorithms"].items():
        key = a["unit"]
        zoo, trl = a["zoo"], a.get("trl", {})
        mem_met = a.get("meets_memory_target")
        lines.append(
            f"| `{algo}` | `{a['counterpart']}` | {key.replace('_', ' ')} | {_fmt(zoo[f'median_{key}'], 2)} | "
            f"{_fmt(trl.get(f'median_{key}'), 2)} | {_fmt(a.get('ratio_zoo_vs_trl'), 2)} | {spread(a)} | "
            f"{_fmt(a.get('ratio_zoo_vs_trl_cpu_time'), 2)} | >= {a.get('target', 'n/a')} | "
            f"{'n/a' if a.get('meets_target') is None else ('yes' if a['meets_target'] else '**no**')} | "
            f"{_fmt(zoo.get('median_peak_rss_mb'), 0)} | {_fmt(trl.get('median_peak_rss_mb'), 0)} | "
            f"{'n/a' if mem_met is None else ('yes' if mem_met else '**no**')} | {a.get('load_average')} |")
    lines += ["", "### Where the time goes (median seconds per repetition)", ""]
    for algo, a in u["algorithms"].items():
        for side in ("zoo", "trl"):
            if side in a:
                ph = ", ".join(f"{k} {x:.2f}" for k, x in a[side]["median_phase_seconds"].items())
                lines.append(f"- {algo}, {side}: total {a[side]['median_seconds']:.2f} s: {ph}")
    if "checks" in u:
        c = u["checks"]
        lines += ["", "### Checks", "",
                  "- Identical tokenisation (TRL's tokenised dataset rows against the zoo's encoding of the same rows): "
                  + ", ".join(f"{k} {v['rows_identical']} of {v['rows']} rows" for k, v in c.items() if k != "lengths")
                  + f"; prompt lengths {c['lengths']['prompt_tokens']}, response lengths with EOS "
                  f"{c['lengths']['response_tokens_with_eos']} tokens."]
    return "\n".join(lines) + "\n"


def markdown_ppo(r: dict[str, Any]) -> str:
    p = r["ppo"]
    w = p["work"]
    trl_v = p.get("trl", {}).get("versions", {})
    lines = ["## `ppo` vs TRL's PPOTrainer (user-model path, same shape)", "",
             "TRL 1.16 has no PPO trainer; `trl.experimental.ppo.PPOTrainer` was last shipped in trl 1.12 (1.13.0, "
             "1.14.0 and 1.15.0 lack it; 0.21-0.24 had it as `trl.PPOTrainer`). It runs from its own virtual "
             f"environment (`{p['pythons'].get('trl', 'not given')}`: trl {trl_v.get('trl_version')}, torch "
             f"{trl_v.get('torch_version')}, transformers {trl_v.get('transformers_version')}), so each repetition of "
             "either side is a fresh process (imports outside the timer), interleaved, one warm-up round. Both: "
             f"{w['iterations']} rollout(s) of {w['samples']} prompts x 1 sample, {PPO_EPOCHS} epochs x "
             f"{PPO_MINIBATCHES} minibatches of policy and value steps, critic (value model) initialised from the "
             f"reward model, KL coefficient {USER_BETA} in the reward, clip 0.2, value clip 0.2, lr {USER_LR}.", ""]
    if (p.get("load_average") or [0.0])[0] > LOAD_QUIET:
        lines += [f"**Measured under load** (1-minute load average {p['load_average'][0]} at the end, above "
                  f"{LOAD_QUIET}).", ""]
    if w["reps"] == 1:
        lines += ["**One counted repetition** per side (after a warm-up).", ""]
    if p.get("errors"):
        lines += [f"- {side} failed: `{err.strip().splitlines()[-1] if err.strip() else '?'}`"
                  for side, err in p["errors"].items()]
        lines.append("")
    if "zoo" in p:
        trl = p.get("trl", {})
        lines += ["| unit | zoo | TRL | ratio | per-pair spread | ratio on CPU time | peak MB zoo | peak MB TRL | "
                  "load during it |", "|---|---|---|---|---|---|---|---|---|",
                  f"| samples/s | {_fmt(p['zoo']['median_samples_per_second'], 2)} | "
                  f"{_fmt(trl.get('median_samples_per_second'), 2)} | {_fmt(p.get('ratio_zoo_vs_trl'), 2)} | "
                  f"{spread(p)} | {_fmt(p.get('ratio_zoo_vs_trl_cpu_time'), 2)} | "
                  f"{_fmt(p['zoo'].get('median_peak_rss_mb'), 0)} | {_fmt(trl.get('median_peak_rss_mb'), 0)} | "
                  f"{p.get('load_average')} |", ""]
        for side in ("zoo", "trl"):
            if side in p:
                ph = ", ".join(f"{k} {x:.2f}" for k, x in p[side]["median_phase_seconds"].items())
                lines.append(f"- ppo, {side}: total {p[side]['median_seconds']:.2f} s: {ph}")
    return "\n".join(lines) + "\n"


def markdown_task(r: dict[str, Any]) -> str:
    s, m, v = r["settings"], r["machine"], r["versions"]
    dpo, online, env = r["dpo"], r["online"], r["env"]
    has_trl = r["trl"]["available"]

    def med(section: dict, side: str, key: str) -> float | None:
        return section[side][f"median_{key}"] if side in section else None

    def met(x: bool | None) -> str:
        return "n/a" if x is None else ("yes" if x else "**no**")

    lines = [
        "# Speed: rlhf_zoo vs TRL, side by side in one process",
        "",
        f"`{r['command']}` (written by benchmarks/speed_vs_trl.py; its docstring says exactly what is timed).",
        "",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), "
        f"torch threads {m['torch_threads']} for every side (OMP_NUM_THREADS={m['OMP_NUM_THREADS']}), CPU fp32; "
        f"load average (1, 5, 15 min) {m['load_average_at_start']} at the start, {m.get('load_average_at_end')} at "
        "the end (the machine is shared; interleaving exposes both sides to the same load). "
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, accelerate "
        f"{v['accelerate']}, datasets {v['datasets']}, rlhf-zoo {v['rlhf-zoo']}, python {v['python']}. "
        f"Commit {r['git_commit']}.",
        "",
        f"Task `{s['task']}`. Medians over {s['reps']} interleaved repetitions (zoo, TRL, zoo, TRL, ...) after one "
        f"warm-up round; env: {s['env_reps']} repetitions.",
        "",
    ]
    if not has_trl:
        lines += [f"**TRL sides skipped**: {r['trl']['skipped_reason']}", ""]
    lines += [
        "| comparison | unit | zoo | TRL / plain | ratio | ratio on CPU time | target | met |",
        "|---|---|---|---|---|---|---|---|",
        f"| `dpo` vs `DPOTrainer` ({s['pairs']} pairs, batch {s['dpo_batch']}, 1 epoch) | pairs/s | "
        f"{_fmt(med(dpo, 'zoo', 'pairs_per_second'))} | {_fmt(med(dpo, 'trl', 'pairs_per_second'))} | "
        f"{_fmt(dpo.get('ratio_zoo_vs_trl'), 2)} | {_fmt(dpo.get('ratio_zoo_vs_trl_cpu_time'), 2)} | "
        f">= {TARGET_THROUGHPUT_RATIO} | {met(dpo['meets_target'])} |",
        f"| `ppo` vs `RLOOTrainer` ({s['iterations']} iterations x {s['samples']} samples) | samples/s | "
        f"{_fmt(med(online, 'zoo', 'samples_per_second'))} | {_fmt(med(online, 'trl', 'samples_per_second'))} | "
        f"{_fmt(online.get('ratio_zoo_vs_trl'), 2)} | {_fmt(online.get('ratio_zoo_vs_trl_cpu_time'), 2)} | "
        f">= {TARGET_THROUGHPUT_RATIO} | {met(online['meets_target'])} |",
        f"| ResponseGen env vs `generate` + RM (batch {s['env_batch']}) | ms per batch | "
        f"{_fmt(1000 * env['env']['median_seconds'])} | {_fmt(1000 * env['plain']['median_seconds'])} | "
        f"{_fmt(env['ratio_env_vs_plain'], 2)} | {_fmt(env['ratio_env_vs_plain_cpu_time'], 2)} | "
        f"<= {TARGET_ENV_RATIO} | {met(env['meets_target'])} |",
        "",
        "Ratios: zoo median throughput / TRL median throughput; env: env median time / plain median time "
        "(wall clock; the targets are judged on it). The CPU-time column is the same ratio on the process's CPU "
        "time (`time.process_time`), which time other processes take on this shared machine does not inflate. "
        f"Spread: the ratio of each repetition's pair (zoo and TRL run back to back) ranges over {spread(dpo)} "
        f"(DPO), {spread(online)} (online), {spread(env)} (env).",
        "",
        "## Where the time goes (median seconds per repetition)",
        "",
    ]
    for title, section in (("DPO", dpo), ("online", online)):
        for side in ("zoo", "trl"):
            if side in section:
                ph = ", ".join(f"{k} {x:.2f}" for k, x in section[side]["median_phase_seconds"].items())
                lines.append(f"- {title}, {side}: total {section[side]['median_seconds']:.2f} s: {ph}")
    steps = math.ceil(s["pairs"] / s["dpo_batch"])
    if "trl" in dpo:
        lines.append(f"- DPO per optimiser step ({steps} steps): zoo train phase "
                     f"{1000 * dpo['zoo']['median_phase_seconds']['train'] / steps:.0f} ms, TRL train() "
                     f"{1000 * dpo['trl']['median_phase_seconds']['train'] / steps:.0f} ms (includes its dataloader "
                     "and per-step metrics)")
    for title, bd in (("DPO", dpo.get("zoo_breakdown", {})), ("online", online.get("zoo_breakdown", {}))):
        if "functions" in bd:
            fs = ", ".join(f"{k} {v['seconds']:.2f} ({v['calls']} calls)" for k, v in bd["functions"].items())
            lines.append(f"- {title}, zoo, one extra uncounted run with the plugin's functions timed (nested "
                         f"calls overlap): total {bd['seconds']:.2f} s: {fs}")
    bd = online.get("zoo_breakdown", {})
    if "critic_share" in bd:
        est = f"- online: the critic (value forwards, value backward + AdamW) takes {100 * bd['critic_share']:.0f}% " \
              "of zoo ppo's time; without it zoo ppo would run at about " \
              f"{bd['samples_per_second_without_critic_estimate']:.1f} samples/s"
        if "ratio_without_critic_estimate" in bd:
            est += f", {bd['ratio_without_critic_estimate']:.2f}x TRL RLOO (an estimate, not a measurement)"
        lines.append(est)
    lines.append(f"- env vs plain generate + RM + a reference forward (what the env computes besides): "
                 f"{1000 * env['plain_ref']['median_seconds']:.1f} ms, ratio env / that "
                 f"{env['ratio_env_vs_plain_ref']:.2f}")
    for name in ("plain", "plain_ref", "env"):
        ps = ", ".join(f"{k} {1000 * x:.1f} ms" for k, x in env[name]["median_part_seconds"].items())
        lines.append(f"- env rollout, {name}: {1000 * env[name]['median_seconds']:.1f} ms: {ps}")
    lines += ["", "## Work per unit", ""]
    for title, work in (("DPO, per batch of pairs", dpo["work_per_pair"]),
                        ("online, per rollout", online["work_per_rollout"]), ("env, per batch", env["work"])):
        for side, text in work.items():
            lines.append(f"- {title}, {side}: {text}")
    lines += [
        "", "## Notes", "",
        "- Every side runs the same Hugging Face `LlamaForCausalLM` (2 layers, width 64, vocabulary "
        f"{len_vocab(r)}) on one thread, so most of the time is per-operator overhead of small matrices, not "
        "arithmetic: a ratio measures the work each side does per pair or sample and its Python/framework "
        "overhead around the same forwards and backwards.",
        "- DPO: both sides precompute the reference log-probs (the same pairs per no-grad forward) and run one "
        "policy forward + backward of chosen and rejected per step. A cProfile of TRL 1.16's DPO on these pairs "
        "puts its extra time in per-example `datasets.map` tokenisation (three tokenizer calls per pair), the "
        "Python collator of every batch, the fused LM-head kernel's extra outputs (entropy, logit metrics) and "
        "trainer bookkeeping (accelerate wrappers, metric `.item()` calls, a `gc.collect()` when `train()` ends). "
        "The zoo's own costs: its row layout is wider (see Checks: every row is as wide as the batch's longest "
        "prompt plus its longest response), and its `data` phase reads the pairs (`load_pairs` converts the "
        "whole stored dataset, row by row, before keeping the first N) and tokenises them (`encode_pairs`, one "
        "tokenizer call per text); the breakdown above splits it.",
        "- Online: zoo ppo trains a critic as large as the policy (a value forward and backward + AdamW next to "
        "every policy step), which RLOO does not have; TRL spends an extra policy forward per rollout on the "
        "old log-probs, which the zoo takes from sampling. The critic share and the estimate without it are above.",
        "- Env: the env's `step_tensors` runs the reference forward that `plain` does not; against a plain loop "
        "that also takes reference log-probs (`plain_ref`) the env costs what the ratio env / plain_ref says.",
    ]
    if "checks" in dpo:
        c = dpo["checks"]
        lines += ["", "## Checks", "",
                  f"- DPO data: {c['rows_identical']} of {c['rows']} pairs tokenise to identical prompt/chosen/rejected "
                  f"rows on both sides (TRL rows {c['trl_rows']}, zoo pairs {c['zoo_pairs']}, TRL steps "
                  f"{c['trl_steps']}); response cap {s['max_completion_tokens']} tokens with EOS, no truncation.",
                  f"- DPO batch width (tokens per row in a forward, mean over batches): zoo "
                  f"{c['mean_batch_width_tokens']['zoo']:.1f} (prompts left-padded, responses right-padded), TRL "
                  f"{c['mean_batch_width_tokens']['trl']:.1f} (each prompt+response flushed left): the zoo's layout "
                  "processes that many more positions per pair."]
    if "trl" in online:
        lines.append(f"- online: mean response length zoo {online['zoo']['median_mean_response_tokens']:.2f}, TRL "
                     f"{online['trl']['median_mean_response_tokens']:.2f} tokens (medians); suppressed ids (bos, unk, "
                     f"pad) sampled by TRL: {online['trl']['median_suppressed_tokens_sampled']:.0f} (median per run).")
    return "\n".join(lines) + "\n"


def len_vocab(r: dict[str, Any]) -> Any:
    return r["settings"].get("vocab_size", "?")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--quick", action="store_true", help="tiny configuration (seconds; used by the test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every side (default 1)")
    ap.add_argument("--no-trl", action="store_true", help="run the zoo sides only, even if trl is installed")
    ap.add_argument("--pairs", type=int, help=f"DPO: first N pairs (default {DEFAULTS['pairs']})")
    ap.add_argument("--dpo-batch", type=int, help=f"DPO pairs per step (default {DEFAULTS['dpo_batch']})")
    ap.add_argument("--iterations", type=int, help=f"online: rollouts per run (default {DEFAULTS['iterations']})")
    ap.add_argument("--samples", type=int, help=f"online: samples per rollout (default {DEFAULTS['samples']})")
    ap.add_argument("--num-generations", type=int, help="TRL RLOO completions per prompt (default 4)")
    ap.add_argument("--env-batch", type=int, help=f"env: rollout batch (default {DEFAULTS['env_batch']})")
    ap.add_argument("--reps", type=int, help=f"counted repetitions, after one warm-up (default {DEFAULTS['reps']})")
    ap.add_argument("--env-reps", type=int, help=f"env repetitions (default {DEFAULTS['env_reps']})")
    ap.add_argument("--shape", choices=("tiny", "realistic"), default="tiny",
                    help="tiny: the sentiment task's sections and every trainer on a tiny user model; realistic: "
                         "every trainer on a ~42M-parameter Qwen2 with a 32k BPE vocabulary (user-model path)")
    ap.add_argument("--algorithms", type=lambda x: x.split(","), default=None,
                    help=f"user-model comparisons to run (default all: {','.join(USER_ALGORITHMS)})")
    ap.add_argument("--user-reps", type=int, default=None, help="counted repetitions of the user-model comparisons")
    ap.add_argument("--user-only", action="store_true", help="tiny shape: skip the sentiment-task sections")
    ap.add_argument("--no-user", action="store_true", help="skip the user-model comparisons")
    ap.add_argument("--setup-dir", type=Path, default=None,
                    help="build the user-model setup (models, tokenizer, data) here and keep it (default: a temp dir)")
    ap.add_argument("--trl-ppo-python", type=Path, default=None,
                    help="python of a virtual environment with a TRL that has PPOTrainer (trl.experimental.ppo, "
                         "trl <= 1.12): zoo ppo is compared with it, each repetition a fresh process")
    ap.add_argument("--ppo-child", choices=("zoo", "trl"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--merge-into", type=Path, default=None,
                    help="an earlier result JSON: write it with this run's user-model and ppo sections added")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument("--md", type=Path, default=None, help="write the Markdown table here (default: --out with .md)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.ppo_child:
        ppo_child(args)
        return None
    result = run(args)
    if args.merge_into:  # the new sections into an earlier result (its own figures, commit and machine kept)
        base = json.loads(args.merge_into.read_text())
        for key in ("user", "ppo"):
            if key in result:
                base[key] = result[key]
        if "user" in base:
            base["user"]["run_info"]["machine"] = result["machine"]
        result = base
    text = json.dumps(result, indent=2, default=str)
    print(text if args.out is None else f"wrote {args.out}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        md = args.md or args.out.with_suffix(".md")
        md.write_text(markdown(result))
    elif args.md:
        args.md.write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
