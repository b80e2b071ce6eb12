"""Building a task from its seed: tokenizer, pretraining, SFT, preference data, reward model(s).

Every stage draws from its own random stream derived from the task seed, so a task is a pure function
of (name, seed, spec). The result is written to a temporary directory and renamed into place, so a
half-built task is never taken for a built one.

    tokenizer/      word-level PreTrainedTokenizerFast (distinct pad, bos, eos, unk)
    pretrained/     causal LM pretrained on the task's corpus
    sft/            the SFT policy (loss on completions only) = the reference policy
    <rm name>/      reward model(s), *ForSequenceClassification with one label
    data/           datasets: pretrain, sft, rankings_<rm>, pairs; prompts_train.json, prompts_eval.json
    manifest.json   spec, timings, RM held-out accuracy against the gold preference, labeler stats
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from rlhf_zoo.generation import sample
from rlhf_zoo.models import new_causal_lm, reward_model_from_policy, tiny_llama_config
from rlhf_zoo.training import RankingRow, lm_row, ranking_accuracy, train_lm, train_reward_model
from rlhf_zoo_envs.tasks import labelers

BUILD_VERSION = 4  # 4: built with a fixed thread count (BUILD_THREADS), whatever the caller's
BUILD_THREADS = 2  # intra-op threads of every build: float sums, hence the world, depend on the count
#: the worlds are trained with the kernels they were first built with (AdamW's loop, not the fused kernel
#: the plugins use; reward-model rows scored whole, not with a shared prompt): the same numbers to the
#: last bit, so a cached world and a fresh build of the same BUILD_VERSION and seed are one world
AS_BUILT = {"fused": False}
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
STAGE_STREAMS = {"pretrain": 1, "sft": 2, "prompts": 3, "rankings": 4, "labelers": 5, "train": 6}


@dataclass(frozen=True)
class BuildSpec:
    """Sizes and schedules of a task build (small enough for two CPU cores)."""

    max_new_tokens: int
    beta: float
    missing_eos_penalty: float
    reward_models: dict[str, str] = field(default_factory=lambda: {"reward": "gold_reward"})  # RM -> objective
    labeler_agreement: float | None = labelers.TARGET_AGREEMENT  # None: Bradley-Terry at temperature 1
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 64
    pretrain_docs: int = 20000
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    sft_examples: int = 4000
    sft_steps: int = 300
    sft_lr: float = 1e-3
    batch_size: int = 64
    train_prompts: int = 2000
    eval_prompts: int = 256
    ranking_prompts: int = 1500
    heldout_prompts: int = 300
    responses_per_prompt: int = 4  # K
    rm_steps: int = 300
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    revision: int = 0  # bump when one task's data changes (see `task_dir`)


def cache_root() -> Path:
    """``$RLHF_ZOO_CACHE`` or ``~/.cache/rlhf_zoo``."""
    return Path(os.environ.get("RLHF_ZOO_CACHE") or Path.home() / ".cache" / "rlhf_zoo")


def task_dir(name: str, seed: int, revision: int = 0) -> Path:
    """``<cache>/tasks/<name>-seed<seed>-v<BUILD_VERSION>[.<revision>]``: a task's data revision moves
    only that task's cache."""
    suffix = f".{revision}" if revision else ""
    return cache_root() / "tasks" / f"{name}-seed{seed}-v{BUILD_VERSION}{suffix}"


def _rng(seed: int, stage: str) -> np.random.Generator:
    return np.random.default_rng([seed, STAGE_STREAMS[stage]])


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the language's words; special tokens first (pad=0, bos=1, eos=2, unk=3)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_task(name: str, language: Any, spec: BuildSpec, seed: int, path: Path, progress: bool = True) -> dict:
    """Build every artifact of a task into ``path`` (atomically). Returns the manifest.

    The build runs with `BUILD_THREADS` torch threads whatever the process's setting (restored after):
    a reduction split over a different number of threads sums in a different order, and over hundreds
    of training steps those last-bit differences change the sampled pairs and the reward models. With
    the count fixed a seed gives the same world on every machine (of the same kernels), so a cache key
    names one world."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(name, language, spec, seed, path, progress)
    finally:
        torch.set_num_threads(threads)


def _build(name: str, language: Any, spec: BuildSpec, seed: int, path: Path, progress: bool) -> dict:
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    _remove_stale_builds(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    timings: dict[str, float] = {}
    manifest: dict[str, Any] = {"task": name, "seed": seed, "build_version": BUILD_VERSION,
                                "spec": dataclasses.asdict(spec), "timings_s": timings,
                                "torch_threads": BUILD_THREADS}
    stages = ["tokenizer", "pretrain", "sft", "rankings", *[f"rm:{n}" for n in spec.reward_models]]
    bar = tqdm(total=len(stages), desc=f"building task {name!r}", disable=not progress)
    start = time.perf_counter()

    def done(stage: str) -> None:
        nonlocal start
        timings[stage] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        bar.update(1)

    torch.manual_seed(seed)
    # 1) tokenizer
    bar.set_postfix_str("tokenizer")
    tok = build_tokenizer(list(language.words))
    tok.save_pretrained(tmp / "tokenizer")
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    suppress = sorted({bos, pad, tok.unk_token_id})

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    done("tokenizer")

    # 2) pretraining corpus and a causal LM trained on it from scratch
    bar.set_postfix_str("pretrain")
    rng = _rng(seed, "pretrain")
    corpus = [language.pretrain_text(rng) for _ in range(spec.pretrain_docs)]
    datasets.Dataset.from_dict({"text": corpus}).save_to_disk(str(tmp / "data" / "pretrain"))
    config = tiny_llama_config(len(tok), pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                               hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                               num_heads=spec.num_heads, max_positions=spec.max_positions)
    model = new_causal_lm(config, seed)
    rows = [lm_row([bos], [*encode(t), eos]) for t in corpus]
    pre_losses = train_lm(model, rows, pad_id=pad, steps=spec.pretrain_steps, batch_size=spec.batch_size,
                          lr=spec.pretrain_lr, seed=seed, desc="pretrain", suppress_ids=suppress, progress=progress,
                          **AS_BUILT)
    model.save_pretrained(tmp / "pretrained")
    done("pretrain")

    # 3) SFT on demonstrations, loss on the completion only
    bar.set_postfix_str("sft")
    rng = _rng(seed, "sft")
    sft_prompts = [language.prompt(rng) for _ in range(spec.sft_examples)]
    demos = [language.demonstration(p, rng) for p in sft_prompts]
    datasets.Dataset.from_dict({"prompt": sft_prompts, "completion": demos}).save_to_disk(str(tmp / "data" / "sft"))
    rows = [lm_row([bos, *encode(p)], [*encode(c), eos]) for p, c in zip(sft_prompts, demos, strict=True)]
    sft_losses = train_lm(model, rows, pad_id=pad, steps=spec.sft_steps, batch_size=spec.batch_size,
                          lr=spec.sft_lr, seed=seed + 1, desc="sft", suppress_ids=suppress, progress=progress,
                          **AS_BUILT)
    model.save_pretrained(tmp / "sft")
    done("sft")

    # 4) prompts, and K ranked SFT samples per prompt from simulated labelers
    bar.set_postfix_str("rankings")
    rng = _rng(seed, "prompts")
    splits = {"train": [language.prompt(rng) for _ in range(spec.train_prompts)],
              "eval": [language.prompt(rng) for _ in range(spec.eval_prompts)]}
    for split, prompts in splits.items():
        (tmp / "data" / f"prompts_{split}.json").write_text(json.dumps(prompts))
    rng = _rng(seed, "rankings")
    n_rank = spec.ranking_prompts + spec.heldout_prompts
    rank_prompts = [language.prompt(rng) for _ in range(n_rank)]
    responses = _sample_responses(model, tok, rank_prompts, spec, suppress, seed)  # [n_rank][K]
    gold = {obj: np.array([[language.gold(p, r)[obj] for r in rs] for p, rs in zip(rank_prompts, responses, strict=True)])
            for obj in language.objectives}
    seen = [[labelers.perceived(language, p, r) for r in rs] for p, rs in zip(rank_prompts, responses, strict=True)]
    view = {obj: np.array([[v[obj] for v in row] for row in seen]) for obj in language.objectives}
    label_rng = _rng(seed, "labelers")
    rankings: dict[str, dict[str, list]] = {}
    labeler_stats: dict[str, dict[str, float]] = {}

    def label(name: str, objective: str) -> datasets.Dataset:
        """Rank every prompt's K responses by ``objective`` with simulated labelers (on what they perceive,
        `labelers.perceived`; the ``gold`` column keeps the gold reward)."""
        v = view[objective]
        tau = 1.0 if spec.labeler_agreement is None else labelers.calibrate_temperature(v[: spec.ranking_prompts],
                                                                                       spec.labeler_agreement)
        labeler_stats[name] = {"objective": objective, "temperature": tau,
                               "inter_labeler_agreement": labelers.agreement(v[: spec.ranking_prompts], tau)}
        cols: dict[str, list] = {"prompt": [], "responses": [], "gold": [], "levels": [], "margins": []}
        for p, rs, gv, vv in zip(rank_prompts, responses, gold[objective], v, strict=True):
            order, levels = labelers.rank(vv, tau, label_rng)
            cols["prompt"].append(p)
            cols["responses"].append([rs[i] for i in order])
            cols["gold"].append([float(gv[i]) for i in order])
            cols["levels"].append(levels.tolist())
            cols["margins"].append(labelers.margins_from_levels(levels).tolist())
        rankings[name] = cols
        return datasets.Dataset.from_dict(cols)

    for rm_name, objective in spec.reward_models.items():
        ds = label(rm_name, objective)
        ds.select(range(spec.ranking_prompts)).save_to_disk(str(tmp / "data" / f"rankings_{rm_name}"))
        ds.select(range(spec.ranking_prompts, n_rank)).save_to_disk(str(tmp / "data" / f"heldout_{rm_name}"))
    # preference pairs (DPO) follow the task's overall gold objective: the rankings of the reward model
    # trained on it, or (hh: helpfulness and safety RMs, overall = their Llama 2 style combination) a
    # ranking of its own
    overall = language.objectives[0]
    source = next((n for n, o in spec.reward_models.items() if o == overall), None)
    if source is None:
        source = "overall"
        label(source, overall)
    pairs, identical = _pairs(rankings[source], spec.ranking_prompts)
    datasets.Dataset.from_dict(pairs).save_to_disk(str(tmp / "data" / "pairs"))
    manifest["labelers"] = labeler_stats
    manifest["pairs"] = {"kept": len(pairs["prompt"]), "dropped_identical_responses": identical,
                         "objective": overall}
    done("rankings")

    # 5) reward model(s): trunk from the SFT policy, ranking loss with all C(K,2) pairs per prompt
    manifest["reward_models"] = {}
    for rm_name in spec.reward_models:
        bar.set_postfix_str(f"reward model {rm_name}")
        cols = rankings[rm_name]
        groups = [RankingRow([bos, *encode(p)], [[*encode(r), eos] for r in rs], m)
                  for p, rs, m in zip(cols["prompt"], cols["responses"], cols["margins"], strict=True)]
        rm = reward_model_from_policy(model)
        rm_losses = train_reward_model(rm, groups[: spec.ranking_prompts], pad_id=pad, steps=spec.rm_steps,
                                       batch_size=spec.rm_batch_size, lr=spec.rm_lr, seed=seed + 2,
                                       desc=f"reward model {rm_name}", progress=progress, **AS_BUILT,
                                       share_prompt=False)
        acc = ranking_accuracy(rm, groups[spec.ranking_prompts:], cols["gold"][spec.ranking_prompts:], pad,
                               share_prompt=False)
        train_acc = ranking_accuracy(rm, groups[:300], cols["gold"][:300], pad, share_prompt=False)
        rm.save_pretrained(tmp / rm_name)
        manifest["reward_models"][rm_name] = {
            "objective": spec.reward_models[rm_name], "heldout_gold_accuracy": round(acc, 4),
            "train_gold_accuracy": round(train_acc, 4), "final_loss": round(float(np.mean(rm_losses[-20:])), 4)}
        done(f"rm:{rm_name}")
    manifest["losses"] = {"pretrain_final": round(float(np.mean(pre_losses[-20:])), 4),
                          "sft_final": round(float(np.mean(sft_losses[-20:])), 4)}
    manifest["total_seconds"] = round(sum(timings.values()), 2)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same (deterministic) build first: keep theirs
        if not (path / "manifest.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _remove_stale_builds(path: Path) -> None:
    """Delete temporary build folders of this task left by processes that no longer run."""
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _sample_responses(model, tok, prompts: list[str], spec: BuildSpec, suppress: list[int], seed: int) -> list[list[str]]:
    """K responses per prompt from the SFT policy at temperature 1, decoded to text."""
    gen = torch.Generator().manual_seed(seed + 3)
    k = spec.responses_per_prompt
    flat = [p for p in prompts for _ in range(k)]
    special = set(tok.all_special_ids)
    texts: list[str] = []
    for start in range(0, len(flat), 512):
        chunk = flat[start : start + 512]
        rows = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in chunk]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = sample(model, ids, mask, spec.max_new_tokens, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, suppress_ids=suppress, generator=gen)
        for row, m in zip(out.response_ids.tolist(), out.response_mask.tolist(), strict=True):
            texts.append(tok.decode([i for i, keep in zip(row, m, strict=True) if keep and i not in special]))
    return [texts[i : i + k] for i in range(0, len(texts), k)]


def _pairs(cols: dict[str, list], n_train: int) -> tuple[dict[str, list], int]:
    """prompt/chosen/rejected pairs (all C(K,2) of each training ranking); identical texts are dropped
    (and counted: a pair with chosen == rejected carries no preference)."""
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "margin": [], "level": []}
    identical = 0
    for p, rs, ms, lv in list(zip(cols["prompt"], cols["responses"], cols["margins"], cols["levels"], strict=True))[:n_train]:
        a, b = np.triu_indices(len(rs), 1)
        for idx, (i, j) in enumerate(zip(a, b, strict=True)):
            if rs[i] == rs[j]:
                identical += 1
                continue
            out["prompt"].append(p)
            out["chosen"].append(rs[i])
            out["rejected"].append(rs[j])
            out["margin"].append(ms[idx])
            out["level"].append(int(lv[idx]))
    return out, identical
