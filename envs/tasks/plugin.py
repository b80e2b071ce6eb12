"""The built-in tasks, registered through the ``rlhf_zoo`` entry points like any third-party task."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.registry import TaskSpec
from rlhf_zoo_envs.tasks.base import Task, check_task_files
from rlhf_zoo_envs.tasks.build import BuildSpec, build_task, task_dir

EXACT_SPEC = BuildSpec(
    max_new_tokens=4, beta=0.5, missing_eos_penalty=0.0, labeler_agreement=None, hidden_size=32, num_layers=2,
    num_heads=2, max_positions=16, pretrain_docs=4000, pretrain_steps=300, sft_examples=1000, sft_steps=150,
    train_prompts=512, eval_prompts=9, ranking_prompts=6000, heldout_prompts=300, rm_steps=300,
)
SENTIMENT_SPEC = BuildSpec(max_new_tokens=16, beta=0.1, missing_eos_penalty=1.0, revision=1)  # labeler length bias
HH_SPEC = BuildSpec(max_new_tokens=20, beta=0.1, missing_eos_penalty=1.0,
                    reward_models={"helpful": "helpfulness", "safety": "harmlessness"}, revision=1)


def loader(name: str, spec: BuildSpec, make: Callable[[int], tuple[Any, type[Task]]]) -> Callable[..., Task]:
    """``load(seed=0, progress=True, rebuild=False) -> Task``: build into the cache if missing, check its files
    (`check_task_files`: a damaged cache is one line naming the file and ``zoo prepare NAME --rebuild``),
    then open."""

    def load(seed: int = 0, progress: bool = True, rebuild: bool = False) -> Task:
        language, task_cls = make(seed)
        path = task_dir(name, seed, spec.revision)
        if rebuild:
            shutil.rmtree(path, ignore_errors=True)
        if not (path / "manifest.json").exists():
            build_task(name, language, spec, seed, path, progress=progress)
        check_task_files(path, name, seed)
        return task_cls.from_dir(path, language, name=name, seed=seed, max_new_tokens=spec.max_new_tokens,
                                 beta=spec.beta, missing_eos_penalty=spec.missing_eos_penalty,
                                 reward_models=tuple(spec.reward_models))

    return load


def _exact(seed: int) -> tuple[Any, type[Task]]:
    from rlhf_zoo_envs.tasks.exact import ExactLanguage, ExactTask

    return ExactLanguage(seed), ExactTask


def _sentiment(seed: int) -> tuple[Any, type[Task]]:
    from rlhf_zoo_envs.tasks.sentiment import SentimentLanguage

    return SentimentLanguage(), Task


def _hh(seed: int) -> tuple[Any, type[Task]]:
    from rlhf_zoo_envs.tasks.hh import HHTask, HHWorld

    return HHWorld(), HHTask


@hookimpl
def register_tasks(register: Callable[[TaskSpec], None]) -> None:
    register(TaskSpec("exact", loader("exact", EXACT_SPEC, _exact),
                      "Enumerable world: exact reward, KL and optimal KL-regularised policy."))
    register(TaskSpec("sentiment", loader("sentiment", SENTIMENT_SPEC, _sentiment),
                      "Synthetic movie reviews; continue a review positively and fluently (default)."))
    register(TaskSpec("hh", loader("hh", HH_SPEC, _hh),
                      "Synthetic assistant dialogues; helpful and harmless, two reward models (Llama 2)."))
