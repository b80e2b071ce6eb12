"""``rrhf``: Rank Responses to align language models with Human Feedback (Yuan et al. 2023,
arXiv:2304.05302).

For each prompt x, k candidates y_1..y_k are scored by the reward model (r_i) and by the policy itself,
with the LENGTH-NORMALISED log-likelihood (Eq. 1)

    p_i = 1/|y_i| * sum_t log pi(y_i,t | x, y_i,<t)                       (a mean log-prob, <= 0)

The policy is trained to order its scores like the reward model does, and to imitate the best candidate:

    L_rank = sum_{r_i < r_j} max(0, p_i - p_j)                            (Eq. 2)
    L_ft   = -1/|y_b| * sum_t log pi(y_b,t | x, y_b,<t),  b = argmax_i r_i  (Eq. 3, as a token mean;
                                                                            ft_reduction sum: Eq. 3 as written)
    L      = rank_weight * L_rank + ft_weight * L_ft [+ kl_coef * KL]      (Eq. 4: both weights 1)

``rank_weight = 0`` is the paper's ablation without the ranking loss: learning from best-of-N (fine-tune
on the reward model's best of the k candidates).

Candidates (``--candidates``, sources with counts, e.g. ``sample:4,beam:2,diverse-beam:2,dataset:2``; the
paper's Table 1 mixes them the same way; a bare number N is ``sample:N``, the old form):
  - ``sample:N``: N samples of the policy at the temperature (`rlhf_zoo.rollout.collect`);
  - ``beam:N``: the N most probable responses that beam search with max(N, ``beam_width``) beams finds
    (`rlhf_zoo.beam.beam_search`, scores are log pi(y|x) at the temperature, no length normalisation);
  - ``diverse-beam:N``: diverse beam search (Vijayakumar et al. 2016), N beams in ``beam_groups`` groups
    with a Hamming penalty ``diversity_penalty`` between groups; all N are kept;
  - ``dataset:N``: N responses of one of the task's rankings of the prompt (SFT samples the labelers
    ranked), spread from the best to the worst (``dataset:2`` is a chosen/rejected pair; a bare
    ``dataset``: the whole ranking); prompts are then drawn among those the dataset has. The labelers'
    order is unused: every candidate is scored by the same environment. ``--dataset-candidates`` (the old
    flag) appends a bare ``dataset``.
Every candidate goes through the ``ResponseGen`` vector environment (`ctx.make_env`, `env.step_tensors`):
its score is the reward model's minus the missing-EOS penalty. The deterministic sources have no
behaviour log-probs; they are submitted with zeros (only the scores are used).

Rounds (``--rounds``): 0 (the default) is online, each iteration's candidates come from the current
policy. ``rounds = n`` is the paper's iterated policy IP-n: the iterations are split into n rounds and a
round's candidates come from a frozen copy of the policy taken when the round began (round 1: the SFT
policy, the paper's plain RRHF); sampling that copy afresh each iteration stands for the paper's one
candidate set per round. ``kl_coef`` adds, from the second round on (online: from the second
iteration), kl_coef * KL(pi || pi_ref) with KL the exact per-position divergence of the next-token
distributions, summed over each candidate's tokens and averaged over candidates, against the run's
reference (the SFT policy); the paper adds a KL term from IP-2 on.

Implementation details:
  1. p_i uses the log-probs at the sampling temperature with the task's suppressed ids, as everywhere;
  2. only strictly ordered pairs count: equal scores (e.g. two identical responses) make no pair;
     L_rank is summed over the pairs of a prompt (as in the paper) and averaged over prompts;
  3. the best candidate is the first of the highest score (``argmax`` returns the first maximum);
  4. without ``kl_coef`` there is no reference model in the loss (the point of RRHF: one to two models);
     the environment still computes the KL to the reference, which is logged for the samples;
  5. AdamW at a constant learning rate, gradients clipped to norm 1; ``epochs`` full-batch steps on each
     iteration's candidates; logged statistics are those of the first step (before this batch's updates);
  6. defaults, tuned on ``sentiment`` and ``hh`` (seeds 0-2). With online samples the hinge term (a sum
     over C(k,2) pairs) dominates at the paper's ft_weight = 1: on ``sentiment`` it learns little at lr
     1e-4 and degenerates at lr >= 3e-4 (KL to SFT > 10, gold below the SFT's); on ``hh`` it collapses
     at lr 1e-4. ft_weight = 10 is stable; the gain then comes mostly from the fine-tuning term. With no
     KL term the budget (lr x steps) is the only brake on reward hacking: on ``hh`` the policy collapses
     to one generic answer the proxy RM likes (KL > 8, gold below SFT) at lr >= 1.5e-4 for 40
     iterations, while ``sentiment`` would gain more from lr 2e-4 (gold +0.85 instead of +0.4).
     Dataset candidates are off by default: added to 4 samples they lowered the gold gain over SFT
     (``sentiment`` +0.35 vs +0.43, ``hh`` +0.05 vs +0.29, means of seeds 0-2) and at lr >= 2e-4
     collapsed ``sentiment`` on 1 seed in 3: the task's responses are SFT samples the policy soon
     outscores, so the hinge keeps lowering the likelihood of fluent SFT text.
  7. sources and ablation (benchmarks/results/rrhf_candidates.md, ``sentiment``, seeds 0-2, gold gain over
     SFT / KL to SFT): sample:4 +0.43 / 0.49; dataset alone +0.31 / 0.15; sample:2,dataset:2 +0.40 / 0.27;
     beam:4 +0.06 / 1.9 (the most probable responses over-sharpen the policy); diverse-beam:4 +0.29 / 1.7;
     without the ranking loss (best-of-4) +0.31 / 0.77, so the ranking loss matters, as in the paper;
     IP-4 +0.39 / 0.34, with kl_coef 0.1 +0.37 / 0.30.
  8. L_ft's reduction (``ft_reduction``): the paper's Eq. 3 sums the best candidate's token log-probs;
     the authors' code takes the mean over the padded batch width (the sum divided by one width per
     batch); the zoo's default is the mean over the best candidate's own tokens, the scale at which
     ft_weight (detail 6) was tuned and the committed results were run. ``sum`` is Eq. 3 as written: the
     fine-tune gradient then grows with the response length (about |y_b| times the mean's), so ft_weight
     means something else. The ranking term's p_i is length-normalised in the paper and the code alike
     (the code's length_penalty exponent defaults to 1), so it has no option.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from rlhf_zoo.beam import beam_search
from rlhf_zoo.config import AlgoConfig, check_positive, option
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.ops import masked_mean, masked_sum, position_ids_from_mask, response_logprobs
from rlhf_zoo.ops.logprobs import adjust_logits, pack_rows
from rlhf_zoo.policy import ModelPolicy
from rlhf_zoo.registry import Algorithm
from rlhf_zoo.rollout import collect, draw_prompts
from rlhf_zoo.training import adamw, optimizer_step

MAX_GRAD_NORM = 1.0
SOURCES = ("sample", "beam", "diverse-beam", "dataset")


def parse_candidates(spec: str | int) -> list[tuple[str, int]]:
    """``"sample:4,beam:2,diverse-beam:2,dataset:2"`` -> [(source, count), ...] in the order given.

    A bare number N (or the int N) is ``sample:N``; a bare ``dataset`` has count 0, meaning the whole
    ranking. Unknown sources, repeated sources and counts < 1 raise `ConfigError`."""
    if isinstance(spec, int):
        spec = str(spec)
    text = spec.strip()
    if text.lstrip("-").isdigit():
        text = f"sample:{text}"
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(",")):
        name, _, count = part.partition(":")
        name = name.strip()
        if name not in SOURCES:
            raise ConfigError(f"candidates: unknown source {name!r} in {spec!r}; known: {', '.join(SOURCES)} "
                              "(e.g. sample:4,beam:2,diverse-beam:2,dataset:2)")
        if name in dict(out):
            raise ConfigError(f"candidates: source {name!r} given twice in {spec!r}")
        if not count.strip() and name == "dataset":
            out.append((name, 0))
            continue
        try:
            k = int(count)
        except ValueError:
            raise ConfigError(f"candidates: {part!r} needs a count, as {name}:N") from None
        if k < 1:
            raise ConfigError(f"candidates: the count of {name!r} must be >= 1, got {k}")
        out.append((name, k))
    return out


@dataclass(frozen=True)
class RRHFConfig(AlgoConfig):
    presets = {"quick": {"eval_prompts": 64, "eval_samples": 2},  # training already takes seconds
               "smoke": {"iterations": 2, "prompts_per_iteration": 2, "candidates": 2, "epochs": 1,
                         "eval_prompts": 2, "eval_samples": 1}}

    candidates: str | int = option(
        4, "Candidates per prompt, as sources with counts: sample:N (the policy's samples at the "
                    "temperature), beam:N (the N most probable responses beam search finds), diverse-beam:N "
                    "(diverse beam search: N beams in --beam-groups groups), dataset:N (N responses of one of "
                    "the task's rankings of the prompt, best to worst; dataset:2 is a chosen/rejected pair; "
                    "a bare `dataset`: all of them), comma-separated, e.g. sample:4,beam:2,diverse-beam:2,"
                    "dataset:2. A bare number N means sample:N (the default 4 is sample:4).")
    prompts_per_iteration: int = option(16, "Prompts per iteration (each gets its candidates).")
    iterations: int = option(40, "Candidate-score-train iterations (no KL term: more drifts further from SFT).")
    epochs: int = option(2, "Full-batch gradient steps on each iteration's candidates.")
    learning_rate: float = option(1e-4, "AdamW learning rate (constant).")
    ft_weight: float = option(10.0, "Weight of the cross-entropy on the reward model's best candidate (paper: 1, "
                                    "which the hinge destabilises with online samples).")
    ft_reduction: Literal["mean", "sum"] = option(
        "mean", "How the cross-entropy on the best candidate reduces its tokens: mean (1/|y| sum over its tokens, "
                "the scale ft_weight was tuned at) or sum (the paper's Eq. 3 as written; the gradient then grows "
                "with the response length).")
    rank_weight: float = option(1.0, "Weight of the ranking (hinge) loss; 0 gives learning from best-of-N: only "
                                     "the cross-entropy on the best candidate.")
    rounds: int = option(0, "0: online, every iteration's candidates come from the current policy. n: IP-n, "
                            "the paper's iterated policy: n rounds of iterations/n iterations, each taking its "
                            "candidates from the policy as it was when the round began (round 1: the SFT policy).")
    kl_coef: float = option(0.0, "Weight of a KL(policy || reference) term from the second round on (online: the "
                                 "second iteration): the exact next-token KL at each candidate position, summed "
                                 "over a candidate's tokens, averaged over candidates.")
    beam_width: int = option(0, "Beams searched for beam:N: max(N, beam_width); the N most probable are kept.")
    beam_groups: int = option(2, "Groups of diverse-beam:N (they must divide N).")
    diversity_penalty: float = option(1.0, "Hamming diversity penalty of diverse beam search: subtracted from a "
                                           "token's log-prob per beam of an earlier group that took it at this step.")
    dataset_candidates: bool = option(False, "Old form of adding `dataset` to --candidates (the whole ranking of "
                                             "one of the prompt's rankings; prompts are then drawn among those "
                                             "the dataset has).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "prompts_per_iteration", "iterations", "epochs", "learning_rate", "beam_groups")
        for name in ("ft_weight", "rank_weight", "kl_coef", "diversity_penalty", "beam_width", "rounds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        sources = self.sources()  # validates the spec
        counts = dict(sources)
        if "diverse-beam" in counts and counts["diverse-beam"] % self.beam_groups:
            raise ConfigError(f"candidates: diverse-beam:{counts['diverse-beam']} must be a multiple of "
                              f"beam_groups={self.beam_groups}")
        total = sum(k if k else 2 for k in counts.values())  # a whole ranking has >= 2 responses
        if total < 2:
            raise ConfigError(f"ranking needs >= 2 candidates per prompt, got candidates={self.candidates!r}")
        if self.rounds > self.iterations:
            raise ConfigError(f"rounds ({self.rounds}) must not exceed iterations ({self.iterations})")
        if self.rank_weight == 0 and self.ft_weight == 0 and self.kl_coef == 0:
            raise ConfigError("rank_weight, ft_weight and kl_coef are all 0: the loss would be 0")

    def sources(self) -> list[tuple[str, int]]:
        """The candidate sources and counts (a bare ``dataset`` has count 0: the whole ranking)."""
        out = parse_candidates(self.candidates)
        if self.dataset_candidates:
            if "dataset" in dict(out):
                raise ConfigError("dataset_candidates and a `dataset` source in candidates: give only one")
            out.append(("dataset", 0))
        return out


def rrhf_loss(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, ft_weight: float = 1.0,
              rank_weight: float = 1.0, ft_reduction: Literal["mean", "sum"] = "mean",
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RRHF loss of B prompts with K candidates each.

    Args:
        logprobs: (B, K, T) per-token log-probs of the candidates under the policy.
        mask: (B, K, T) 1 on real response tokens.
        scores: (B, K) reward-model scores r_i.
        ft_weight: weight of the cross-entropy on the best candidate.
        rank_weight: weight of the hinge ranking loss (0: learning from best-of-N).
        ft_reduction: the cross-entropy's reduction over the best candidate's tokens, mean or sum
            (implementation detail 8).

    Returns:
        the loss (mean over prompts) and detached statistics: rank_loss, ft_loss, correct_pairs (fraction of
        ordered pairs the model already orders strictly like the reward model), pairs (their number).
    """
    p = masked_mean(logprobs, mask, dim=-1)  # (B, K) Eq. 1, length-normalised
    ordered = scores[:, :, None] < scores[:, None, :]  # (B, K, K) [b, i, j]: r_i < r_j; ties: no pair
    rank = masked_sum(torch.relu(p[:, :, None] - p[:, None, :]), ordered, dim=(1, 2))  # (B,) Eq. 2
    best = scores.argmax(-1)  # (B,) first maximum on ties
    rows = torch.arange(scores.shape[0], device=scores.device)
    if ft_reduction == "mean":
        ft = -masked_mean(logprobs[rows, best], mask[rows, best], dim=-1)  # (B,) Eq. 3, per token
    elif ft_reduction == "sum":
        ft = -masked_sum(logprobs[rows, best], mask[rows, best], dim=-1)  # (B,) Eq. 3 as written
    else:
        raise ValueError(f"unknown ft_reduction {ft_reduction!r}; known: mean, sum")
    loss = (rank_weight * rank + ft_weight * ft).mean()  # Eq. 4
    pairs = ordered.sum()
    correct = (ordered & (p[:, :, None] < p[:, None, :])).sum()
    stats = {"rank_loss": rank.mean().detach(), "ft_loss": ft.mean().detach(),
             "correct_pairs": (correct / pairs.clamp(min=1)).detach(), "pairs": pairs}
    return loss, stats


def logprobs_and_kl(model: torch.nn.Module, reference: torch.nn.Module, prompt_ids: torch.Tensor,
                    prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
                    temperature: float = 1.0, suppress_ids: Any = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the responses under ``model`` (as `response_logprobs`) and the exact KL of
    the next-token distributions, KL(model(.|x, y_<t) || reference(.|x, y_<t)), at each response
    position; both (B, T), 0 off the mask. Gradients flow through ``model`` only."""
    ids, mask, _ = pack_rows(torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1))
    pos = position_ids_from_mask(mask)
    logp = torch.log_softmax(adjust_logits(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1],
                                           temperature, suppress_ids), -1)  # (B, L - 1, V)
    with torch.no_grad():
        ref = torch.log_softmax(adjust_logits(reference(input_ids=ids, attention_mask=mask, position_ids=pos)
                                              .logits[:, :-1], temperature, suppress_ids), -1)
    finite = torch.isfinite(logp) & torch.isfinite(ref)  # suppressed ids: -inf in both, probability 0
    zero = torch.zeros((), device=logp.device)
    kl = (logp.exp() * (torch.where(finite, logp, zero) - torch.where(finite, ref, zero))).sum(-1)  # (B, L - 1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L - 1)
    T = response_ids.shape[1]
    cols = (prompt_mask.sum(-1, keepdim=True) - 1 + torch.arange(T, device=ids.device)).clamp(0, tok.shape[1] - 1)
    on = response_mask.bool()
    return torch.where(on, tok.gather(1, cols), zero), torch.where(on, kl.gather(1, cols), zero)


def dataset_responses(task: Any) -> dict[str, list[list[str]]]:
    """prompt -> the response lists of the task's rankings of that prompt (first reward model's data)."""
    name = f"rankings_{task.reward_models[0]}" if task.reward_models else "rankings_reward"
    try:
        ds = task.dataset(name)
    except ConfigError as e:
        raise ConfigError(f"the candidate source `dataset` needs the world's rankings ({name}), which it does not "
                          f"have ({e}); use sample, beam or diverse-beam") from None
    out: dict[str, list[list[str]]] = {}
    for prompt, responses in zip(ds["prompt"], ds["responses"], strict=True):
        out.setdefault(prompt, []).append(list(responses))
    return out


def spread(ranking: list[str], count: int) -> list[str]:
    """``count`` responses of a ranking (best first), evenly from the best to the worst: 1 -> the best,
    2 -> the best and the worst (chosen / rejected), len(ranking) -> all of them."""
    return [ranking[i] for i in np.linspace(0, len(ranking) - 1, count).round().astype(int)]


def _grouped(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.view(n, -1, *x.shape[1:])


def train(ctx: Any, cfg: RRHFConfig) -> ModelPolicy:
    task, model = ctx.task, ctx.policy
    n = cfg.prompts_per_iteration
    sources = cfg.sources()
    counts = dict(sources)
    rng = np.random.default_rng(ctx.seed)
    prompts = task.prompts("train")
    # 1) the prompt pool: all training prompts, or those the dataset has responses for
    pool = np.arange(len(prompts))
    if "dataset" in counts:
        data = dataset_responses(task)
        pool = np.array([i for i, p in enumerate(prompts) if p in data])
        if not len(pool):
            raise ConfigError(f"candidates: dataset: no training prompt of task {task.name!r} is in its dataset")
        shortest = min(len(r) for i in pool for r in data[prompts[i]])
        counts["dataset"] = counts["dataset"] or shortest
        if counts["dataset"] > shortest:
            raise ConfigError(f"candidates: dataset:{counts['dataset']}, but some rankings of task {task.name!r} "
                              f"have only {shortest} responses")
    k_sample = counts.get("sample", 0)
    k_fixed = sum(k for s, k in counts.items() if s != "sample")  # beam, diverse-beam and dataset rows
    env = ctx.make_env(n * k_sample) if k_sample else None
    fixed_env = ctx.make_env(n * k_fixed) if k_fixed else None
    # the model candidates come from: the policy itself (online), or a frozen copy per round (IP-n)
    sampler = model if not cfg.rounds else copy.deepcopy(model).requires_grad_(False).eval()
    opt = adamw([q for q in model.parameters() if q.requires_grad], lr=cfg.learning_rate)
    ctx.track("optimizer", opt)
    ctx.track("prompt_rng", rng)
    if cfg.rounds:
        ctx.track("sampler", sampler)

    def round_of(it: int) -> int:  # 0-based round of iteration it (1-based); online: every iteration is a round
        return (it - 1) * cfg.rounds // cfg.iterations if cfg.rounds else it - 1

    for it in ctx.iterations(cfg.iterations):
        if cfg.rounds and round_of(it) != round_of(it - 1):  # a new round: candidates from the current policy
            sampler.load_state_dict(model.state_dict())
        idx = pool[draw_prompts(rng, len(pool), n, 1)]
        blocks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # source -> ids, mask, scores
        # 2) the policy's samples, scored by the environment (rows of a prompt adjacent)
        if k_sample:
            ro = collect(ctx, env, sampler, np.repeat(idx, k_sample))
            p_ids, p_mask = ro.prompt_ids[::k_sample], ro.prompt_mask[::k_sample]
            blocks["sample"] = (_grouped(ro.response_ids, n), _grouped(ro.response_mask, n), ro.scores.view(n, -1))
        # 3) beam search, diverse beam search and the dataset's responses, scored by one environment call
        if k_fixed:
            fixed_env.reset(options={"prompt_indices": np.repeat(idx, k_fixed)})
            p_ids, p_mask = fixed_env.prompt_ids[::k_fixed], fixed_env.prompt_mask[::k_fixed]
            parts = {}
            for source, k in sources:
                if source in ("beam", "diverse-beam"):
                    diverse = source == "diverse-beam"
                    was_training = sampler.training
                    sampler.eval()
                    with ctx.phase("generate"):
                        b = beam_search(sampler, p_ids, p_mask, ctx.max_new_tokens,
                                        num_beams=k if diverse else max(k, cfg.beam_width), num_return=k,
                                        num_groups=cfg.beam_groups if diverse else 1,
                                        diversity_penalty=cfg.diversity_penalty if diverse else 0.0,
                                        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
                                        temperature=cfg.temperature, suppress_ids=task.suppress_ids)
                    sampler.train(was_training)
                    ctx.counters["generated_tokens"] += int(b.response_mask.sum())
                    parts[source] = (b.response_ids, b.response_mask)
                elif source == "dataset":
                    k = counts["dataset"]
                    texts = [r for i in idx for r in spread(data[prompts[i]][rng.integers(len(data[prompts[i]]))], k)]
                    d_ids, d_mask = task.encode_responses(texts, ctx.max_new_tokens, ctx.device)
                    parts[source] = (d_ids.view(n, k, -1), d_mask.view(n, k, -1))
            T = ctx.max_new_tokens
            ids = torch.cat([torch.nn.functional.pad(i, (0, T - i.shape[-1]), value=task.pad_token_id)
                             for i, _ in parts.values()], 1).reshape(n * k_fixed, T)
            mask = torch.cat([torch.nn.functional.pad(m, (0, T - m.shape[-1])) for _, m in parts.values()],
                             1).reshape(n * k_fixed, T)
            with ctx.phase("score"):  # no behaviour log-probs: only the scores are used
                d = fixed_env.step_tensors(ids, mask, torch.zeros(ids.shape, device=ids.device))
            d_ids, d_mask, d_scores = _grouped(d["response_ids"], n), _grouped(d["response_mask"], n), d["scores"].view(n, -1)
            col = 0
            for source, (i, _) in parts.items():
                k = i.shape[1]
                blocks[source] = (d_ids[:, col : col + k], d_mask[:, col : col + k], d_scores[:, col : col + k])
                col += k
        order = [s for s, _ in sources]
        ids = torch.cat([blocks[s][0] for s in order], 1)  # (n, K, T)
        mask = torch.cat([blocks[s][1] for s in order], 1)
        scores = torch.cat([blocks[s][2] for s in order], 1)  # (n, K)
        K = ids.shape[1]
        p_ids, p_mask = p_ids.repeat_interleave(K, 0), p_mask.repeat_interleave(K, 0)  # (n * K, P)
        ids, mask = ids.reshape(n * K, -1), mask.reshape(n * K, -1)  # (n * K, T)
        with_kl = cfg.kl_coef > 0 and round_of(it) >= 1
        # 4) rank + fine-tune (+ KL) steps on this batch
        model.train()
        with ctx.phase("train"):
            for epoch in range(cfg.epochs):
                if with_kl:
                    lp, kl_tok = logprobs_and_kl(model, ctx.reference, p_ids, p_mask, ids, mask, cfg.temperature,
                                                 task.suppress_ids)
                else:
                    lp = response_logprobs(model, p_ids, p_mask, ids, mask, cfg.temperature, task.suppress_ids)
                loss, stats = rrhf_loss(lp.view(n, K, -1), mask.view(n, K, -1), scores, cfg.ft_weight,
                                        rank_weight=cfg.rank_weight, ft_reduction=cfg.ft_reduction)
                if with_kl:
                    kl_term = masked_sum(kl_tok, mask, dim=-1).mean()
                    loss = loss + cfg.kl_coef * kl_term
                    stats["kl_term"] = kl_term.detach()
                optimizer_step(loss, opt, MAX_GRAD_NORM, "rrhf loss")
                ctx.counters["trained_tokens"] += int(p_mask.sum() + mask.sum())
                if epoch == 0:
                    first = {"loss": loss.detach(), **stats}
        model.eval()
        # 5) log
        metrics = {**first, "mean_score": scores.mean(), "best_score": scores.max(-1).values.mean(),
                   "response_length": mask.sum(-1).float().mean()}
        for source in order:
            metrics[f"score_{source.replace('-', '_')}"] = blocks[source][2].mean()
        if k_sample:  # the sampling policy's KL to the reference, on its samples
            metrics["kl"] = masked_sum(ro.logprobs - ro.ref_logprobs, ro.response_mask, dim=-1).mean()
        if cfg.rounds:
            metrics["round"] = round_of(it) + 1
        ctx.log(it, metrics)
    for e in (env, fixed_env):
        if e is not None:
            e.close()
    return ModelPolicy(model)


@hookimpl
def register_algorithms(register) -> None:
    register(Algorithm("rrhf", RRHFConfig, train,
                       "RRHF: rank k candidates (policy samples, beam search, diverse beam search, dataset "
                       "responses) by the reward model (hinge on length-normalised log-probs) plus cross-entropy "
                       "on the best."))
