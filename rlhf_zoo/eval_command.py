"""``zoo eval POLICY``: score a saved policy on a world without training it.

POLICY is one of
  a run directory   (``zoo run --out``: config.json and policy/): the world (task or own-model setup), the
                    task seed, the run seed and the algorithm's evaluation fields (eval_prompts, eval_samples,
                    temperature, max_new_tokens, its KL coefficient beta) default to the run's config.json;
  a policy directory (a run's ``policy/``): inside its run directory, the same as the run directory; alone,
                    it is scored on ``--task`` (default: sentiment), whose tokenizer it must share;
  any Hugging Face causal LM (a directory or Hub id) with the own-model options of ``zoo run`` (``--reward``,
                    ``--prompts``, ``--gold``, ``--ref-model``, ...; ``--model`` defaults to POLICY itself,
                    so without ``--ref-model`` the policy is its own reference).

The figures are those of a run's summary.json, computed by the very function a run ends with
(`rlhf_zoo.runner.final_evaluation`): gold and proxy reward, KL to the reference, the win rate against
the reference, response lengths and EOS rate, the reference's own figures (``baseline_*``), and on ``exact``
the exact ``kl_to_optimum`` and ``frontier_efficiency``. With the run's defaults (same seed, same prompts,
same evaluation) a finished run evaluated again gives its summary.json figures. An inference-time
algorithm's run (best-of-n: its policy/ is the unchanged SFT policy) is rebuilt from its config, so its
evaluation is the algorithm's and not the saved SFT policy's.

Not reproduced: a reference that the algorithm replaced during training (``dpo --sft-steps``: that SFT'd
reference is not saved, so ``kl_to_ref`` and the ``baseline_*`` figures are against the world's reference);
a LoRA run's policy/ holds the merged weights, which the run's evaluation (adapter unmerged) matches up to
rounding; and a run on CUDA evaluated on CPU (or the reverse) differs by floating-point rounding.

Written (``--out DIR``; default ``RUN_DIR/eval/<world>-s<seed>/`` for a run, else
``evals/<name>-<world>-s<seed>/`` in the current directory): ``eval.json`` (the figures, the evaluation's
settings and where the policy came from) and ``samples.jsonl`` (the evaluation's samples, one a line).
A reward model (a ``reward-model`` run or a sequence-classification directory) is refused with one line
that gives its held-out accuracy from the run's summary.json: it is not a policy to sample from.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rlhf_zoo.config import AlgoConfig, check_seed, option
from rlhf_zoo.errors import ConfigError, UnknownNameError

#: `zoo run` own-model options that shape a world to evaluate in (the training-only ones are left out)
EVAL_SETUP_KEYS = ("model", "tokenizer", "ref_model", "reward", "reward_weights", "gold", "prompts",
                   "chat_template", "eval_fraction", "dtype", "attn_implementation", "trust_remote_code")
#: the evaluation's fields of an algorithm's config that ``zoo eval`` options override
EVAL_FIELDS = ("eval_prompts", "eval_samples", "temperature", "max_new_tokens")
#: where the accuracy of a reward-model run is in its summary.json
ACCURACY_KEYS = ("heldout_gold_accuracy", "heldout_label_accuracy")


@dataclass(frozen=True)
class EvalConfig(AlgoConfig):
    """The evaluation fields, for a policy evaluated outside its algorithm (a policy directory, a model, a run
    whose algorithm is no longer installed), with the KL coefficient (a run's ``beta``; None: the world's)."""

    kl_coefficient: ClassVar[str | None] = "beta"

    beta: float | None = option(None, "KL coefficient of the world's optimum pi*_beta (None: the world's).")


@dataclass
class Target:
    """What POLICY names: the model directory (or Hub id) to load and, when it comes from a run, the run."""

    given: str
    policy: str
    run_dir: Path | None = None
    run: dict[str, Any] | None = None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_config(folder: Path) -> dict[str, Any] | None:
    """A ``zoo run`` config.json in ``folder`` (it names the algorithm), else None."""
    data = _json(folder / "config.json")
    return data if data is not None and "algorithm" in data else None


def _reward_model_error(given: str, run_dir: Path | None) -> ConfigError:
    accuracy = ""
    if run_dir is not None:
        summary = _json(run_dir / "summary.json") or {}
        shown = [f"{k} {summary[k]:.4g}" for k in ACCURACY_KEYS if isinstance(summary.get(k), (int, float))]
        if shown:
            accuracy = f" (its {', '.join(shown)}, from {run_dir / 'summary.json'})"
    use = f"{run_dir / 'model'}" if run_dir is not None else given
    return ConfigError(f"{given} is a reward model, not a policy{accuracy}: zoo eval scores policies; use it as a "
                       f"reward instead (zoo eval POLICY --reward {use} ...)")


def find_target(given: str, own_model: bool) -> Target:
    """Resolve POLICY (see the module docstring); a `ConfigError` naming the path when it is none of them."""
    from rlhf_zoo.sources import _looks_like_hub_id

    path = Path(given).expanduser()
    if not path.exists():
        if own_model and _looks_like_hub_id(given):  # a Hub id: the loader says whether it is cached
            return Target(given, given)
        raise ConfigError(f"{given}: no such directory")
    if not path.is_dir():
        raise ConfigError(f"{given}: a file, not a run directory or a model directory")
    run = _run_config(path)
    if run is not None:
        if (path / "policy" / "config.json").is_file():
            return Target(given, str(path / "policy"), path, run)
        if (path / "model").is_dir() or run.get("algorithm") == "reward-model":
            raise _reward_model_error(given, path)
        from rlhf_zoo.rundir import describe_run

        raise ConfigError(f"{given}: the run directory has no policy/ (it holds {describe_run(path)}); the run has "
                          "not finished: resume it with zoo run ... --resume, or evaluate a finished run")
    model_config = _json(path / "config.json")
    if model_config is None or not ("model_type" in model_config or "architectures" in model_config):
        raise ConfigError(f"{given}: not a run directory (no zoo run config.json) nor a model directory (no "
                          "Hugging Face config.json)")
    if any(str(a).endswith("ForSequenceClassification") for a in model_config.get("architectures") or ()):
        parent = _run_config(path.parent)
        raise _reward_model_error(given, path.parent if parent is not None else None)
    parent = path.parent if path.name == "policy" else None
    run = _run_config(parent) if parent is not None else None
    return Target(given, str(path), parent if run is not None else None, run)


def _no_training(ctx: Any, config: Any) -> None:
    raise RuntimeError("zoo eval trains nothing")


def _default_out(target: Target, world: str, task_seed: int, seed: int) -> Path:
    name = f"{world}" + (f"-t{task_seed}" if task_seed else "") + f"-s{seed}"
    if target.run_dir is not None:
        return target.run_dir / "eval" / name
    parts = [p for p in Path(target.given.rstrip("/")).parts if p not in ("/", ".", "..")] or ["model"]
    label = "-".join(parts[-2:]) if parts[-1] == "policy" else parts[-1]
    return Path("evals") / f"{label}-{name}"


def evaluate_saved(
    policy: str,
    *,
    task: str | None = None,
    task_seed: int | None = None,
    seed: int | None = None,
    eval_prompts: int | None = None,
    eval_samples: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    setup: dict[str, Any] | None = None,
    progress: bool = True,
    threads: int | str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate POLICY (see the module docstring); writes ``out``/eval.json and samples.jsonl. Options left
    None take the run's values (a run directory) or the defaults of a fresh run. ``threads``: torch's
    thread count, N or ``"auto"`` (`rlhf_zoo.threads`; ``zoo eval --threads``), None: left as it is.
    Returns (eval.json's content, the output directory)."""
    import torch

    from rlhf_zoo.registry import Algorithm, get_registry
    from rlhf_zoo.rewards import MissingReward
    from rlhf_zoo.runner import (DEFAULT_TASK, RunContext, _user_world, final_evaluation, resolve_device,
                                 seed_everything, versions)
    from rlhf_zoo.threads import apply_threads, choose_threads

    start = time.perf_counter()
    given_setup = {k: v for k, v in (setup or {}).items() if v}
    unknown = sorted(set(given_setup) - set(EVAL_SETUP_KEYS))
    if unknown:
        raise ConfigError(f"zoo eval takes no --{unknown[0].replace('_', '-')}: it trains nothing")
    if given_setup and task is not None:
        raise ConfigError(f"--task {task!r} and the own-model options (--{next(iter(given_setup)).replace('_', '-')}) "
                          "are two different worlds: give one")
    target = find_target(policy, own_model=bool(given_setup))
    run = target.run or {}
    registry = get_registry()

    # the world: --task, else the own-model options, else the run's world, else the default task
    if task is not None:
        world_setup: dict[str, Any] = {}
    elif given_setup:
        base = dict(run.get("setup") or {}) if run.get("setup") else {}
        world_setup = {k: v for k, v in {**base, **given_setup}.items() if k in EVAL_SETUP_KEYS}
        world_setup.setdefault("model", target.policy)
    else:
        world_setup = {k: v for k, v in (run.get("setup") or {}).items() if k in EVAL_SETUP_KEYS}
    task_name = "user" if world_setup else (task or (run.get("task") if not run.get("setup") else None) or DEFAULT_TASK)
    if task is not None:  # the run's world again only if it is the task the run was on
        same_world = bool(run) and not run.get("setup") and task == run.get("task")
    else:
        same_world = bool(run) and (not given_setup or bool(run.get("setup")))
    task_seed = task_seed if task_seed is not None else int(run.get("task_seed", 0)) if same_world else 0
    seed = seed if seed is not None else int(run.get("seed", 0)) if run else 0
    check_seed("seed", seed)
    check_seed("task_seed", task_seed)

    # the algorithm and its config: the run's (its evaluation fields overridden), else plain defaults
    overrides = {k: v for k, v in {"eval_prompts": eval_prompts, "eval_samples": eval_samples,
                                   "temperature": temperature, "max_new_tokens": max_new_tokens}.items()
                 if v is not None}
    algo, beta = None, None
    if run:
        try:
            algo = registry.algorithm(run["algorithm"])
        except UnknownNameError:  # its plugin is gone: the saved policy, with the run's evaluation fields and beta
            beta = run.get("beta") if same_world else None
    if algo is not None:
        config = algo.config_cls.from_dict(run.get("config") or {})
        try:
            config = dataclasses.replace(config, **overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(" ".join(str(e).split())) from None
    else:
        fields = {k: v for k, v in (run.get("config") or {}).items() if k in EVAL_FIELDS}
        config = EvalConfig.from_dict({**fields, **overrides, "beta": beta})
    rebuild = algo is not None and algo.kind == "inference"  # e.g. best-of-n: the policy is the method itself
    out_dir = Path(out) if out is not None else _default_out(target, task_name, task_seed, seed)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is a file, not a directory; give a directory path")

    dev = resolve_device(device)
    chosen = apply_threads(choose_threads(threads, task=task_name, own_model=bool(world_setup)))
    if world_setup:
        world, _ = _user_world(world_setup, config, registry, dev, task_seed)
        model_options = world.model_options
    else:
        from rlhf_zoo.sources import ModelOptions

        world = registry.task(task_name).load(seed=task_seed, progress=progress)
        model_options = ModelOptions(attn_implementation="eager")  # as the tasks' own policies load
    seed_everything(seed)
    model = _load_policy(target, world, dev, model_options, task_name if not world_setup else None)
    reference = world.load_reference(dev)
    reference.requires_grad_(False)
    reward_fn = world.reward_function(device=dev) if world.has_reward else MissingReward(task_name)
    generator = torch.Generator(device=dev).manual_seed(seed)

    class EvalContext(RunContext):
        """A run's context without the run: nothing locked, no run options (so an inference algorithm's
        ``train`` sees no ``--prompts`` to serve), no trackers; the evaluation's samples are kept for
        samples.jsonl instead of going to a run's samples/iter-N.jsonl."""

        samples: list[dict[str, Any]] | None = None

        def record_samples(self, iteration: int, rows: list[dict[str, Any]]) -> None:
            self.samples = rows

    placeholder = Algorithm("eval", EvalConfig, _no_training, "zoo eval", kind="inference")
    ctx = EvalContext(algo or placeholder, config, world, seed, dev, out_dir, registry, model, reference, reward_fn,
                      generator, show_progress=False, task_name=task_name, task_seed=task_seed)
    if rebuild:
        answer = algo.train(ctx, config)
    else:
        from rlhf_zoo.policy import ModelPolicy

        answer = ModelPolicy(model)
    figures = final_evaluation(ctx, answer)
    samples = figures.pop("samples", None) or ctx.samples or []
    figures.pop("generated_tokens", None)
    result: dict[str, Any] = {
        "policy": target.given, "policy_dir": target.policy,
        "run": str(target.run_dir) if target.run_dir is not None else None,
        "algorithm": run.get("algorithm"), "task": task_name, "task_seed": task_seed, "seed": seed,
        "device": str(dev),
        "evaluation": {"eval_prompts": config.eval_prompts, "eval_samples": config.eval_samples,
                       "temperature": config.temperature, "max_new_tokens": ctx.max_new_tokens, "beta": ctx.beta},
        **({"setup": world_setup} if world_setup else {}),
        **figures,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "torch_threads": chosen.threads, "torch_threads_reason": chosen.reason,
        "versions": versions(),
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
        (out_dir / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot be written ({e.strerror or e}); give a directory you can "
                          "write to") from None
    return result, out_dir


def _load_policy(target: Target, world: Any, device: Any, options: Any, task: str | None) -> Any:
    """POLICY's causal LM (fp32, as a trained policy is held), after checking it reads the world's tokens:
    its own tokenizer (when it has one) must be the world's, and its embedding must cover that vocabulary."""
    from rlhf_zoo.rewards import same_vocabulary
    from rlhf_zoo.sources import is_local, load_causal_lm, load_tokenizer

    where = f"task {task!r}" if task else f"the world's tokenizer ({world.tokenizer_origin()})"
    hint = ("score it on the task it was trained on (--task), or on your own setup (--reward, --prompts, ...)"
            if task else "give the --tokenizer it was trained with")
    has_tokenizer = is_local(target.policy) and any(
        (Path(target.policy) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if has_tokenizer and target.policy != str(getattr(world, "model", None)):
        own = load_tokenizer(target.policy, "policy", options.trust_remote_code)
        if not same_vocabulary(own, world.tokenizer):
            raise ConfigError(f"{target.given}: the policy's vocabulary ({len(own)} tokens) does not match {where} "
                              f"({len(world.tokenizer)} tokens); {hint}")
    model = load_causal_lm(target.policy, "policy", device, options=options, trainable=True)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(world.tokenizer):
        raise ConfigError(f"{target.given}: the policy's embedding has {rows} rows, fewer than the "
                          f"{len(world.tokenizer)} tokens of {where}; {hint}")
    return model
