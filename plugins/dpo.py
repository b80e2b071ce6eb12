"""``dpo``: Direct Preference Optimization (Rafailov et al. 2023), with the IPO, hinge and cDPO variants.

The KL-regularised RLHF objective has the closed-form optimum pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x)
(Eq. 4), so r = beta log(pi* / pi_ref) + beta log Z, and Bradley-Terry preferences give a loss on the policy
alone (Eq. 7):

    h(x, y_w, y_l) = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    sigmoid: -log sigmoid(beta h)                                            (DPO, Eq. 7)
    cDPO:    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)       (label smoothing; Mitchell 2023)
    ipo:     (h - 1 / (2 beta))^2                                            (Azar et al. 2023, Eq. 17)
             ``ipo_logratio mean`` (TRL's IPO): each log-ratio divided by its own response's token count
    hinge:   max(0, 1 - beta h)                                              (SLiC-HF, Zhao et al. 2023)
    + rpo_alpha * mean token NLL of y_w    (optional; RPO, Pang et al. 2024; Liu et al. 2024)

Implementation details:
  1. Data: the task's ``pairs`` dataset, or a user file of prompt/chosen/rejected rows, of prompt + ranked
     ``responses`` (each ranking gives its C(K,2) pairs) or of Anthropic HH text, validated by
     `rlhf_zoo.data` (``bad_rows``, ``long_rows``, ``max_drop_fraction``). Prompts are left-padded with BOS first;
     responses right-padded with EOS appended, cut at the response length cap like sampled responses.
  2. A pair whose chosen and rejected token ids are identical carries no preference (its loss gradient is
     0 for every variant): such pairs are counted, reported as ``identical_pairs`` and excluded.
  3. log pi(y|x) is the sum of the response tokens' log-probs at temperature 1 (EOS included, suppressed
     ids at -inf, position ids from the mask), via `rlhf_zoo.ops.response_logprobs`.
  4. The reference log-probs of the whole dataset are computed ONCE before training (no grad, batched)
     and cached; the training loop never runs the reference model.
  5. Chosen and rejected responses go through the policy in ONE forward of 2B rows (chosen first).
  6. AdamW without weight decay, linear warmup then linear decay to 0, gradient norm clipped to 1,
     shuffled epochs. Models are built with dropout 0; the policy is in train mode while it trains.
  7. Logged per step: loss, reward accuracy (implicit reward beta (log pi - log pi_ref) of the chosen >
     the rejected), reward margin, chosen and rejected rewards, NLL of the chosen responses.
  8. The loss is blind to moving probability between the responses seen in pairs and those never seen
     (adding c(x) to every log-ratio of a prompt leaves every h unchanged), so mass can drift to unseen
     responses (on ``exact``: 4-word responses). ``rpo_alpha`` > 0 anchors the policy on the chosen data
     at the price of a pull towards the chosen responses' distribution.
  9. Data parallel (``--nproc N``) and gradient accumulation: every rank draws the same batch of pairs and
     trains on its shard, in micro-batches of ``micro_batch_size``; each micro-batch's loss is its sum over
     the WHOLE batch's pair (and chosen-token) count (`rlhf_zoo.distributed`), so N ranks x M micro-batches
     take the same step as one forward of the whole batch.
 10. SFT-then-DPO (``sft_steps`` > 0; the DPO paper, sec. 4, "DPO outline": when the preference data was
     not sampled from the reference, first fine-tune on the preferred responses). Before the loop the policy is fine-tuned
     for ``sft_steps`` steps on the chosen response of every pair it will train on (the kept pairs, with
     their multiplicity: a response chosen in several pairs counts that often; the same tokens DPO scores,
     loss on the response; `rlhf_zoo.training.train_lm`, AdamW, warmup then cosine decay, as ``zoo run
     sft``). A frozen copy of that model then replaces ``ctx.reference``: the reference log-probs, the DPO
     loss (ln 2 at the first step: policy == reference) and the final evaluation's ``baseline_*`` figures
     and KL are all against it, and summary.json says so (``reference_model``, ``sft_on_chosen``: its
     steps, losses and the chosen responses' token NLL before and after). The phase is not part of the
     checkpointed loop: it is a deterministic function of the starting weights, the pairs and the seed, so
     ``--resume`` runs it again (``sft_steps`` steps of extra work) and the checkpoint's DPO state then
     overwrites the policy; on CPU the resumed run is bit-identical (a GPU's non-deterministic kernels can
     change the last bits of the re-run phase, as they do for any GPU run). Its steps are not rows of
     metrics.jsonl, whose iterations stay the DPO steps.
 11. IPO's log-ratios (``ipo_logratio``): ``sum`` (default) is Azar et al.'s h, on sequence log-probs like
     the other variants, so beta means the same in every variant and the IPO results stay comparable with
     the zoo's earlier runs; ``mean`` divides log(pi/pi_ref) of the chosen and of the rejected response by
     that response's own token count (EOS included), as TRL's ``loss_type="ipo"`` does, for both the policy
     and the reference. The target 1/(2 beta) is then a per-token margin: the same beta regularises more
     weakly the longer the responses. The logged implicit rewards use the log-ratios the loss uses.
     docs/decisions.md, "Loss conventions against peers", lists this and the zoo's other such choices.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from rlhf_zoo.config import DatasetConfig, check_positive, option
from rlhf_zoo.data import load_rankings
from rlhf_zoo.errors import ConfigError, DataError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.ops import masked_sum, response_logprobs
from rlhf_zoo.ops.ranking import pair_indices
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.training import Shuffler, adamw, backward, lm_row, optimizer_step, train_lm

LOGPROB_TEMPERATURE = 1.0  # DPO's objective is on pi itself, whatever the sampling temperature
MAX_GRAD_NORM = 1.0
REFERENCE_BATCH = 256  # pairs per no-grad reference forward


@dataclass(frozen=True)
class DPOConfig(DatasetConfig):
    presets = {
        "quick": {"epochs": 1, "eval_prompts": 64},
        # tuned on ``exact``: long, large-batch, anchored by the chosen NLL (implementation detail 8)
        "rpo": {"rpo_alpha": 0.1, "learning_rate": 5e-3, "batch_size": 512, "epochs": 15},
        # quick, after 100 steps of SFT on the chosen responses (implementation detail 10)
        "quick-sft": {"epochs": 1, "eval_prompts": 64, "sft_steps": 100},
        "smoke": {"steps": 2, "batch_size": 8, "max_pairs": 16, "warmup_steps": 0, "eval_prompts": 2,
                  "eval_samples": 1},
    }

    kl_coefficient = "beta"

    beta: float | None = option(None, "KL coefficient beta (temperature of the implicit reward); default: the task's.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = option("sigmoid", "sigmoid (DPO), ipo (Azar et al.) or hinge (SLiC).")
    label_smoothing: float = option(0.0, "cDPO: probability eps that a label is flipped (sigmoid loss only), in [0, 0.5).")
    ipo_logratio: Literal["sum", "mean"] = option(
        "sum", "IPO only: each log-ratio log(pi/pi_ref) summed over its response's tokens (sum: Azar et al.'s h on "
               "sequence log-probs, beta meaning what it means for sigmoid and hinge) or averaged over them (mean: "
               "TRL's loss_type='ipo', chosen and rejected each by its own token count). The same beta is a "
               "weaker regulariser under mean once responses are longer than one token.")
    epochs: int = option(3, "Passes over the pairs (used when steps is 0).")
    steps: int = option(0, "Optimizer steps; 0: epochs x batches per epoch.")
    batch_size: int = option(64, "Preference pairs per step (2 x batch_size sequences per forward).")
    learning_rate: float = option(3e-4, "Peak learning rate (AdamW, no weight decay; warmup, then linear decay to 0).")
    rpo_alpha: float = option(0.0, "RPO: weight of the chosen responses' mean token NLL added to the loss (0: pure DPO).")
    warmup_steps: int = option(10, "Linear learning-rate warmup steps.")
    dataset: str = option("", "A preference dataset (.jsonl, .json, .parquet, saved dir, or a Hub id org/name[@split]; rows "
                              "prompt/chosen/rejected, prompt/responses, conversational message lists (explicit or "
                              "implicit prompt) or Anthropic HH chosen/rejected text); empty: the task's pairs.")
    max_pairs: int = option(0, "Use the first max_pairs pairs (0: all).")
    micro_batch_size: int = option(0, "Pairs per forward/backward, gradients accumulated over a step's "
                                      "micro-batches (0: a rank's whole share of the batch at once).")
    sft_steps: int = option(0, "SFT-then-DPO, for pairs not sampled from the reference: first fine-tune the policy for N "
                               "steps on the chosen responses of the pairs (loss on the response), then run DPO from "
                               "that model with a frozen copy of it as the reference (the final evaluation's baseline "
                               "too; summary.json says so). --resume runs this phase again. 0: off.")
    sft_batch_size: int = option(64, "Chosen responses per step of the --sft-steps phase.")
    sft_learning_rate: float = option(1e-3, "Peak learning rate of the --sft-steps phase (AdamW, warmup then cosine decay).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "epochs", "batch_size", "learning_rate", "sft_batch_size", "sft_learning_rate")
        for name in ("steps", "warmup_steps", "max_pairs", "rpo_alpha", "micro_batch_size", "sft_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"beta must be > 0 (or unset for the task's), got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError(f"label_smoothing applies to loss_type 'sigmoid' only, got loss_type {self.loss_type!r}")
        if self.ipo_logratio != "sum" and self.loss_type != "ipo":
            raise ConfigError(f"ipo_logratio {self.ipo_logratio!r} applies to loss_type 'ipo' only, "
                              f"got loss_type {self.loss_type!r}")

    @property
    def per_token_logratios(self) -> bool:
        """Whether the loss averages each log-ratio over its response's tokens (implementation detail 11)."""
        return self.loss_type == "ipo" and self.ipo_logratio == "mean"


def dpo_loss(
    logprobs_chosen: torch.Tensor, logprobs_rejected: torch.Tensor, ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
    reduction: Literal["mean", "none"] = "mean", chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference loss over pairs, from sequence log-probs log pi(y|x) (all (B,)).

    ``chosen_tokens``, ``rejected_tokens`` (B,): the responses' token counts; when given, each log-ratio
    is divided by its own response's count (a per-token average, TRL's IPO; implementation detail 11).

    Returns:
        the loss (mean over pairs, or per pair (B,) with reduction "none"), and the implicit rewards
        beta (log pi - log pi_ref) of chosen and rejected (B,), detached (per token when averaged).
    """
    chosen_ratio, rejected_ratio = logprobs_chosen - ref_chosen, logprobs_rejected - ref_rejected
    if chosen_tokens is not None and rejected_tokens is not None:
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1).to(chosen_ratio.dtype)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1).to(rejected_ratio.dtype)
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":  # Eq. 7; cDPO mixes in the flipped label
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":  # Azar et al., Eq. 17: regress h onto 1 / (2 beta)
        losses = (h - 1 / (2 * beta)).square()
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: sigmoid, ipo, hinge")
    return losses.mean() if reduction == "mean" else losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def load_pairs(task, cfg: DPOConfig) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts: a user file (validated, DataError names the row) or the task's."""
    return load_pairs_with_report(task, cfg)[0]


def load_pairs_with_report(task, cfg: DPOConfig) -> tuple[list[tuple[str, str, str]], dict]:
    """`load_pairs` and, for a user file, its validation report ``{"dataset": {...}}`` for summary.json
    (rows dropped by reason and truncated by key under cfg.bad_rows / long_rows; see `rlhf_zoo.data`)."""
    report: dict = {}
    if cfg.dataset:
        pairs = []
        rankings, data_report = load_rankings(cfg.dataset, cfg, task, cfg.max_new_tokens or task.max_new_tokens)
        for r in rankings:
            better, worse = pair_indices(len(r.responses))
            pairs += [(r.prompt, r.responses[i], r.responses[j]) for i, j in zip(better, worse, strict=True)]
        report = data_report.metrics()
    else:
        ds = task.dataset("pairs")
        if cfg.max_pairs:  # read only the rows that are used
            ds = ds.select(range(min(cfg.max_pairs, len(ds))))
        pairs = list(zip(ds["prompt"], ds["chosen"], ds["rejected"], strict=True))
    return (pairs[: cfg.max_pairs] if cfg.max_pairs else pairs), report


@dataclass
class DPOPolicy(ModelPolicy):
    """The trained policy; its data figures (pairs used, identical pairs dropped) go to summary.json."""

    data_metrics: dict[str, Any] = field(default_factory=dict)

    def extra_metrics(self) -> dict[str, Any]:
        return dict(self.data_metrics)


@dataclass
class Pairs:
    """Encoded pairs on the device: prompts (N, P) left-padded; chosen, rejected (N, T) right-padded."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[prompts; prompts] (2B, P'), [chosen; rejected] (2B, T'); columns of padding only are trimmed."""
        p_ids, p_mask = self.prompt_ids[idx].repeat(2, 1), self.prompt_mask[idx].repeat(2, 1)
        r_ids = torch.cat([self.chosen_ids[idx], self.rejected_ids[idx]])
        r_mask = torch.cat([self.chosen_mask[idx], self.rejected_mask[idx]])
        p_keep, r_keep = p_mask.bool().any(0), r_mask.bool().any(0)
        return p_ids[:, p_keep], p_mask[:, p_keep], r_ids[:, r_keep], r_mask[:, r_keep]


def encode_pairs(task, pairs: list[tuple[str, str, str]], max_len: int, device) -> tuple[Pairs, int]:
    """Tokenise every pair once; drop the pairs whose chosen and rejected ids are identical.
    -> (pairs kept, number of identical pairs)"""
    if not pairs:
        raise DataError("no preference pairs to train on")
    prompts, chosen, rejected = map(list, zip(*pairs, strict=True))
    p_ids, p_mask = task.encode_prompts(prompts, device)
    r_ids, r_mask = task.encode_responses(chosen + rejected, max_len=max_len, device=device)  # (2N, T)
    c_ids, x_ids, c_mask, x_mask = *r_ids.chunk(2), *r_mask.chunk(2)
    same = ((c_ids == x_ids) & (c_mask == x_mask)).all(-1)  # (N,); both pad with the same id
    keep = ~same
    if not keep.any():
        raise DataError(f"all {len(pairs)} preference pairs have identical chosen and rejected responses")
    out = Pairs(p_ids[keep], p_mask[keep], c_ids[keep], c_mask[keep], x_ids[keep], x_mask[keep])
    return out, int(same.sum())


def pair_logprobs(model, pairs: Pairs, idx: torch.Tensor, suppress_ids) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log pi(y_w|x), log pi(y_l|x) (B,) each, from ONE forward of chosen and rejected; and the tokens."""
    p_ids, p_mask, r_ids, r_mask = pairs.batch(idx)
    lp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, LOGPROB_TEMPERATURE, suppress_ids)  # (2B, T)
    seq = masked_sum(lp, r_mask, dim=-1)  # (2B,)
    chosen, rejected = seq.chunk(2)
    return chosen, rejected, int(p_mask.sum() + r_mask.sum())


@torch.no_grad()
def reference_logprobs(reference, pairs: Pairs, suppress_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref of every chosen and rejected response, computed once.  -> (N,), (N,)
    Pairs go through in order of length, so each batch holds rows of similar width (less padding)."""
    length = pairs.prompt_mask.sum(-1) + torch.maximum(pairs.chosen_mask.sum(-1), pairs.rejected_mask.sum(-1))
    order = torch.argsort(length, stable=True)
    out = [pair_logprobs(reference, pairs, idx, suppress_ids)[:2] for idx in order.split(REFERENCE_BATCH)]
    chosen, rejected = torch.empty(len(pairs), device=order.device), torch.empty(len(pairs), device=order.device)
    chosen[order], rejected[order] = torch.cat([c for c, _ in out]), torch.cat([r for _, r in out])
    return chosen, rejected


def chosen_rows(pairs: Pairs) -> list:
    """One `rlhf_zoo.training.LMRow` per pair: its prompt and chosen response, exactly the tokens DPO scores
    (prompt with BOS by the tokenizer's rule, response cut at the length cap, EOS included), loss on the response."""
    rows = []
    for p_ids, p_mask, c_ids, c_mask in zip(pairs.prompt_ids.tolist(), pairs.prompt_mask.tolist(),
                                            pairs.chosen_ids.tolist(), pairs.chosen_mask.tolist(), strict=True):
        rows.append(lm_row([t for t, m in zip(p_ids, p_mask, strict=True) if m],
                           [t for t, m in zip(c_ids, c_mask, strict=True) if m]))
    return rows


def sft_on_chosen(policy: torch.nn.Module, pairs: Pairs, task, cfg: DPOConfig, seed: int, progress: bool = False,
                  on_step=None) -> list[float]:
    """Fine-tune ``policy`` in place for ``cfg.sft_steps`` steps on the pairs' chosen responses (implementation
    detail 10): a deterministic function of the weights, the pairs and ``seed``. Returns every step's loss."""
    return train_lm(policy, chosen_rows(pairs), pad_id=task.pad_token_id, steps=cfg.sft_steps,
                    batch_size=cfg.sft_batch_size, lr=cfg.sft_learning_rate, seed=seed, desc="sft on chosen",
                    suppress_ids=task.suppress_ids, progress=progress, on_step=on_step)


def _chosen_nll(logprobs_chosen: torch.Tensor, pairs: Pairs) -> float:
    """Mean token NLL of the chosen responses from their sequence log-probs (N,)."""
    return float(-logprobs_chosen.sum() / pairs.chosen_mask.sum())


def train(ctx, cfg: DPOConfig) -> DPOPolicy:
    task, policy, beta = ctx.task, ctx.policy, ctx.beta
    # 1) data: tokenise once, count and drop pairs that carry no preference
    texts, data_report = load_pairs_with_report(task, cfg)
    pairs, identical = encode_pairs(task, texts, ctx.max_new_tokens, ctx.device)
    sft_metrics: dict = {}
    if cfg.sft_steps:  # SFT-then-DPO (implementation detail 10): the SFT'd model is the start and the reference
        with ctx.phase("sft"):
            policy.eval()
            nll_before = _chosen_nll(reference_logprobs(policy, pairs, task.suppress_ids)[0], pairs)

            def count(step: int, loss: float, tokens: int) -> None:
                if ctx.dist.is_main:  # every rank trains on the whole batch: count its tokens once
                    ctx.counters["trained_tokens"] += tokens

            losses = sft_on_chosen(policy, pairs, task, cfg, ctx.seed, ctx.show_progress, count)
            # the reference of the DPO loss AND of the runner's final evaluation (baseline_*, kl_to_ref)
            ctx.reference = copy.deepcopy(policy).requires_grad_(False).eval()
    # 2) reference log-probs of the whole dataset, once
    with ctx.phase("reference"):
        ref_chosen, ref_rejected = reference_logprobs(ctx.reference, pairs, task.suppress_ids)
    if cfg.sft_steps:
        sft_metrics = {
            "reference_model": f"sft-on-chosen: the starting policy after {cfg.sft_steps} SFT steps on the pairs' "
                               "chosen responses (the DPO reference; the baseline_* figures and kl_to_ref are its)",
            "sft_on_chosen": {"steps": cfg.sft_steps, "batch_size": cfg.sft_batch_size,
                              "learning_rate": cfg.sft_learning_rate, "rows": len(pairs), "first_loss": losses[0],
                              "last_loss": losses[-1], "nll_chosen_before": nll_before,
                              "nll_chosen_after": _chosen_nll(ref_chosen, pairs)}}
    # 3) optimiser and schedule: linear warmup, then linear decay to 0
    per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    warm = min(cfg.warmup_steps, total - 1)
    opt = adamw(policy.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / (warm + 1), (total - s) / (total - warm)))
    order = Shuffler(len(pairs), cfg.batch_size, ctx.seed, ctx.device)
    for name, obj in (("optimizer", opt), ("scheduler", sched), ("pair_order", order)):
        ctx.track(name, obj)
    policy.train()
    term = f"{cfg.loss_type} loss" + (" + rpo_alpha * nll" if cfg.rpo_alpha else "")
    # 4) shuffled epochs of pairs; chosen and rejected in one forward per micro-batch; this rank's shard
    #    of each batch (implementation detail 9)
    for step in ctx.iterations(total):
        idx = order.next()  # the whole batch: the same on every rank
        n_pairs, n_chosen_tokens = len(idx), pairs.chosen_mask[idx].sum()
        sums = torch.zeros(7, device=ctx.device)  # loss, accuracy, margin, chosen, rejected, nll, tokens
        with ctx.phase("train"):
            local = ctx.dist.shard(idx)
            for micro in local.split(cfg.micro_batch_size or max(len(local), 1)):
                chosen, rejected, tokens = pair_logprobs(policy, pairs, micro, task.suppress_ids)
                counts = ((pairs.chosen_mask[micro].sum(-1), pairs.rejected_mask[micro].sum(-1))
                          if cfg.per_token_logratios else (None, None))  # (b,) each: implementation detail 11
                losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen[micro], ref_rejected[micro],
                                                        beta, cfg.loss_type, cfg.label_smoothing, "none", *counts)
                loss = ctx.dist.mean_loss(losses.sum(), n_pairs)  # mean over the whole batch's pairs
                if cfg.rpo_alpha:  # + alpha * mean token NLL of the whole batch's chosen responses
                    loss = loss + cfg.rpo_alpha * ctx.dist.mean_loss(-chosen.sum(), n_chosen_tokens)
                backward(loss, term)
                sums += torch.stack([losses.detach().sum(), (r_chosen > r_rejected).float().sum(),
                                     (r_chosen - r_rejected).sum(), r_chosen.sum(), r_rejected.sum(),
                                     -chosen.detach().sum(), torch.tensor(float(tokens), device=ctx.device)])
            grad_norm = optimizer_step(None, opt, MAX_GRAD_NORM, term)
            sched.step()
        ctx.counters["trained_tokens"] += int(sums[6])  # this rank's; the runner sums the ranks'
        loss_sum, correct, margin, r_c, r_r, nll_sum, _ = ctx.dist.sum(sums).tolist()
        # 5) metrics of this step (over the whole batch)
        ctx.log(step, {"loss": loss_sum / n_pairs, "reward_accuracy": correct / n_pairs,
                       "reward_margin": margin / n_pairs, "reward_chosen": r_c / n_pairs,
                       "reward_rejected": r_r / n_pairs, "nll_chosen": nll_sum / n_chosen_tokens.item(),
                       "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
                       "epoch": (step - 1) / per_epoch, "pairs": len(pairs), "identical_pairs": identical})
    policy.eval()
    return DPOPolicy(policy, data_metrics={"pairs": len(pairs), "identical_pairs": identical, **data_report,
                                           **sft_metrics})


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("dpo", DPOConfig, train,
                       "Direct Preference Optimization on preference pairs (sigmoid, IPO, hinge, cDPO).",
                       data_parallel=True))
