"""A task built from a seed is the same world whatever the caller's torch thread count.

Builds a shortened ``exact`` task once with one and once with two threads set by the caller and compares
every artifact: model weights, datasets, prompts and the manifest's figures (RM accuracies, losses,
labeler statistics).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file

from rlhf_zoo_envs.tasks.build import BUILD_THREADS, build_task
from rlhf_zoo_envs.tasks.exact import ExactLanguage
from rlhf_zoo_envs.tasks.plugin import EXACT_SPEC

SHORT = dataclasses.replace(EXACT_SPEC, pretrain_docs=400, pretrain_steps=40, sft_examples=200, sft_steps=30,
                            train_prompts=32, ranking_prompts=200, heldout_prompts=40, rm_steps=30)


def _build(path: Path, threads: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        manifest = build_task("exact", ExactLanguage(3), SHORT, 3, path, progress=False)
        assert torch.get_num_threads() == threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    return manifest


def test_one_and_two_threads_build_the_same_world(tmp_path):
    a, b = tmp_path / "one", tmp_path / "two"
    ma, mb = _build(a, 1), _build(b, 2)
    assert ma["torch_threads"] == mb["torch_threads"] == BUILD_THREADS
    strip = lambda m: {k: v for k, v in m.items() if k not in ("timings_s", "total_seconds")}  # noqa: E731
    assert strip(ma) == strip(mb)
    weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert {str(p.parent) for p in weights} >= {"pretrained", "sft", "reward"}
    for rel in weights:
        wa, wb = load_file(str(a / rel)), load_file(str(b / rel))
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), f"{rel}: {name} differs"
    for d in sorted(p.name for p in (a / "data").iterdir() if p.is_dir()):
        da, db = datasets.load_from_disk(str(a / "data" / d)), datasets.load_from_disk(str(b / "data" / d))
        assert da.to_dict() == db.to_dict(), d
    for f in ("prompts_train.json", "prompts_eval.json"):
        assert json.loads((a / "data" / f).read_text()) == json.loads((b / "data" / f).read_text())
