"""Batched beam search and diverse beam search with a KV cache, in the conventions of the decode loop.

`beam_search` decodes every (left-padded) prompt row with W beams at once: one forward over the prompts
fills the cache, which is then repeated W times (``DynamicCache.batch_repeat_interleave``); each step is
one single-token forward over the B * W live beams followed by a reorder of the cache to the beams kept
(``DynamicCache.reorder_cache``). As in `rlhf_zoo.generation.sample`: position ids come from the mask,
log-probs are fp32 through `rlhf_zoo.ops.logprobs.adjust_logits` (temperature, suppressed ids at -inf),
EOS ends a hypothesis (it is part of the response, mask 1), one that reaches the length cap is cut off
without EOS, and nothing treats ``id == pad`` as padding.

A hypothesis' score is the sum of its tokens' log-probs, log pi(y|x) at the temperature (no length
normalisation), so ``beam`` returns the most probable responses it finds. The search is the usual one
(as transformers' with ``length_penalty=0``, ``early_stopping="never"``): at each step the 2W best
continuations of the W live beams are ranked; those ending in EOS enter a pool that keeps the W best
finished hypotheses, the best W others stay live. A prompt is done when its pool is full and no live
beam scores above the pool's worst (scores only fall as a beam grows); at the length cap the live beams
join the pool as cut-off hypotheses. Beam search is a heuristic, but with W at least the number of
responses of non-zero probability it is exhaustive (tests/test_beam.py checks it against brute-force
enumeration on ``exact``).

Diverse beam search (Vijayakumar et al. 2016, "Diverse Beam Search"): the W beams form G groups of
W / G, each a beam search with its own pool, searched one after another at each step; group g's scores
are its log-probs minus ``diversity_penalty`` times the number of beams of groups 0..g-1 that took the
same token at this step (the Hamming diversity term). A group's choices at a step are its live beams'
tokens and the EOS of the hypotheses that entered its pool, so groups also pay for ending at the same
step. A group ranks its hypotheses by the penalised cumulative score, as the paper and transformers'
group beam search do; the returned ``scores`` and ``logprobs`` are the plain log-probs. Group 0 is a
plain beam search of width W / G.

transformers 5.24's ``generate(num_beams=...)`` does ``beam`` too; its group beam search
(``num_beam_groups``) moved to a Hub repository of remote code (``transformers-community/
group-beam-search``), which this offline project does not load. `benchmarks/rrhf_candidates.py` times
this search against ``generate`` on the same batch; docs/decisions.md has the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlhf_zoo.accel import cached_weight_casts
from rlhf_zoo.ops.kv_cache import cached_forward
from rlhf_zoo.ops.logprobs import adjust_logits
from rlhf_zoo.ops.masking import position_ids_from_mask


@dataclass
class Beams:
    """The hypotheses returned for B prompts, n per prompt: the best n / G of each group, groups in
    order, best first within a group.  Tensors (B, n, T) except ``scores`` and ``finished`` (B, n)."""

    response_ids: torch.Tensor
    response_mask: torch.Tensor  # 1 on real response tokens, EOS included
    logprobs: torch.Tensor  # per-token log-probs at the temperature, 0 where the mask is 0
    scores: torch.Tensor  # log pi(y|x) at the temperature: the sum of ``logprobs``
    finished: torch.Tensor  # True where the hypothesis ends in EOS (False: cut off at the length cap)


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    num_beams: int,
    eos_token_id: int,
    pad_token_id: int,
    num_return: int | None = None,
    num_groups: int = 1,
    diversity_penalty: float = 0.0,
    temperature: float = 1.0,
    suppress_ids: Sequence[int] = (),
) -> Beams:
    """Beam search (``num_groups=1``) or diverse beam search over left-padded prompts (B, P).

    Args:
        num_beams: W, the beams per prompt over all groups (each group keeps W / G live beams and a pool
            of its W / G best finished hypotheses).
        num_return: n <= W hypotheses returned per prompt (default W), n / G from each group.
        num_groups: G, which divides W and n.
        diversity_penalty: lambda >= 0 of the Hamming diversity term between groups.

    Raises ValueError on inconsistent sizes, and when a prompt has fewer than n responses of non-zero
    probability (on a toy vocabulary).
    """
    B, W, G = prompt_ids.shape[0], num_beams, num_groups
    n = W if num_return is None else num_return
    if W < 1 or G < 1 or W % G or n < 1 or n > W or n % G or max_new_tokens < 1 or diversity_penalty < 0:
        raise ValueError(f"beam_search needs num_groups dividing num_return <= num_beams and num_beams, "
                         f"max_new_tokens >= 1 and diversity_penalty >= 0; got num_beams={W}, num_return={n}, "
                         f"num_groups={G}, max_new_tokens={max_new_tokens}, diversity_penalty={diversity_penalty}")
    Wg, T, device = W // G, max_new_tokens, prompt_ids.device
    with cached_weight_casts(device.type):
        cache = DynamicCache()
        attn = prompt_mask.long()
        logits = cached_forward(model, input_ids=prompt_ids, attention_mask=attn,
                                position_ids=position_ids_from_mask(attn), cache=cache)[:, -1]  # (B, V)
        V = logits.shape[-1]
        if V < 2:
            raise ValueError("beam_search needs a vocabulary of at least 2 tokens")
        cache.batch_repeat_interleave(W)  # prompt b's beams are rows b * W .. b * W + W - 1, group-major
        logits = logits.repeat_interleave(W, 0)  # (B * W, V)
        attn = attn.repeat_interleave(W, 0)
        next_pos = attn.sum(-1, keepdim=True)  # (B * W, 1): every live beam of a prompt is at the same position
        # live beams: selection score (penalised in diverse search), plain log-prob; one live beam per group at first
        score = torch.full((B, G, Wg), float("-inf"), device=device)
        score[:, :, 0] = 0.0
        total = score.clone()
        ids = torch.full((B * W, T), pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((B * W, T), dtype=torch.float32, device=device)
        # pools of finished hypotheses, per group
        pool_score = torch.full((B, G, Wg), float("-inf"), device=device)
        pool_total = pool_score.clone()
        pool_ids = torch.full((B, G, Wg, T), pad_token_id, dtype=torch.long, device=device)
        pool_lp = torch.zeros((B, G, Wg, T), dtype=torch.float32, device=device)
        pool_len = torch.zeros((B, G, Wg), dtype=torch.long, device=device)
        pool_eos = torch.zeros((B, G, Wg), dtype=torch.bool, device=device)
        base = torch.arange(B, device=device)[:, None] * W  # (B, 1)

        def merge(g: int, c_score: torch.Tensor, c_total: torch.Tensor, c_ids: torch.Tensor, c_lp: torch.Tensor,
                  length: int, eos: bool) -> torch.Tensor:
            """Keep group g's Wg best of its pool and the candidates (B, C) (-inf: not a candidate).
            -> (B, C) True where a candidate entered the pool."""
            s = torch.cat([pool_score[:, g], c_score], 1)  # (B, Wg + C)
            keep = s.topk(Wg, dim=-1).indices  # (B, Wg), sorted
            C = c_score.shape[1]

            def sel(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
                both = torch.cat([old, new], 1)
                return both.gather(1, keep.view(B, Wg, *([1] * (both.dim() - 2))).expand(B, Wg, *both.shape[2:]))

            pool_score[:, g], pool_total[:, g] = sel(pool_score[:, g], c_score), sel(pool_total[:, g], c_total)
            pool_ids[:, g], pool_lp[:, g] = sel(pool_ids[:, g], c_ids), sel(pool_lp[:, g], c_lp)
            pool_len[:, g] = sel(pool_len[:, g], torch.full((B, C), length, dtype=torch.long, device=device))
            pool_eos[:, g] = sel(pool_eos[:, g], torch.full((B, C), eos, dtype=torch.bool, device=device))
            entered = torch.zeros((B, Wg + C), dtype=torch.bool, device=device).scatter_(1, keep, True)[:, Wg:]
            return entered & c_score.isfinite()

        for t in range(T):
            logp = torch.log_softmax(adjust_logits(logits, temperature, suppress_ids), dim=-1).view(B, G, Wg, V)
            chosen = torch.zeros((B, V), device=device)  # live beams of earlier groups that took each token
            beam_idx = torch.empty((B, G, Wg), dtype=torch.long, device=device)
            new_token = torch.empty((B, G, Wg), dtype=torch.long, device=device)
            for g in range(G):
                cand = logp[:, g]  # (B, Wg, V)
                if g and diversity_penalty:
                    cand = cand - diversity_penalty * chosen[:, None, :]
                top, flat = (score[:, g, :, None] + cand).reshape(B, Wg * V).topk(2 * Wg, dim=-1)  # (B, 2Wg)
                src, token = flat // V, flat % V  # parent beam within the group, token
                plain = total[:, g].gather(1, src) + logp[:, g].reshape(B, Wg * V).gather(1, flat)
                rows = base + g * Wg + src  # (B, 2Wg) global rows of the parents
                hyp_ids, hyp_lp = ids[rows].clone(), logprobs[rows].clone()  # (B, 2Wg, T)
                hyp_ids[..., t], hyp_lp[..., t] = token, logp[:, g].reshape(B, Wg * V).gather(1, flat)
                is_eos = token == eos_token_id
                # EOS continuations go to the pool; the best Wg others stay live (there are >= Wg of them)
                pooled = merge(g, top.masked_fill(~is_eos, float("-inf")), plain, hyp_ids, hyp_lp, t + 1, True)
                live = torch.sort(is_eos.long(), dim=1, stable=True).indices[:, :Wg]  # (B, Wg), best first
                score[:, g], total[:, g] = top.gather(1, live), plain.gather(1, live)
                beam_idx[:, g], new_token[:, g] = rows.gather(1, live), token.gather(1, live)
                chosen.scatter_add_(1, new_token[:, g], score[:, g].isfinite().float())
                chosen.scatter_add_(1, token, pooled.float())  # EOS continuations that entered the pool
            flat_idx, token = beam_idx.view(-1), new_token.view(-1)
            step_lp = logp.view(B * W, V)[flat_idx].gather(-1, token[:, None]).squeeze(-1)
            ids, logprobs, attn = ids[flat_idx], logprobs[flat_idx], attn[flat_idx]
            ids[:, t], logprobs[:, t] = token, step_lp
            if t == T - 1:  # the live beams are cut off at the length cap
                for g in range(G):
                    rows = base + g * Wg + torch.arange(Wg, device=device)
                    merge(g, score[:, g], total[:, g], ids[rows], logprobs[rows], T, False)
                break
            # done: pool full and no live beam can beat its worst (scores only fall)
            if bool((pool_score[..., -1].isfinite() & (score.amax(-1) <= pool_score[..., -1])).all()):
                break
            cache.reorder_cache(flat_idx)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            logits = cached_forward(model, input_ids=ids[:, t : t + 1], attention_mask=attn, position_ids=next_pos,
                                    cache=cache)[:, -1]
            next_pos = next_pos + 1
    keep = n // G
    mask = (torch.arange(T, device=device) < pool_len[:, :, :keep, None]).long()  # (B, G, keep, T)
    out = Beams(pool_ids[:, :, :keep].reshape(B, n, T), mask.reshape(B, n, T),
                (pool_lp[:, :, :keep] * mask).reshape(B, n, T), pool_total[:, :, :keep].reshape(B, n),
                pool_eos[:, :, :keep].reshape(B, n))
    if not bool(torch.isfinite(out.scores).all()):
        raise ValueError(f"beam_search: a prompt has fewer than {n} responses of non-zero probability "
                         f"(num_beams={W}, num_groups={G}, max_new_tokens={T})")
    out.response_ids = torch.where(out.response_mask.bool(), out.response_ids, pad_token_id)
    return out
