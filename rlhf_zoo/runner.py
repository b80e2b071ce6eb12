"""The runner: everything around an algorithm's training code.

It owns seeding, device, task loading, the reference policy, the progress bar, metrics logging,
checkpoints, the final evaluation against the SFT baseline, and the run directory:

    config.json     resolved config, versions, loaded plugins, git commit when known
    metrics.jsonl   one line per iteration
    summary.json    final figures (see `rlhf_zoo.evaluation`) plus wall time, throughput, peak memory
    policy/         the final policy in Hugging Face format (safetensors); ``model/`` for reward models
    checkpoints/    the last few complete checkpoints of the training loop (see below)
    run.lock        the pid and host of the process writing the directory (`rlhf_zoo.rundir`)
    samples/        iter-N.jsonl: every evaluation's responses with their scores and KL (`RunContext.record_samples`)
    tensorboard/, wandb/   the trackers' files, with ``--report-to`` (`rlhf_zoo.tracking`)
    eval/           ``zoo eval RUN_DIR``'s evaluations (`rlhf_zoo.eval_command`; written after the run)
    responses.jsonl best-of-n's answers to every row of a ``--prompts`` file (`plugins/best_of_n.py`)

Checkpoints and resume. An algorithm registers the state its loop carries with ``ctx.track(name, obj)``
(optimizers, schedulers, extra models, its own generators and controllers) before the loop, and loops
over ``ctx.iterations(total)``. When an iteration's body has finished, ``ctx.iterations`` writes a
checkpoint every ``checkpoint_every`` iterations and after the last one: the policy, every tracked object, the run's sampling
generator, the global RNG states, the counters and phase times (`rlhf_zoo.checkpoint`: safetensors + JSON,
atomic). With ``resume=True`` the first call of ``ctx.iterations`` loads the latest complete checkpoint
into all of them and continues with the next iteration, so the resumed run is the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from rlhf_zoo.accel import autocast, synchronize
from rlhf_zoo.checkpoint import (
    global_rng_state,
    latest_checkpoint,
    loadable_checkpoints,
    read_checkpoint,
    restore,
    set_global_rng_state,
    state_of,
    write_checkpoint,
)
from rlhf_zoo.config import AlgoConfig, check_seed
from rlhf_zoo.distributed import SINGLE, Dist, init_from_env
from rlhf_zoo.errors import ConfigError, NonFiniteError
from rlhf_zoo.evaluation import evaluate
from rlhf_zoo.generation import generation_config
from rlhf_zoo.policy import ModelPolicy, RewardModelResult
from rlhf_zoo.registry import Algorithm, Registry, get_registry
from rlhf_zoo.rewards import MissingReward
from rlhf_zoo.rundir import (check_out, drop_set_aside, lock_run_dir, restore_set_aside, set_aside,
                            unlock_run_dir)
from rlhf_zoo.threads import apply_threads, choose_threads
from rlhf_zoo.tracking import TrackerRun, Trackers, selected_loggers

DEFAULT_TASK = "sentiment"
KEEP_CHECKPOINTS = 2
AUTO_CHECKPOINTS = 10  # checkpoints per run when checkpoint_every is None
# config.json keys that must match for --resume to continue a run
RUN_IDENTITY = ("algorithm", "task", "task_seed", "seed", "config", "beta", "max_new_tokens", "setup")
#: keyword arguments of `make_context`'s ``setup`` (a user's own model; `rlhf_zoo.user_setup`)
SETUP_KEYS = ("model", "tokenizer", "ref_model", "reward", "reward_weights", "gold", "prompts", "ptx_dataset",
              "chat_template", "eval_fraction", "dtype", "attn_implementation", "trust_remote_code",
              "gradient_checkpointing", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


#: the figures an ``--eval-every`` point logs (as ``eval/<name>``), where the world has them
CURVE_FIGURES = ("gold_reward", "proxy_reward", "kl_to_ref", "kl_to_optimum", "frontier_efficiency",
                 "frontier_reward_at_kl", "response_length", "eos_rate")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunContext:
    """What an algorithm's ``train(ctx, config)`` receives.

    Attributes:
        task: the world (`rlhf_zoo.world.World`): a built-in task, or a user's own setup (``--model``).
        policy: a trainable copy of the starting (SFT) policy, on ``device`` (with LoRA: the adapted model).
        reference: the frozen reference policy (never updated; with LoRA: the base with adapters disabled).
            An algorithm may replace it by a frozen model of its own before its loop (``dpo --sft-steps``:
            the policy after SFT on the chosen responses); the final evaluation's ``baseline_*`` figures and
            ``kl_to_ref`` use ``ctx.reference`` as it is when ``train`` returns.
        reward_fn: the reward the environment pays (task default: learned RM; gold on ``exact``; a user
            setup: its ``--reward`` terms summed). A world without a reward gives one that raises a
            one-line error when called, so algorithms that use none (sft, dpo) never need one.
        generator: the run's torch RNG for sampling, seeded from ``seed``.
    """

    algorithm: Algorithm
    config: AlgoConfig
    task: Any
    seed: int
    device: torch.device
    out: Path
    registry: Registry
    policy: torch.nn.Module
    _reference: Any  # the frozen module, or a function that loads it on first use (see `reference`)
    reward_fn: Any
    generator: torch.Generator
    checkpoint_every: int | None = None
    keep_checkpoints: int = KEEP_CHECKPOINTS
    resume: bool = False
    show_progress: bool = True
    phase_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dist: Dist = SINGLE  # this process's rank in a data-parallel job (`rlhf_zoo.distributed`)
    task_name: str = DEFAULT_TASK  # as the run was asked for (the registry's name), with the task seed and preset
    task_seed: int = 0
    preset: str | None = None
    iteration: int = 0  # the iteration under way (0 before the loop)
    resumed_from: int | None = None  # the checkpoint's iteration when the run was resumed
    _tracked: dict[str, Any] = field(default_factory=dict)
    _total: int = 0
    _every: int = 0
    _bar: Any = None
    _sample_generator: torch.Generator | None = None
    _replacing: bool = False  # a fresh run whose directory still keeps an earlier run in `rundir.ASIDE`
    setup: dict[str, Any] = field(default_factory=dict)  # a run on the user's own model: its options
    trackers: Trackers = field(default_factory=Trackers)  # the --report-to loggers (`rlhf_zoo.tracking`), rank 0
    _last_logged: int = 0  # the highest iteration of a metrics row so far
    _last_samples: tuple[int, list] | None = None  # the latest samples written: (iteration, rows)

    @property
    def reference(self) -> torch.nn.Module:
        """The reference policy; a run whose algorithm never reads it (reward-model training) never
        loads it (one model fewer in memory)."""
        if not isinstance(self._reference, torch.nn.Module):
            self._reference = self._reference().requires_grad_(False)
        return self._reference

    @reference.setter
    def reference(self, model: torch.nn.Module) -> None:
        self._reference = model

    @property
    def sample_generator(self) -> torch.Generator:
        """The RNG for sampling responses: the run's generator in a single process; in a data-parallel
        job one stream per rank (ranks sample different prompts and must not share noise), while
        ``generator`` stays the same on every rank for the shuffles they must agree on."""
        if not self.dist.active:
            return self.generator
        if self._sample_generator is None:  # (a resumed run restores it from the checkpoint instead)
            stream = self.seed * 1_000_003 + self.dist.rank + 7919 * (self.resumed_from or 0)
            self._sample_generator = torch.Generator(device=self.device).manual_seed(stream)
        return self._sample_generator

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens or self.task.max_new_tokens

    @property
    def beta(self) -> float:
        """The KL coefficient: the config field the algorithm declares as its KL coefficient
        (``AlgoConfig.kl_coefficient``) when it is set, else the world's."""
        beta = self.config.kl_coefficient_value()
        return float(self.task.beta if beta is None else beta)

    def make_env(self, num_envs: int, kind: str = "ResponseGen", split: str = "train", **kwargs: Any) -> Any:
        """A vector environment over this run's task, sharing the run's reference model and reward."""
        import gymnasium

        if isinstance(self.reward_fn, MissingReward) and "reward_fn" not in kwargs:
            self.reward_fn()  # raises the one-line error that names the missing option
        return gymnasium.make_vec(f"rlhf_zoo/{kind}-v0", num_envs=num_envs, task=self.task, split=split,
                                  max_new_tokens=self.max_new_tokens, device=str(self.device), beta=self.beta,
                                  temperature=self.config.temperature, reference_model=self.reference,
                                  reward_fn=self.reward_fn, **kwargs)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (generate, score, reference, train); figures go to summary.json."""
        synchronize(self.device)  # on CUDA, time the phase's kernels, not their launches
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.phase_seconds[name] += time.perf_counter() - start

    def track(self, name: str, obj: Any) -> Any:
        """Register state the training loop carries (optimizer, scheduler, critic, generator, controller,
        or any object with ``state_dict``/``load_state_dict``) so checkpoints save and restore it.
        Call before `iterations`. Returns ``obj``."""
        if self._total:
            raise RuntimeError(f"ctx.track({name!r}) after ctx.iterations() started: track state before the loop")
        if name in self._tracked:
            raise ValueError(f"ctx.track: the name {name!r} is already tracked")
        state_of(obj)  # fails now, not at the first checkpoint, if obj cannot be saved
        self._tracked[name] = obj
        return obj

    def iterations(self, total: int, desc: str | None = None) -> Iterator[int]:
        """Iteration numbers 1..total with a progress bar; pair with `log`. One loop per run. When
        resuming, restores the latest checkpoint first and starts after its iteration."""
        if self._total:
            raise RuntimeError("ctx.iterations() is called once per run")
        self._total = total
        self._every = (self.checkpoint_every if self.checkpoint_every is not None
                       else max(1, math.ceil(total / AUTO_CHECKPOINTS)))
        start = 1
        if self.resume and (ckpt := latest_checkpoint(self.out / "checkpoints")) is not None:
            start = self._restore(ckpt) + 1
        self._bar = tqdm(range(start, total + 1), initial=start - 1, total=total, desc=desc or self.algorithm.name,
                         disable=not self.show_progress, dynamic_ncols=True)
        eval_every = self.config.eval_every
        if eval_every and start == 1:  # the curve's first point: the starting policy
            self.evaluate_now(0)
        for it in self._bar:
            self.iteration = it
            yield it
            # the loop body of iteration ``it`` has finished: its state is complete, evaluate and checkpoint it
            if eval_every and (it % eval_every == 0 or it == total):
                self.evaluate_now(it)
            if self._every and (it % self._every == 0 or it == total):
                self.save_checkpoint(it)

    def evaluate_now(self, iteration: int) -> None:
        """``--eval-every``: evaluate the policy as it is now, on the final evaluation's prompts, samples
        and seed (so every point of the curve is measured the same way, and the last equals the final
        figure), and log the figures as ``eval/<name>`` in a metrics row of their own, and the responses
        to samples/iter-N.jsonl. Uses its own random stream: a run with and without it trains identically."""
        if not self.dist.is_main:
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.phase("eval_every"):
                figures = evaluate(ModelPolicy(self.policy), temperature=self.config.temperature,
                                   with_samples=True, **evaluation_args(self))
        finally:
            self.policy.train(was_training)
        self.counters["evaluations"] += 1
        self.log(iteration, {f"eval/{k}": v for k, v in figures.items()
                             if k in CURVE_FIGURES or (k.startswith("gold_") and isinstance(v, float))})
        self.record_samples(iteration, figures["samples"])

    @property
    def final_iteration(self) -> int:
        """The iteration the final evaluation is filed under: the last of the loop (`iterations`), else the
        last metrics row's (algorithms without a loop that log steps), else 0 (nothing trained: best-of-n)."""
        return self._total or self._last_logged

    def record_samples(self, iteration: int, rows: list[dict[str, Any]]) -> Path | None:
        """One evaluation's per-response rows (`rlhf_zoo.evaluation.sample_rows`; on ``exact``, per prompt:
        `rlhf_zoo.evaluation.exact_rows`) to samples/iter-NNNNNN.jsonl and to the trackers as a table. The
        final evaluation of an iteration that ``--eval-every`` has just evaluated writes the same rows: they
        are written once (different rows, from a policy other than the one trained, replace them)."""
        if not self.dist.is_main:
            return None
        path = self.out / "samples" / f"iter-{iteration:06d}.jsonl"
        if self._last_samples == (iteration, rows) and path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, path)
        self._last_samples = (iteration, rows)
        self.trackers.log_samples(iteration, rows)
        return path

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        """Record one iteration: metrics.jsonl, the progress bar, plugin hooks, periodic checkpoints."""
        row = {"iteration": iteration, **{k: _plain(v) for k, v in metrics.items()}}
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise NonFiniteError(f"metric {k!r} is {v}")
        if not self.dist.is_main:
            return
        self.started()
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._last_logged = max(self._last_logged, iteration)
        self.trackers.log_metrics(iteration, row)
        if self._bar is not None:
            shown = {k: f"{v:.3g}" for k, v in list(row.items())[1:5] if isinstance(v, float)}
            self._bar.set_postfix(shown, refresh=False)
        self.registry.manager.hook.on_iteration_end(run=self, iteration=iteration, metrics=row)

    def started(self) -> None:
        """The run has started for good (its first metrics row, or the end of training): an earlier run
        that this fresh run replaces is deleted now, not before (`rlhf_zoo.rundir.set_aside`)."""
        if self._replacing:
            self._replacing = False
            drop_set_aside(self.out)

    def step_logger(self, every: int = 10) -> StepLogger:
        """An ``on_step(step, loss, tokens)`` callback for the supervised loops of `rlhf_zoo.training`:
        counts trained tokens and logs the mean loss every ``every`` steps. Its window of losses is
        tracked, so a resumed run logs the same means."""
        return self.track("step_logger", StepLogger(self, every))

    def save_checkpoint(self, iteration: int) -> Path:
        """Everything needed to continue after ``iteration`` (see the module docstring), written atomically;
        the last ``keep_checkpoints`` are kept. A policy with a non-finite weight is never saved."""
        bad = next((n for n, p in self.policy.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise NonFiniteError(f"the policy's parameter {bad} is non-finite at the end of the iteration")
        state = {"policy": self.policy.state_dict(),
                 "tracked": {name: state_of(obj) for name, obj in self._tracked.items()},
                 "generator": self.generator.get_state(), "rng": global_rng_state(),
                 "counters": dict(self.counters), "phase_seconds": dict(self.phase_seconds)}
        if self.dist.active:  # what differs between ranks: their sampling streams and token counts
            counts = torch.tensor([self.counters["generated_tokens"], self.counters["trained_tokens"]],
                                  dtype=torch.float64)
            generator_state = self.sample_generator.get_state().to(torch.int64)  # (gloo gathers no uint8)
            state["ranks"] = {"sample_generator": self.dist.gather(generator_state),
                              "token_counts": self.dist.gather(counts)}
        info = {"algorithm": self.algorithm.name, "seed": self.seed, "total": self._total,
                "world_size": self.dist.world_size}
        if not self.dist.is_main:  # every rank holds the same state but its sampling stream: rank 0 writes
            return self.out / "checkpoints" / f"iter-{iteration:06d}"
        return write_checkpoint(self.out / "checkpoints", iteration, state, info, self.keep_checkpoints)

    def _restore(self, path: Path) -> int:
        """Load a checkpoint into the policy, the tracked objects, the RNGs and the counters; drop the
        metrics logged after it. Returns its iteration."""
        state, info = read_checkpoint(path)
        saved, tracked = set(state["tracked"]), set(self._tracked)
        if saved != tracked:
            raise ConfigError(f"checkpoint {path} holds state {sorted(saved)} but {self.algorithm.name} tracks "
                              f"{sorted(tracked)}: it was written by a different version of the algorithm")
        restore(self.policy, state["policy"])
        for name, obj in self._tracked.items():
            restore(obj, state["tracked"][name])
        self.generator.set_state(state["generator"])
        set_global_rng_state(state["rng"])
        self.counters.clear()
        self.counters.update(state["counters"])
        ranks = state.get("ranks")
        if self.dist.active and ranks is not None and len(ranks["token_counts"]) == self.dist.world_size:
            self._sample_generator = torch.Generator(device=self.device)
            self._sample_generator.set_state(ranks["sample_generator"][self.dist.rank].to(torch.uint8))
            generated, trained = ranks["token_counts"][self.dist.rank].tolist()
            self.counters.update({"generated_tokens": int(generated), "trained_tokens": int(trained)})
        self.phase_seconds.clear()
        self.phase_seconds.update(state["phase_seconds"])
        iteration = int(info["iteration"])
        self.dist.barrier()  # every rank has read the checkpoint before rank 0 may write the next one
        if self.dist.is_main:
            metrics = self.out / "metrics.jsonl"
            kept = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= iteration]
            metrics.write_text("".join(ln + "\n" for ln in kept))
        self.resumed_from = iteration
        return iteration


@dataclass
class StepLogger:
    """See `RunContext.step_logger`."""

    ctx: RunContext
    every: int
    window: list[float] = field(default_factory=list)

    def __call__(self, step: int, loss: float, tokens: int) -> None:
        self.ctx.counters["trained_tokens"] += tokens
        self.window.append(loss)
        if step % self.every == 0:
            self.ctx.log(step, {"loss": sum(self.window) / len(self.window)})
            self.window.clear()

    def state_dict(self) -> dict[str, list[float]]:
        return {"window": list(self.window)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.window = [float(v) for v in state["window"]]


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("rlhf-zoo", "torch", "transformers", "gymnasium", "pluggy", "datasets", "typer"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch on the device. CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def make_context(
    algorithm: str,
    *,
    task: str | None = None,
    seed: int = 0,
    out: str | Path = "runs/latest",
    device: str = "auto",
    preset: str | None = None,
    options: dict[str, Any] | None = None,
    task_seed: int = 0,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = KEEP_CHECKPOINTS,
    resume: bool = False,
    progress: bool = True,
    registry: Registry | None = None,
    setup: dict[str, Any] | None = None,
    overwrite: bool | None = None,
    report_to: str | Sequence[str] | None = None,
) -> RunContext:
    """Resolve the config, load the task, seed, and load the policy, reference and reward: everything
    an algorithm's ``train`` receives. `run` calls it; tests and tools can too.

    ``setup``: a user's own model instead of a built-in task (keys `SETUP_KEYS`, as the ``zoo run``
    options: ``model`` is required; see `rlhf_zoo.user_setup`). ``overwrite``: what may be in ``out``
    (`rlhf_zoo.rundir.check_out`; ``zoo run`` passes False unless ``--overwrite``). ``report_to``: the
    loggers (experiment trackers) `run` reports to, by name (`rlhf_zoo.tracking`; metrics.jsonl always).

    Everything is validated (options, seeds, ``out``, the task's cached files) and the run directory
    locked (`rlhf_zoo.rundir.lock_run_dir`) before anything in ``out`` is deleted or written."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars; the runner shows its own progress
    registry = registry or get_registry()
    algo = registry.algorithm(algorithm)
    config = algo.config_cls.from_dict(options or {}, preset=preset)
    check_seed("seed", seed)
    check_seed("task_seed", task_seed)
    loggers = selected_loggers(report_to, registry)  # an unknown or uninstalled tracker: nothing written yet
    setup = {k: v for k, v in (setup or {}).items() if v}  # options left unset (None, False, 0, empty) are absent
    if setup and "model" not in setup:
        raise ConfigError(f"--{next(iter(setup)).replace('_', '-')} applies to a run on your own model: give --model too")
    if setup and task is not None:
        raise ConfigError(f"--task {task!r} and --model {setup['model']!r} are two different worlds: give one")
    task = "user" if setup else (task or DEFAULT_TASK)
    task_spec = None if setup else registry.task(task)
    dev = resolve_device(device)
    dist = init_from_env(dev.type)
    if dist.active:
        if not algo.data_parallel:
            raise ConfigError(f"algorithm {algo.name!r} does not shard its batches over processes; run it "
                              "with one process (data-parallel algorithms: see `zoo list`)")
        if dev.type == "cuda":
            dev = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(dev)
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 (0: never), got {checkpoint_every}")
    if keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
    out = Path(out)
    if dist.is_main:  # (the other ranks of a data-parallel run never write it)
        check_out(out, resume=resume, overwrite=overwrite)
    identity = {"algorithm": algo.name, "task": task, "task_seed": task_seed, "seed": seed,
                "config": config.to_dict(), **({"setup": setup} if setup else {})}
    if setup:  # a user's own model: assembled, not built; nothing is written before it is checked
        the_task, model_options = _user_world(setup, config, registry, dev, task_seed)
    took_lock = dist.is_main and lock_run_dir(out)  # only rank 0 writes the run directory, once it holds it
    try:
        if dist.is_main:
            resume = resume and _check_resumable(out, identity)
            if not setup:  # builds the task if it is not cached; damaged cached files stop the run here
                the_task = task_spec.load(seed=task_seed, progress=progress)
            if not resume:  # a fresh run: nothing of an earlier run in this directory may be resumed into it;
                set_aside(out)  # it is set aside, and deleted once this run has started for good
        dist.barrier()
        if not dist.is_main:
            resume = resume and latest_checkpoint(out / "checkpoints") is not None
            if not setup:
                the_task = task_spec.load(seed=task_seed, progress=False)
        seed_everything(seed)
        policy = the_task.load_policy(dev)
        reference = None
        if setup:
            from rlhf_zoo.adapters import prepare_policy

            policy, reference = prepare_policy(policy, setup, model_options)
        if reference is None and algo.kind == "reward_model":  # (loaded only if something asks for it)
            reference = functools.partial(the_task.load_reference, dev)
        elif reference is None:
            reference = the_task.load_reference(dev)
        if isinstance(reference, torch.nn.Module):
            reference.requires_grad_(False)
        reward_fn = the_task.reward_function(device=dev) if the_task.has_reward else MissingReward(task)
        generator = torch.Generator(device=dev).manual_seed(seed)
        ctx = RunContext(algo, config, the_task, seed, dev, out, registry, policy, reference, reward_fn, generator,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume,
                         show_progress=progress and dist.is_main, dist=dist, task_name=task, task_seed=task_seed,
                         preset=preset, setup=setup)
    except BaseException as e:  # (the lock goes with a failed start; `zoo run` then exits anyway)
        if took_lock:
            if not resume:
                restore_set_aside(out)
                e.zoo_restored = True  # --out holds what it held before (`zoo run`'s Ctrl-C line)
            unlock_run_dir(out)
        raise
    ctx._replacing = dist.is_main and not resume
    ctx.trackers = Trackers(loggers, registry)
    if took_lock:  # a context dropped without `run` (tests, tools) lets go of its directory with it
        weakref.finalize(ctx, _release, out)
    return ctx


def _release(out: Path) -> None:
    """A context made without `run` is dropped: what it replaced goes, and so does its lock."""
    drop_set_aside(out)
    unlock_run_dir(out)


def _user_world(setup: dict[str, Any], config: AlgoConfig, registry: Registry, device: torch.device,
                task_seed: int) -> tuple[Any, Any]:
    """The `UserSetup` world of a run on the user's own model, and its model options."""
    from rlhf_zoo.sources import ModelOptions
    from rlhf_zoo.user_setup import EVAL_FRACTION, UserSetup

    model_options = ModelOptions(dtype=setup.get("dtype", "auto"),
                                 attn_implementation=setup.get("attn_implementation", "sdpa"),
                                 trust_remote_code=bool(setup.get("trust_remote_code", False)))
    world = UserSetup(
        model=str(setup["model"]), tokenizer_source=setup.get("tokenizer"), ref_model=setup.get("ref_model"),
        rewards=tuple(setup.get("reward", ())), reward_weights=tuple(setup.get("reward_weights", ())),
        gold_spec=setup.get("gold"), prompts_source=setup.get("prompts"),
        dataset_source=getattr(config, "dataset", None) or None, ptx_dataset=setup.get("ptx_dataset"),
        chat_template=setup.get("chat_template"), eval_fraction=setup.get("eval_fraction", EVAL_FRACTION),
        model_options=model_options, max_new_tokens=config.max_new_tokens, seed=task_seed, registry=registry,
        device=device)
    world.tokenizer  # noqa: B018 (a tokenizer that cannot be loaded fails before anything else)
    return world, model_options


def win_rate(scores: Any, baseline_scores: Any) -> float:
    """Share of paired samples where the policy's score beats the reference's (ties count one half)."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(baseline_scores, dtype=np.float64)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def save_model(model: Any, tokenizer: Any, path: Path, adapter_dir: Path | None = None,
               generation: GenerationConfig | None = None) -> None:
    """A model directory that the Auto classes load: weights (safetensors), config, generation config
    and the tokenizer (chat template included). A LoRA model is saved merged; its adapter goes to
    ``adapter_dir``. ``generation``: a policy's generation config (`rlhf_zoo.generation.generation_config`,
    how the zoo sampled it), which replaces the model's own."""
    from rlhf_zoo.adapters import merged_for_saving

    model = merged_for_saving(model, adapter_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None and generation is not None:
        model.generation_config = generation
    elif gen is not None:  # generation stops at the EOS the responses were trained to end with
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _check_resumable(out: Path, identity: dict[str, Any]) -> bool:
    """--resume: True if ``out`` holds a run with this identity to continue, False if it holds none;
    ConfigError if it holds a different run, or checkpoints of which none loads. A damaged newer
    checkpoint is named in a warning and passed over (`rlhf_zoo.checkpoint.latest_checkpoint`)."""
    saved_path = out / "config.json"
    good, damaged = loadable_checkpoints(out / "checkpoints")
    if not saved_path.is_file() or not (good or damaged):
        print(f"zoo: no complete checkpoint in {out}; starting from the beginning", file=sys.stderr)
        return False
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        raise ConfigError(f"--resume: {saved_path} is not valid JSON; drop --resume to start over") from None
    for key, value in identity.items():
        if key in saved and saved[key] != json.loads(json.dumps(value)):
            raise ConfigError(f"--resume: {out} holds a run with a different {key} ({saved[key]!r}, now "
                              f"{value!r}); use another --out, or drop --resume to start over")
    if not good:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'} can be loaded ({reasons}); "
                          "drop --resume to start over")
    for path, why in damaged:
        if path.name > good[-1].name:
            print(f"zoo: warning: checkpoint {path} cannot be loaded ({why}); resuming from the one before it, "
                  f"{good[-1]}", file=sys.stderr)
    return True


def run(algorithm: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``algorithm`` and write the run directory. Returns summary.json's content.

    Keyword arguments are those of `make_context` (task, seed, out, device, preset, options, task_seed,
    checkpoint_every, keep_checkpoints, resume, progress, registry, setup, overwrite, report_to), with the
    same defaults, and ``threads``: torch's thread count for the process, N or ``"auto"``
    (`rlhf_zoo.threads`; ``zoo run`` passes ``--threads``, default auto), or None (the default here: the
    calling process's setting is left alone). config.json records the count and why. The run directory
    is locked while the run lives (`rlhf_zoo.rundir`)."""
    made: list[RunContext] = []
    try:
        return _run(algorithm, made, **kwargs)
    finally:
        for ctx in made:  # the --report-to loggers: closed already when the run finished, as failed otherwise
            ctx.trackers.close(failed=True)
        unlock_run_dir(Path(kwargs.get("out", "runs/latest")))


def _run(algorithm: str, made: list[RunContext], threads: int | str | None = None, **kwargs: Any) -> dict[str, Any]:
    wall_start = time.perf_counter()
    # 0) torch threads, before any model work (a task build fixes its own count: BUILD_THREADS)
    own_model = any((kwargs.get("setup") or {}).values())
    chosen = apply_threads(choose_threads(threads, task=kwargs.get("task") or DEFAULT_TASK, own_model=own_model))
    dev = resolve_device(kwargs.get("device", "auto"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # 1) task, models, seeding
    ctx = make_context(algorithm, **kwargs)
    made.append(ctx)
    task, seed, task_seed, preset = ctx.task_name, ctx.seed, ctx.task_seed, ctx.preset
    algo, config, registry, the_task, out = ctx.algorithm, ctx.config, ctx.registry, ctx.task, ctx.out
    plugins = [{"name": p.name, "distribution": p.distribution, "version": p.version} for p in registry.plugins]
    provided = registry.provided_by[("algorithm", algo.name)]
    resolved = {"algorithm": algo.name, "task": task, "task_seed": task_seed, "seed": seed, "device": str(ctx.device),
                "preset": preset or "default", "config": config.to_dict(), "beta": ctx.beta,
                "max_new_tokens": ctx.max_new_tokens, "world": the_task.describe(),
                **({"setup": ctx.setup} if ctx.setup else {}),
                "algorithm_plugin": provided.name,
                "algorithm_distribution": provided.distribution, "plugins": plugins,
                "plugin_load_errors": [{"plugin": e.plugin, "error": e.error} for e in registry.load_errors],
                "versions": versions(), "git_commit": _git_commit(), "world_size": ctx.dist.world_size, "argv": sys.argv,
                "checkpoint_every": ctx.checkpoint_every, "keep_checkpoints": ctx.keep_checkpoints,
                "resumed_from": latest_checkpoint(out / "checkpoints").name if ctx.resume else None,
                "report_to": list(ctx.trackers.names),
                "torch_threads": chosen.threads, "torch_threads_reason": chosen.reason}
    train_start = time.perf_counter()
    try:
        if ctx.dist.is_main:  # rank 0 writes the run directory, reports to the trackers and calls the plugins' hooks
            (out / "config.json").write_text(json.dumps(resolved, indent=2))
            resumed = resolved["resumed_from"]
            ctx.trackers.start(TrackerRun(out, out.resolve().name, resolved, quiet=not ctx.show_progress,
                                          resumed_from=int(resumed.split("-")[-1]) if resumed else None))
            registry.manager.hook.on_run_start(run=ctx)
        # 2) the algorithm
        train_start = time.perf_counter()
        with autocast(ctx.device):  # bf16 forwards on CUDA (fp32 weights, log-probs and losses); CPU: fp32
            result = algo.train(ctx, config)
    except BaseException as e:
        ctx.trackers.close(failed=True)  # (before the directory's files may be put back as they were)
        if ctx._replacing:  # stopped before its first iteration (a bad --dataset, Ctrl-C): nothing is lost
            ctx._replacing = False
            restore_set_aside(out)
            e.zoo_restored = True  # --out holds what it held before (`zoo run`'s Ctrl-C line)
        if not isinstance(e, NonFiniteError):
            raise
        last = latest_checkpoint(out / "checkpoints")
        kept = f"the last good checkpoint is {last} (continue with --resume)" if last else "no checkpoint was written"
        raise NonFiniteError(f"{algo.name} iteration {ctx.iteration}: {e}; run stopped, {kept}") from None
    ctx.started()
    train_seconds = time.perf_counter() - train_start
    if config.eval_every and not ctx._total and ctx.dist.is_main:
        print(f"zoo: --eval-every {config.eval_every}: {algo.name} has no training iterations; only the final "
              "evaluation ran", file=sys.stderr)
    trained = result.model if isinstance(result, RewardModelResult) else ctx.policy  # (before a LoRA merge)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    for key in ("generated_tokens", "trained_tokens"):  # counters are per rank: the run's are their sum
        count = torch.tensor(float(ctx.counters[key]), dtype=torch.float64, device=ctx.device)
        ctx.counters[key] = int(ctx.dist.sum(count).item())
    if not ctx.dist.is_main:  # every rank holds the same final policy: rank 0 evaluates and saves it
        ctx.dist.barrier()
        return {"algorithm": algo.name, "task": task, "seed": seed, "rank": ctx.dist.rank}

    # 3) evaluation against the SFT baseline on the same prompts and seed
    summary: dict[str, Any] = {"algorithm": algo.name, "task": task, "seed": seed}
    if isinstance(result, RewardModelResult):
        save_model(result.model, the_task.tokenizer_for_saving(), out / "model")
        summary.update(result.metrics)
    else:
        summary.update(final_evaluation(ctx, result))
        save_model(result.model, the_task.tokenizer_for_saving(), out / "policy", adapter_dir=out / "adapter",
                   generation=generation_config(the_task, config.temperature, ctx.max_new_tokens))
    wall = time.perf_counter() - wall_start
    tokens = ctx.counters["generated_tokens"] + ctx.counters["trained_tokens"] + summary.pop("generated_tokens", 0)
    summary.update({
        "wall_seconds": round(wall, 3), "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(tokens / wall, 1), "peak_memory_mb": round(peak_memory_mb(dev), 1),
        "generated_tokens": ctx.counters["generated_tokens"], "trained_tokens": ctx.counters["trained_tokens"],
        "trainable_parameters": trainable,
        "phase_seconds": {k: round(v, 3) for k, v in ctx.phase_seconds.items()},
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.trackers.finish(summary)
    registry.manager.hook.on_run_end(run=ctx, summary=summary)
    ctx.dist.barrier()
    return summary


def evaluation_args(ctx: RunContext) -> dict[str, Any]:
    """`evaluate`'s arguments but the policy and temperature: the same for the final evaluation, its
    baseline and every ``--eval-every`` point. ctx.reference as it is now: the world's, or one the
    algorithm put in its place (dpo --sft-steps)."""
    cfg, task = ctx.config, ctx.task
    reward_fn = None if isinstance(ctx.reward_fn, MissingReward) else ctx.reward_fn
    return dict(task=task, reference=ctx.reference, reward_fn=reward_fn, prompts=task.prompts("eval")[: cfg.eval_prompts],
                samples_per_prompt=cfg.eval_samples, max_new_tokens=ctx.max_new_tokens,
                seed=ctx.seed + 10_000, beta=ctx.beta, missing_eos_penalty=task.missing_eos_penalty,
                device=ctx.device)


def final_evaluation(ctx: RunContext, policy: Any) -> dict[str, Any]:
    """The evaluation a run ends with: summary.json's figures for ``policy`` (an algorithm's result) against
    ``ctx.reference`` on the same prompts and seed (`_evaluate_against_baseline`), timed as the run's
    ``evaluate`` phase. ``zoo eval`` (`rlhf_zoo.eval_command`) calls it on a saved policy, so a finished run
    evaluated again gives its summary.json figures. The policy's model answers in eval mode (no dropout)."""
    model = getattr(policy, "model", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    with ctx.phase("evaluate"), autocast(ctx.device):
        return _evaluate_against_baseline(ctx, policy)


def _evaluate_against_baseline(ctx: RunContext, policy: Any) -> dict[str, Any]:
    cfg, task = ctx.config, ctx.task
    common = evaluation_args(ctx)
    prompts = common["prompts"]
    final = evaluate(policy, temperature=cfg.temperature, with_samples=True, **common)
    ctx.record_samples(ctx.final_iteration, final.pop("samples"))
    baseline = evaluate(ModelPolicy(ctx.reference), temperature=1.0, **common)
    out = dict(final)
    out.pop("examples", None)
    scores, baseline_scores = out.pop("scores", None), baseline.pop("scores", None)
    for key in ("gold_reward", "proxy_reward", "kl_to_ref", "kl_to_optimum", "frontier_efficiency",
                "response_length", "reward_terms", *[f"gold_{o}" for o in task.objectives[1:]]):
        if key in baseline:
            out[f"baseline_{key}"] = baseline[key]
    if scores is not None and baseline_scores is not None:  # the same prompts, sample for sample
        out["win_rate_vs_reference"] = win_rate(scores, baseline_scores)
    out["generated_tokens"] = final["generated_tokens"] + baseline["generated_tokens"]
    out["eval_prompts"] = len(prompts)
    if getattr(task, "prompts_report", None):  # a user's --prompts file: rows read, dropped, truncated
        out["prompts_file"] = task.prompts_report
    out["examples"] = final.get("examples", [])
    out.update(policy.extra_metrics())
    return out
