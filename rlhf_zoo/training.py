"""The supervised stages of the pipeline: language-model training (pretraining, SFT) and reward-model
training. The task builder and the ``sft`` / ``reward-model`` plugins both use these loops.

Rows are lists of token ids; batches are built here with right padding, position ids from the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_zoo.distributed import all_reduce_gradients
from rlhf_zoo.errors import NonFiniteError
from rlhf_zoo.models import reward_scores, reward_scores_shared_prompt, supports_shared_prompt
from rlhf_zoo.ops.logprobs import shifted_logprobs
from rlhf_zoo.ops.masking import masked_mean, masked_sum
from rlhf_zoo.ops.ranking import pair_indices, ranking_loss


@dataclass(frozen=True)
class LMRow:
    """One training sequence: ``ids`` and which of its tokens the loss counts (True = counts)."""

    ids: list[int]
    loss_mask: list[bool]


def lm_row(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> LMRow:
    """Prompt + completion with the loss on the completion only (SFT; InstructGPT sec. 3.5)."""
    return LMRow([*prompt_ids, *completion_ids], [False] * len(prompt_ids) + [True] * len(completion_ids))


def collate_lm(rows: Sequence[LMRow], pad_id: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        attn[i, : len(r.ids)] = 1
        loss_mask[i, : len(r.ids)] = torch.tensor(r.loss_mask)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss_mask.to(device)}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], suppress_ids: Sequence[int] = (),
            normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of the counted tokens (token t predicted from tokens < t); with
    ``normalizer``, their sum divided by it (a shard's part of a larger batch's mean)."""
    logp = shifted_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                            suppress_ids=suppress_ids)  # (B, T-1); chunked above a size (rlhf_zoo.ops.logprobs)
    if normalizer is not None:
        return masked_sum(-logp, batch["loss_mask"][:, 1:]) / normalizer
    return masked_mean(-logp, batch["loss_mask"][:, 1:])


def backward(loss: torch.Tensor, term: str = "loss") -> None:
    """``loss.backward()``, refusing a NaN or infinite ``loss`` (`NonFiniteError` naming ``term``).
    Gradients add up in ``.grad``: call once per micro-batch, then `optimizer_step` with no loss."""
    if not torch.isfinite(loss.detach()):
        raise NonFiniteError(f"{term} is {loss.item()}")
    loss.backward()


def optimizer_step(loss: torch.Tensor | None, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                   term: str = "loss") -> torch.Tensor:
    """One step: backward ``loss`` (or use the gradients already accumulated by `backward` when ``loss``
    is None), average them over the data-parallel ranks, clip, step, zero the gradients.

    A NaN or infinite loss or gradient raises `NonFiniteError` naming ``term`` BEFORE the parameters
    change, so the model and the last checkpoint stay good. Returns the gradient norm before clipping."""
    if loss is not None:
        optimizer.zero_grad(set_to_none=True)
        backward(loss, term)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    all_reduce_gradients(params)
    with_grad = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"gradient of {term} is non-finite (norm {norm.item()})")
    if max_grad_norm and norm + 1e-6 > max_grad_norm:  # (syncs once, as the finiteness check does)
        # what clip_grad_norm_ does, but only when it changes something: below the bound it multiplies
        # every gradient by exactly 1.0, a full pass over them (20 ms a step at 42M parameters on a CPU)
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_grad_norm, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def adamw(params: Any, lr: float, weight_decay: float = 0.0, *, fused: bool = True) -> torch.optim.AdamW:
    """The AdamW every trainer uses: torch's fused kernel where it runs (fp32/bf16 parameters on CPU or
    CUDA), one pass over each parameter for the whole update instead of a dozen elementwise ops; at 42M
    parameters on one CPU thread a step takes 0.05 s against 0.17 s for the default loop (a 3.4x
    saving that is most of what a PPO minibatch spends outside its forwards). Same update to within float
    rounding (not bit for bit: ``fused=False`` keeps the loop, as the task builds do so that a seed names
    the same world it always did)."""
    params = list(params)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    usable = fused and bool(flat) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in flat)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if usable else {}))


class Shuffler:
    """Index batches over ``n`` rows in shuffled epochs (the last batch of an epoch may be short), with
    checkpointable state: the generator and the rest of the current epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, device: str | torch.device = "cpu") -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = torch.empty(0, dtype=torch.long)  # the current epoch's order not yet served

    def next(self) -> torch.Tensor:
        if not len(self.pending):
            self.pending = torch.randperm(self.n, generator=self.generator)
        idx, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return idx.to(self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "pending": self.pending.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.pending = state["pending"].clone()


@dataclass
class LossHistory:
    """Every step's loss, checkpointed with the loop (a resumed run returns the whole history)."""

    values: list[float] = field(default_factory=list)

    def state_dict(self) -> dict[str, list[float]]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.values = [float(v) for v in state["values"]]


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Indices for ``steps`` batches: shuffled epochs, the last batch of an epoch may be short."""
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


def fit(
    model: torch.nn.Module,
    n_rows: int,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool = True,
    warmup_steps: int = 0,
    on_step: Callable[[int, float, int], None] | None = None,
    ctx: Any = None,
    fused: bool = True,
) -> list[float]:
    """AdamW with linear warmup and cosine decay. ``loss_fn(indices) -> (loss, tokens in the batch)``;
    ``on_step(step, loss, tokens)`` is called after each step. Returns every step's loss. ``fused``:
    see `adamw`.

    With a run context ``ctx`` the steps are the run's checkpointed iterations: the optimizer, the
    schedule and the model are tracked, and a resumed run continues at the next step (the batch order
    is a function of ``seed`` alone)."""
    gen = torch.Generator().manual_seed(seed)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=lr, fused=fused)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps  # 1) linear warmup
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))  # 2) cosine decay to 10%

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = _batches(n_rows, batch_size, steps, gen)
    losses = LossHistory()
    if ctx is not None:
        ctx.track("optimizer", opt)
        ctx.track("scheduler", sched)
        ctx.track("losses", losses)
        if model is not ctx.policy:  # e.g. a reward model built from the policy
            ctx.track("model", model)
        bar = ctx.iterations(steps, desc)
    else:
        bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    model.train()
    for step in bar:
        loss, tokens = loss_fn(batches[step - 1])
        optimizer_step(loss, opt, 1.0, term=f"{desc} loss" if ctx is not None else f"{desc} loss (step {step})")
        sched.step()
        losses.values.append(loss.item())
        if ctx is None:
            bar.set_postfix(loss=f"{losses.values[-1]:.3f}", refresh=False)
        if on_step is not None:
            on_step(step, losses.values[-1], tokens)
    model.eval()
    return losses.values


def train_lm(
    model: torch.nn.Module,
    rows: Sequence[LMRow],
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str = "train",
    suppress_ids: Sequence[int] = (),
    progress: bool = True,
    on_step: Callable[[int, float, int], None] | None = None,
    ctx: Any = None,
    fused: bool = True,
) -> list[float]:
    """Pretraining (loss on every token after BOS) or SFT (loss on the completion), by the rows' masks.
    ``ctx``, ``fused``: see `fit`."""
    device = next(model.parameters()).device

    def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = collate_lm([rows[i] for i in idx.tolist()], pad_id, device)
        return lm_loss(model, batch, suppress_ids), int(batch["attention_mask"].sum())

    return fit(model, len(rows), loss_fn, steps=steps, batch_size=batch_size, lr=lr, seed=seed, desc=desc,
               progress=progress, warmup_steps=min(50, steps // 10), on_step=on_step, ctx=ctx, fused=fused)


@dataclass(frozen=True)
class RankingRow:
    """One prompt with K responses ranked best first, and the margin of each of the C(K,2) pairs."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    margins: list[float]


def _score_groups(model: torch.nn.Module, groups: Sequence[RankingRow], pad_id: int,
                  share_prompt: bool = True) -> torch.Tensor:
    """Reward of every response of every group.  -> (B, K)

    ``share_prompt``: each prompt goes through the model once and its K responses read its keys and
    values (`rlhf_zoo.models.reward_scores_shared_prompt`), instead of K copies of [prompt | response]
    rows in one forward; the same scores and gradients to float rounding, with (K - 1) prompts' worth
    of positions fewer (a quarter of the tokens for K = 2 and prompts as long as the responses). Models
    without a KV cache take the one-forward path."""
    device = next(model.parameters()).device
    k = len(groups[0].response_ids)
    if share_prompt and supports_shared_prompt(model) and all(g.prompt_ids for g in groups):
        prompts = collate_lm([LMRow(list(g.prompt_ids), [True] * len(g.prompt_ids)) for g in groups], pad_id, device)
        responses = collate_lm([LMRow(list(r), [True] * len(r)) for g in groups for r in g.response_ids], pad_id, device)
        return reward_scores_shared_prompt(model, prompts["input_ids"], prompts["attention_mask"],
                                           responses["input_ids"], responses["attention_mask"]).view(len(groups), k)
    rows = [lm_row(g.prompt_ids, r) for g in groups for r in g.response_ids]
    batch = collate_lm(rows, pad_id, device)
    return reward_scores(model, batch["input_ids"], batch["attention_mask"]).view(len(groups), k)


def train_reward_model(
    model: torch.nn.Module,
    groups: Sequence[RankingRow],
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    use_margin: bool = False,
    desc: str = "reward model",
    progress: bool = True,
    on_step: Callable[[int, float, int], None] | None = None,
    ctx: Any = None,
    fused: bool = True,
    share_prompt: bool = True,
) -> list[float]:
    """Ranking loss over groups of K responses per prompt; each group is one batch element.
    ``ctx``, ``fused``: see `fit`; ``share_prompt``: see `_score_groups`."""
    ks = {len(g.response_ids) for g in groups}
    if len(ks) != 1:
        raise ValueError(f"every ranking must have the same number of responses K; found K in {sorted(ks)}")
    if ks.pop() < 2:
        raise ValueError("a ranking needs at least K = 2 responses")
    device = next(model.parameters()).device

    def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = [groups[i] for i in idx.tolist()]
        scores = _score_groups(model, batch, pad_id, share_prompt)  # (B, K)
        margins = torch.tensor([g.margins for g in batch], device=device) if use_margin else None
        tokens = sum(len(g.prompt_ids) + len(r) for g in batch for r in g.response_ids)
        return ranking_loss(scores, margins), tokens

    return fit(model, len(groups), loss_fn, steps=steps, batch_size=batch_size, lr=lr, seed=seed, desc=desc,
               progress=progress, warmup_steps=min(20, steps // 10), on_step=on_step, ctx=ctx, fused=fused)


@torch.no_grad()
def ranking_accuracy(
    model: torch.nn.Module, groups: Sequence[RankingRow], gold: Sequence[Sequence[float]], pad_id: int,
    share_prompt: bool = True,
) -> float:
    """Held-out accuracy against the gold preference: over all pairs whose gold rewards differ, the
    fraction the reward model orders like the gold reward. ``gold[b][k]`` is response k's gold reward.
    ``share_prompt``: see `_score_groups`."""
    correct = total = 0
    for start in range(0, len(groups), 64):
        scores = _score_groups(model, groups[start : start + 64], pad_id, share_prompt).cpu()
        for row, g in zip(scores.tolist(), gold[start : start + 64], strict=True):
            better, worse = pair_indices(len(row))
            for i, j in zip(better, worse, strict=True):
                if g[i] == g[j]:
                    continue
                total += 1
                correct += (row[i] - row[j]) * (g[i] - g[j]) > 0
    return correct / max(total, 1)
