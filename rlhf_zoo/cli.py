"""The ``zoo`` command line (Typer). Thin: ``zoo run ALGO`` options are generated from the algorithm's
config dataclass, so every algorithm, third-party ones included, gets ``--help`` and typed options.

User errors print one line (``zoo: error: ...``) and exit non-zero; bugs keep their traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import typer

from rlhf_zoo.config import MAX_SEED, read_json_object
from rlhf_zoo.errors import ConfigError, UnknownNameError, ZooError

app = typer.Typer(help="rlhf_zoo: classic RLHF algorithms, comparable, on offline tasks with a gold reward.",
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # plain click help, as `zoo run ALGO --help`; rich costs 0.1-0.2 s at start-up

RUN_OPTIONS = ("task", "seed", "out", "preset", "device", "task_seed", "checkpoint_every", "keep_checkpoints",
               "resume", "overwrite", "nproc", "config", "quiet", "report_to", "threads")
SEED_HELP = f"0 to {MAX_SEED} (2**32 - 1)"
THREADS_HELP = ("torch threads of the process (of each, with --nproc): N, or auto: 1 on the built-in tasks (tiny "
                "models) or on a busy machine (load average > cores - 1), else the usable cores // processes; an "
                "OMP_NUM_THREADS in the environment is kept, N overrides it. Several runs sharing the cores: "
                "give each 1 (README, Threads).")
#: run options of a run on the user's own model (`rlhf_zoo.runner.SETUP_KEYS`)
SETUP_OPTIONS = ("model", "tokenizer", "ref_model", "reward", "reward_weights", "gold", "prompts", "ptx_dataset",
                 "chat_template", "eval_fraction", "dtype", "attn_implementation", "trust_remote_code",
                 "gradient_checkpointing", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C (128 + SIGINT)
_ARGV: list[str] = []  # the command line as given, for relaunching under torch's elastic launcher


def _quiet_hf() -> None:
    """Before a command that loads models: no per-file "Loading weights" bars (ours show progress).
    Here, not at start-up: transformers is imported only by the commands that need it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _registry():
    """The plugins, loaded (torch and all): for commands that run something."""
    from rlhf_zoo.registry import get_registry

    _quiet_hf()
    return get_registry()


def _catalog():
    """What the plugins registered, without loading them where an up-to-date index exists
    (`rlhf_zoo.catalog`): for ``zoo list`` and the options of ``zoo run ALGO``."""
    from rlhf_zoo.catalog import get_catalog

    return get_catalog()


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List algorithms, tasks, reward functions and loggers (--report-to), with the plugin that provides each."""
    reg = _catalog()

    def rows(kind: str, table: dict[str, Any]) -> list[dict[str, str]]:
        out = []
        for name, item in sorted(table.items()):
            p = reg.provided_by[(kind, name)]
            out.append({"name": name, "description": item.description, "plugin": p.name,
                        "distribution": p.distribution, "version": p.version,
                        **({"kind": item.kind, "data_parallel": item.data_parallel} if kind == "algorithm" else {})})
        return out

    data = {"algorithms": rows("algorithm", reg.algorithms), "tasks": rows("task", reg.tasks),
            "reward_functions": rows("reward function", reg.reward_functions),
            "loggers": rows("logger", reg.loggers),
            "plugins": [dataclasses.asdict(p) for p in reg.plugins],
            "load_errors": [{"plugin": e.plugin, "distribution": e.distribution, "error": e.error}
                            for e in reg.load_errors]}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for title, key in (("Algorithms", "algorithms"), ("Tasks", "tasks"), ("Reward functions", "reward_functions"),
                       ("Loggers (zoo run --report-to)", "loggers")):
        if data[key] or key not in ("reward_functions", "loggers"):
            typer.echo(f"{title}:")
            for r in data[key]:
                dp = "  (--nproc)" if r.get("data_parallel") else ""
                typer.echo(f"  {r['name']:<20} {r['description']}{dp}  [{r['distribution']} {r['version']}]")
    for e in data["load_errors"]:
        typer.echo(f"warning: plugin {e['plugin']!r} ({e['distribution']}) failed to load: {e['error']}", err=True)


@app.command("prepare")
def prepare_cmd(
    task: str = typer.Argument("sentiment", help="Task to build."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help=f"Task seed (which world), {SEED_HELP}."),
    rebuild: bool = typer.Option(False, help="Rebuild even if cached (also the way out of a damaged cache)."),
) -> None:
    """Build a task's tokenizer, models and data (cached; $RLHF_ZOO_CACHE moves the cache)."""
    t = _registry().task(task).load(seed=seed, progress=True, rebuild=rebuild)
    m = t.manifest
    typer.echo(f"task {task!r} (seed {seed}) ready at {t.path}")
    typer.echo(f"  build time: {m.get('total_seconds', '?')} s  {m.get('timings_s', {})}")
    for name, rm in m.get("reward_models", {}).items():
        typer.echo(f"  reward model {name!r} ({rm['objective']}): held-out accuracy vs gold preference "
                   f"{rm['heldout_gold_accuracy']:.3f}")


@app.command("bench")
def bench_cmd(
    out: Path = typer.Option(..., help="Benchmark directory (runs/, results.json, report.md, plots/)."),
    suite: str = typer.Option(None, help="Suite name in benchmarks/suites (quick, full) or a path to a .json."),
    algos: str = typer.Option(None, help="Ad hoc form: comma-separated algorithms."),
    tasks: str = typer.Option(None, help="Ad hoc form: comma-separated tasks (default: sentiment)."),
    seeds: int = typer.Option(None, help="Ad hoc form: seeds 0..N-1 (default: 3)."),
    preset: str = typer.Option(None, help="Ad hoc form: preset of every algorithm (default: default)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    threads: str = typer.Option("auto", metavar="auto|N", help="torch threads of every run's process, as zoo "
                                "run's --threads. Several benchmarks sharing the cores: 1 each."),
) -> None:
    """Benchmark algorithms (IQM, bootstrap CIs, probability of improvement); resumes an existing --out."""
    from rlhf_zoo.bench.command import bench
    from rlhf_zoo.threads import parse_threads

    threads_value = parse_threads(threads)  # a bad --threads: one line before anything runs
    _quiet_hf()
    results = bench(out=out, suite=suite, algos=algos, tasks=tasks, seeds=seeds, preset=preset, device=device,
                    progress=not quiet, threads=threads_value)
    ex = results["execution"]
    typer.echo(f"bench: {ex['runs']} runs ({ex['executed']} run now, {ex['skipped']} reused); "
               f"report: {out / 'report.md'}")


@app.command("check")
def check_cmd(
    algorithms: list[str] = typer.Argument(None, help="Algorithms to check (default: every registered one)."),
    task: str = typer.Option(None, help="Task the smoke runs use (default: exact); or give --model."),
    device: str = typer.Option("cpu", help="cpu, auto or cuda[:N]."),
    keep: Path = typer.Option(None, help="Keep the check runs in this directory (default: a temporary one)."),
    model: str = typer.Option(None, help="Check on your own model (directory or hub id) instead of a task."),
    tokenizer: str = typer.Option(None, help="Tokenizer directory or hub id (default: the --model's)."),
    reward: list[str] = typer.Option(None, help="A reward for the online algorithms (repeatable; as zoo run's)."),
    reward_weights: str = typer.Option(None, help="Comma-separated weights of the --reward terms."),
    prompts: str = typer.Option(None, help="Prompt rows for the online algorithms and the evaluation."),
    ptx_dataset: str = typer.Option(None, help="Text rows {\"text\"} for ppo-ptx on your own model."),
    chat_template: str = typer.Option(None, help="A Jinja chat-template file that replaces the tokenizer's."),
    dataset: str = typer.Option(None, help="The --dataset of the algorithms that read one (sft, dpo, reward-model)."),
) -> None:
    """Run the conformance kit on algorithms, third-party ones included: config, update, reference,
    finite, determinism and checkpoint checks (docs/plugins.md, section 8)."""
    import tempfile

    from rlhf_zoo.conformance import check_algorithm, format_results

    reg = _registry()
    names = algorithms or sorted(reg.algorithms)
    for n in names:
        reg.algorithm(n)  # unknown names fail before any run
    setup = {k: v for k, v in {"model": model, "tokenizer": tokenizer, "reward": tuple(reward or ()),
                               "reward_weights": _weights(reward_weights), "prompts": prompts,
                               "ptx_dataset": ptx_dataset, "chat_template": chat_template}.items() if v}
    if setup and not model:
        raise ConfigError(f"--{next(iter(setup)).replace('_', '-')} applies to a check on your own model: give --model too")
    if model and task:
        raise ConfigError(f"--task {task!r} and --model {model!r} are two different worlds: give one")
    world = model or task or "exact"
    failed = []
    with tempfile.TemporaryDirectory(prefix="zoo-check-") as tmp:
        root = keep or Path(tmp)
        for n in names:
            p = reg.provided_by[("algorithm", n)]
            typer.echo(f"zoo check {n} ({p.distribution} {p.version}, plugin {p.name}) on {world}")
            fields = {f.name for f in dataclasses.fields(reg.algorithm(n).config_cls)}
            options = {"dataset": dataset} if dataset and "dataset" in fields else None
            results = check_algorithm(n, root / n, task=task or "exact", device=device, setup=setup or None,
                                      options=options)
            typer.echo(format_results(n, results))
            if any(r.passed is False for r in results):
                failed.append(n)
    if failed:
        raise ZooError(f"conformance failed for {', '.join(failed)}")


@app.command("plot")
def plot_cmd(
    runs: list[Path] = typer.Argument(..., help="Run directories (zoo run --out); several are overlaid."),
    out: Path = typer.Option(None, help="Where the PNGs go [the run directory's plots/; with several runs, the "
                                        "first one's]."),
    smooth: float = typer.Option(0.6, help="EMA weight of the training curves, in [0, 1) (0: raw values only)."),
) -> None:
    """Learning curves of runs as PNGs: training metrics, and gold/proxy/KL where the run evaluated
    (--eval-every). Needs matplotlib (pip install 'rlhf-zoo[bench]')."""
    from rlhf_zoo.plot import plot_runs

    drawn = plot_runs(runs, out or runs[0] / "plots", smooth=smooth)
    for path in drawn["files"]:
        typer.echo(f"wrote {path}")


# --- zoo run ALGO: one click command per algorithm, built from its config dataclass -------------------
class LiteralChoice(click.Choice):
    """A click Choice over a Literal's values that converts back to the value's own type."""

    def __init__(self, values: list[Any]) -> None:
        self.values = {str(v): v for v in values}
        super().__init__(list(self.values))

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return self.values[super().convert(str(value), param, ctx)]


class ThreadsType(click.ParamType):
    """``--threads``: auto or N >= 1 (`rlhf_zoo.threads.parse_threads`); a bad value is one line naming it."""

    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from rlhf_zoo.threads import parse_threads

        return parse_threads(value)


def _threads_option() -> click.Option:
    return click.Option(["--threads"], type=ThreadsType(), default="auto", show_default=True, metavar="auto|N",
                        help=THREADS_HELP)


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for a config field's type (`rlhf_zoo.catalog.field_type`)."""
    if isinstance(tp, list):
        return LiteralChoice(tp), False
    if tp == "bool":
        return bool, True
    return {"int": int, "float": float}.get(tp, str), False


def _algorithm_command(name: str) -> click.Command:
    algo = _catalog().algorithm(name)
    params: list[click.Parameter] = [
        click.Option(["--task"], default=None, help="Built-in task to run on [default: sentiment]; or give --model."),
        click.Option(["--seed"], type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                     help=f"Run seed, {SEED_HELP}."),
        click.Option(["--out"], type=click.Path(path_type=Path), default=None, help="Run directory [runs/ALGO-TASK-sSEED]."),
        click.Option(["--preset"], default=None, help=f"Preset: default, {', '.join(algo.presets)}."),
        click.Option(["--device"], default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.Option(["--task-seed"], type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                     help=f"Seed of the task's world, {SEED_HELP}."),
        click.Option(["--checkpoint-every"], type=click.IntRange(min=0), default=None,
                     help="Iterations between checkpoints (0: none) [default: about 10 per run, and the last]."),
        click.Option(["--keep-checkpoints"], type=click.IntRange(min=1), default=2, show_default=True,
                     help="Complete checkpoints kept (older ones are deleted)."),
        click.Option(["--resume"], is_flag=True,
                     help="Continue the run in --out from its last complete checkpoint that loads (same config "
                          "required)."),
        click.Option(["--overwrite"], is_flag=True,
                     help="Replace the run already in --out (without it, a non-empty --out is refused)."),
        click.Option(["--config"], type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="JSON file of config values (options given here win)."),
        click.Option(["--quiet"], is_flag=True, help="No progress bars."),
        click.Option(["--report-to"], multiple=True, default=(), metavar="NAME[,NAME...]",
                     help="Experiment trackers to report to, repeatable or comma-separated: "
                          f"{', '.join(sorted(_catalog().loggers)) or 'none'} (zoo list) [default: none; "
                          "metrics.jsonl is always written]."),
        click.Option(["--nproc"], type=click.IntRange(min=1), default=1, show_default=True,
                     help="Data-parallel processes on this machine, launched by torch.distributed.run "
                          "(gloo on CPU, NCCL on GPUs)."),
        _threads_option(),
    ]
    params += _setup_params()
    for f in algo.fields:
        if f.name in RUN_OPTIONS or f.name in SETUP_OPTIONS:
            raise ConfigError(f"algorithm {name!r}: config field {f.name!r} clashes with a zoo run option")
        ctype, is_flag = _click_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.help + (f" [default: {f.default}]" if f.default is not None else "")
        if is_flag:
            params.append(click.Option([f"{flag}/--no-{f.name.replace('_', '-')}"], default=None, help=help_text))
        else:
            params.append(click.Option([flag, f.name], type=ctype, default=None, help=help_text))

    def callback(**kwargs: Any) -> None:
        from rlhf_zoo.runner import run

        _quiet_hf()
        common = {k: kwargs.pop(k) for k in RUN_OPTIONS}
        setup = {k: kwargs.pop(k) for k in SETUP_OPTIONS}
        setup["reward_weights"] = _weights(setup["reward_weights"])
        if common["nproc"] > 1 and "WORLD_SIZE" not in os.environ:
            if not algo.data_parallel:
                raise ConfigError(f"algorithm {name!r} does not shard its batches over processes; run it "
                                  "with one process (data-parallel algorithms: see `zoo list`)")
            from rlhf_zoo.tracking import selected_loggers

            selected_loggers(common["report_to"], _registry())  # a bad --report-to: one line, not one per rank
            raise typer.Exit(_launch(common["nproc"]))
        options = read_json_object(common["config"], "config file", "a JSON object of config values") if common["config"] else {}
        options.update({k: v for k, v in kwargs.items() if v is not None})
        world = Path(str(setup["model"]).rstrip("/")).name if setup["model"] else (common["task"] or "sentiment")
        out = common["out"] or Path("runs") / f"{name}-{world}-s{common['seed']}"
        if common["resume"] and common["overwrite"]:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one")
        try:
            summary = run(name, task=common["task"], seed=common["seed"], out=out, device=common["device"],
                          preset=common["preset"], options=options, task_seed=common["task_seed"],
                          checkpoint_every=common["checkpoint_every"], keep_checkpoints=common["keep_checkpoints"],
                          resume=common["resume"], progress=not common["quiet"], setup=setup,
                          overwrite=common["overwrite"], report_to=common["report_to"], threads=common["threads"])
        except KeyboardInterrupt as e:
            if os.environ.get("RANK", "0") == "0":  # one line, from rank 0 of a data-parallel run
                click.echo(_interrupted(out, getattr(e, "zoo_restored", False)), err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None
        if "rank" not in summary:  # the other ranks of a data-parallel run print nothing
            _print_summary(summary, out)

    return click.Command(name, params=params, callback=callback,
                         help=algo.description + ("\n\n" + algo.doc if algo.doc else ""))


def _setup_params() -> list[click.Parameter]:
    """The options of a run on the user's own model (docs/your-own-model.md)."""
    def opt(name: str, help: str, **kw: Any) -> click.Option:
        return click.Option([name], help=help, **kw)

    return [
        opt("--model", "Your own policy to start from: a directory or Hugging Face Hub id of any causal LM (also the "
                       "reference unless --ref-model). Replaces --task.", default=None),
        opt("--tokenizer", "Tokenizer directory or hub id [default: the --model's].", default=None),
        opt("--ref-model", "Reference policy for the KL term [default: the --model].", default=None),
        opt("--reward", "A reward (repeatable, summed): a reward-model directory or hub id, a registered reward "
                        "function (zoo list), or module:function f(prompts, completions, **kwargs) -> list[float].",
            multiple=True),
        opt("--reward-weights", "Comma-separated weights of the --reward terms, in order [default: 1 each].",
            default=None),
        opt("--gold", "A held-out evaluator (same forms as --reward), never optimised: summary.json's gold_reward.",
            default=None),
        opt("--prompts", "Prompt-only rows {\"prompt\": text or messages} (.jsonl, .json, .parquet, saved dir, "
                         "hub id) for the online algorithms and the evaluation.", default=None),
        opt("--eval-fraction", "Share of the --prompts held out for evaluation, at least one prompt [default: 0.1].",
            type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None),
        opt("--ptx-dataset", "Text rows {\"text\"} for ppo-ptx's pretraining term on your own model.", default=None),
        opt("--chat-template", "A Jinja chat-template file that replaces the tokenizer's.",
            type=click.Path(exists=True, dir_okay=False), default=None),
        opt("--dtype", "dtype of the frozen models (reference, reward models); trained ones stay fp32 "
                       "[auto: bf16 on a CUDA GPU with bf16, else fp32].",
            type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=None),
        opt("--attn-implementation", "Attention kernels [default: sdpa where the architecture has it].",
            type=click.Choice(["sdpa", "eager"]), default=None),
        click.Option(["--trust-remote-code"], is_flag=True, default=None,
                     help="Run code shipped with the model repository (off unless given)."),
        click.Option(["--gradient-checkpointing"], is_flag=True, default=None,
                     help="Recompute activations in the backward pass (less memory, more time)."),
        opt("--lora-r", "LoRA rank (0: train every weight); needs pip install 'rlhf-zoo[peft]'.",
            type=click.IntRange(min=0), default=None),
        opt("--lora-alpha", "LoRA alpha [default: 2 x r].", type=float, default=None),
        opt("--lora-dropout", "LoRA dropout [default: 0].", type=click.FloatRange(0, 1, max_open=True), default=None),
        opt("--lora-target-modules", "Comma-separated module names the adapters go on [default: all-linear].",
            default=None),
    ]


def _weights(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ConfigError(f"--reward-weights {text!r}: expected comma-separated numbers, e.g. 1,0.5") from None


def _launch(nproc: int) -> int:
    """Re-run this ``zoo run`` command in ``nproc`` processes under torch's elastic launcher
    (the same as ``torchrun --standalone --nproc-per-node N -m rlhf_zoo run ...``)."""
    import subprocess

    args, skip = [], False
    for a in _ARGV:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    from rlhf_zoo.threads import launcher_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rlhf_zoo", *args]
    proc = subprocess.Popen(cmd, env=launcher_env(os.environ))  # each rank picks its --threads (auto: cores // N)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the ranks got the Ctrl-C too: rank 0 prints how to resume
        proc.wait()
        return INTERRUPTED


def _interrupted(out: Path, restored: bool | None = None) -> str:
    """The one line Ctrl-C prints: the run stopped, its last checkpoint, the command that resumes it.
    ``restored``: True when the run stopped before its first iteration and ``out`` holds what it held
    before (`rlhf_zoo.rundir.set_aside`)."""
    from rlhf_zoo.checkpoint import latest_checkpoint

    if restored:
        return (f"zoo: interrupted: the run in {out} stopped before its first iteration and wrote nothing ({out} "
                f"holds what it held before); start it again with: zoo {shlex.join(_ARGV)}")

    last = latest_checkpoint(out / "checkpoints")
    args = [a for a in _ARGV if a != "--overwrite"]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    if "--resume" not in args:
        args.append("--resume")
    where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
    return f"zoo: interrupted: the run in {out} stopped; {where}; resume with: zoo {shlex.join(args)}"


def _figures(summary: dict[str, Any]) -> str:
    """The headline figures of a summary (``zoo run``) or an evaluation (``zoo eval``), on one line."""
    keys = ["gold_reward", "baseline_gold_reward", "proxy_reward", "baseline_proxy_reward", "win_rate_vs_reference",
            "kl_to_ref", "kl_to_optimum", "frontier_efficiency", "heldout_gold_accuracy", "heldout_label_accuracy",
            "wall_seconds"]
    return "  ".join(f"{k}={summary[k]:.4g}" for k in keys if isinstance(summary.get(k), (int, float)))


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    typer.echo(f"{summary['algorithm']} on {summary['task']} (seed {summary['seed']}): {_figures(summary)}")
    typer.echo(f"run directory: {out}")


#: `zoo run`'s own-model options that `zoo eval` leaves out: they only matter to training
EVAL_SKIPPED_SETUP = ("ptx_dataset", "gradient_checkpointing", "lora_r", "lora_alpha", "lora_dropout",
                      "lora_target_modules")


def _eval_command() -> click.Command:
    """``zoo eval POLICY``: score a saved policy without training (`rlhf_zoo.eval_command`)."""
    def opt(name: str, help: str, **kw: Any) -> click.Option:
        return click.Option([name], help=help, default=None, **kw)

    params: list[click.Parameter] = [
        click.Argument(["policy"]),
        opt("--task", "Built-in task to score on [default: the run's; else sentiment]; or the own-model options."),
        opt("--task-seed", f"Seed of the task's world, {SEED_HELP} [default: the run's; else 0].",
            type=click.IntRange(0, MAX_SEED)),
        opt("--seed", f"Evaluation seed, {SEED_HELP} (samples use seed + 10000, as a run's) [default: the run's; else 0].",
            type=click.IntRange(0, MAX_SEED)),
        opt("--eval-prompts", "Held-out prompts evaluated [default: the run's; else 64].", type=click.IntRange(min=1)),
        opt("--eval-samples", "Responses sampled per prompt [default: the run's; else 4].", type=click.IntRange(min=1)),
        opt("--temperature", "The policy's sampling temperature [default: the run's; else 1].",
            type=click.FloatRange(0, min_open=True)),
        opt("--max-new-tokens", "Response length cap (0: the world's) [default: the run's; else 0].",
            type=click.IntRange(min=0)),
        opt("--out", "Directory for eval.json and samples.jsonl [RUN_DIR/eval/WORLD-sSEED for a run; else "
                     "evals/NAME-WORLD-sSEED].", type=click.Path(path_type=Path)),
        click.Option(["--json", "as_json"], is_flag=True, help="Print eval.json to stdout (machine output) instead "
                                                             "of the summary line."),
        click.Option(["--device"], default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.Option(["--quiet"], is_flag=True, help="No progress bars."),
        _threads_option(),
        opt("--model", "The own-model world's model: its tokenizer, and the reference unless --ref-model "
                       "[default: the run's --model; else POLICY itself]."),
        *[p for p in _setup_params() if p.name not in (*EVAL_SKIPPED_SETUP, "model")],
    ]

    def callback(policy: str, as_json: bool, quiet: bool, **kwargs: Any) -> None:
        from rlhf_zoo.eval_command import EVAL_SETUP_KEYS, evaluate_saved

        _quiet_hf()
        setup = {k: kwargs.pop(k) for k in EVAL_SETUP_KEYS}
        setup["reward_weights"] = _weights(setup["reward_weights"])
        result, out = evaluate_saved(policy, setup=setup, progress=not quiet and not as_json, **kwargs)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        where = f"{result['algorithm']} run {result['run']}" if result.get("run") else policy
        typer.echo(f"eval of {where} on {result['task']} (seed {result['seed']}): {_figures(result)}")
        typer.echo(f"wrote {out / 'eval.json'} and {out / 'samples.jsonl'}")

    return click.Command("eval", params=params, callback=callback, help=(
        "Score a policy without training: gold, proxy, KL to the reference, win rate against it, lengths, samples "
        "(a run's summary.json figures, by the same evaluation). POLICY: a run directory (its config.json gives the "
        "defaults, so a finished run gives its summary.json figures again), a run's policy/ (alone: scored on "
        "--task), or any Hugging Face causal LM with the own-model options (--reward, --prompts, --gold; --model "
        "defaults to POLICY, the reference unless --ref-model)."))


class RunGroup(click.Group):
    """``zoo run ALGO``: algorithms come from the plugin registry."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_catalog().algorithms)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _algorithm_command(name) if name in _catalog().algorithms else None

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0]
        if name not in _catalog().algorithms and not name.startswith("-"):
            try:
                _catalog().algorithm(name)
            except UnknownNameError as e:  # lists the known names; says so when its plugin failed to load
                raise click.UsageError(str(e)) from None
        return super().resolve_command(ctx, args)


def build_cli() -> click.Group:
    group = typer.main.get_command(app)
    group.add_command(RunGroup("run", help="Train with an algorithm: zoo run ALGO [OPTIONS] (see zoo run ALGO --help)."))
    group.add_command(_eval_command())
    return group


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns (and exits with) the exit code."""
    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    # Typer vendors its own click, so its exceptions are caught next to click's (the run group is click's).
    try:
        rv = build_cli().main(args=argv, prog_name="zoo", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except (click.exceptions.Exit, typer.Exit) as e:  # --help, --version
        code = e.exit_code
    except (click.exceptions.Abort, typer.Abort):
        click.echo("zoo: aborted", err=True)
        code = 130
    except (click.ClickException, typer.TyperException) as e:
        click.echo(f"zoo: error: {_one_line(e.format_message())}", err=True)
        code = e.exit_code
    except ZooError as e:
        click.echo(f"zoo: error: {_one_line(str(e))}", err=True)
        code = 1
    if argv is None:
        sys.exit(code)
    return code
