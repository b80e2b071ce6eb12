"""A saved policy samples under plain ``model.generate`` as the zoo's sampler does (issue 14, item 6): its
generation_config.json suppresses the ids the sampler never emits and turns off transformers' default
warpers, and its tokenizer puts BOS where the zoo does. Checked exactly on ``exact``: at every step of
``generate``, the processed next-token distribution equals the sampler's for the same prefix, and every
sampled response has the probability the exact enumeration gives it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_zoo.fixtures import bpe_tokenizer, corpus
from rlhf_zoo.generation import generation_config
from rlhf_zoo.ops.logprobs import adjust_logits
from rlhf_zoo.ops.masking import position_ids_from_mask
from rlhf_zoo.runner import save_model
from rlhf_zoo.world import World, bos_once
from rlhf_zoo_envs.tasks.exact import policy_logprobs

SAMPLES_PER_PROMPT = 64
PROB_TOL = 1e-6  # fp32 softmax vs exp(log_softmax) of the same logits


@pytest.fixture(scope="module")
def saved(exact_task, tmp_path_factory):
    """The exact task's SFT policy saved as a run saves it; -> (in-memory policy, loaded model, loaded tokenizer)."""
    policy = exact_task.load_policy()
    path = tmp_path_factory.mktemp("saved") / "policy"
    save_model(policy, exact_task.tokenizer_for_saving(), path,
               generation=generation_config(exact_task, 1.0, exact_task.max_new_tokens))
    return policy, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


def _generate(model, tok, prompts, **overrides):
    """Plain ``generate`` on the saved tokenizer's batch; the processed scores of every step kept."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, num_return_sequences=SAMPLES_PER_PROMPT, output_scores=True,
                         return_dict_in_generate=True, **overrides)
    return enc, out


def _zoo_step_logprobs(policy, task, prompts, sequences, steps):
    """The sampler's next-token log-probs (`rlhf_zoo.generation.sample`: adjust_logits, log_softmax) for
    every prefix of ``sequences``, from the zoo's own prompt encoding.  -> (N, steps, V)"""
    p_ids, p_mask = task.encode_prompts([p for p in prompts for _ in range(SAMPLES_PER_PROMPT)])
    P = p_ids.shape[1]
    response = sequences[:, P:]
    alive = torch.ones_like(response)
    alive[:, 1:] = (response[:, :-1] != task.eos_token_id).cumprod(-1)  # the token at t follows no EOS
    ids, mask = torch.cat([p_ids, response], 1), torch.cat([p_mask, alive], 1)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return torch.log_softmax(adjust_logits(logits[:, P - 1 : P - 1 + steps], 1.0, task.suppress_ids), -1), alive


def test_generation_config_saved_with_the_policy(saved, exact_task):
    *_, path = saved
    cfg = json.loads((path / "generation_config.json").read_text())
    assert cfg["suppress_tokens"] == exact_task.suppress_ids == [0, 1, 3]  # pad, bos, unk
    assert (cfg["do_sample"], cfg["temperature"], cfg["top_k"], cfg["top_p"]) == (True, 1.0, 0, 1.0)
    assert cfg["max_new_tokens"] == exact_task.max_new_tokens
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]) == (
        exact_task.eos_token_id, exact_task.pad_token_id, exact_task.tokenizer.bos_token_id)


def test_generation_saved_tokenizer_encodes_prompts_as_the_zoo(saved, exact_task):
    _, _, tok, _ = saved
    prompts = exact_task.prompts("eval")
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = exact_task.encode_prompts(prompts)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    assert enc["input_ids"][:, 0].eq(exact_task.tokenizer.bos_token_id).all()
    # the task's own tokenizer is left as it was
    assert exact_task.tokenizer(prompts[0])["input_ids"][0] != exact_task.tokenizer.bos_token_id


def test_generation_plain_generate_samples_the_zoo_distribution_exactly(saved, exact_task):
    policy, model, tok, _ = saved
    prompts = exact_task.prompts("eval")
    enc, out = _generate(model, tok, prompts)
    T = exact_task.max_new_tokens
    P = enc["input_ids"].shape[1]
    steps = len(out.scores)
    assert steps <= T and out.sequences.shape[1] == P + steps
    zoo_logp, alive = _zoo_step_logprobs(policy, exact_task, prompts, out.sequences, steps)
    hf_logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # (N, steps, V)
    live = alive[:, :steps].bool()
    # 1) the next-token distribution of every step of every live row: the same numbers
    diff = (hf_logp.exp() - zoo_logp.exp())[live].abs().max().item()
    assert diff < PROB_TOL, diff
    assert torch.equal(torch.isinf(hf_logp[live]), torch.isinf(zoo_logp[live]))  # suppressed: probability 0
    # 2) every sampled response has its exact probability from the enumeration of the response space
    exact = policy_logprobs(policy, exact_task, prompts, exact_task.space)  # (X, R)
    index = {tuple(r[m.bool()].tolist()): i for i, (r, m) in enumerate(zip(exact_task.space.ids, exact_task.space.mask,
                                                                              strict=True))}
    chosen = hf_logp.gather(-1, out.sequences[:, P:, None]).squeeze(-1)
    hf_seq = torch.where(live, chosen, 0.0).sum(-1).double()
    rows = [index[tuple(r[live[n]].tolist())] for n, r in enumerate(out.sequences[:, P:])]
    zoo_seq = exact[torch.arange(len(rows)) // SAMPLES_PER_PROMPT, rows]
    assert (hf_seq - zoo_seq).abs().max().item() < 1e-5
    # 3) and the negative controls: without the suppression, or without the BOS, the numbers differ
    _, loose = _generate(model, tok, prompts, suppress_tokens=None)
    assert (torch.softmax(loose.scores[0].float(), -1) - hf_logp[:, 0].exp()).abs().max().item() > 1e-3
    no_bos = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    first = model.generate(**no_bos, max_new_tokens=1, output_scores=True, return_dict_in_generate=True).scores[0]
    assert (torch.softmax(first.float(), -1) - hf_logp[::SAMPLES_PER_PROMPT, 0].exp()).abs().max().item() > 1e-3


class _World(World):
    """A user's world on a BPE tokenizer; ``prepend_bos`` makes it encode prompts as the built-in tasks do."""

    def __init__(self, tokenizer, prepend_bos: bool) -> None:
        self.tokenizer, self.prepend_bos = tokenizer, prepend_bos

    def prompt_token_ids(self, prompts):
        if self.prepend_bos:
            return [[self.tokenizer.bos_token_id, *self.tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
        return super().prompt_token_ids(prompts)


@pytest.mark.parametrize(("tokenizer_adds_bos", "world_prepends_bos"), [(False, False), (True, False), (False, True),
                                                                         (True, True)])
def test_generation_saved_tokenizer_adds_bos_exactly_when_the_world_does(tmp_path, tokenizer_adds_bos,
                                                                        world_prepends_bos):
    texts = corpus(40)
    tok = bpe_tokenizer(texts, vocab_size=300, special={"bos": "<s>", "eos": "</s>", "pad": "<pad>"},
                        add_bos=tokenizer_adds_bos, chat_template=None)
    world = _World(tok, world_prepends_bos)
    before = bos_once(tok, texts[0])
    world.tokenizer_for_saving().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for p in texts[:5]:
        assert bos_once(loaded, p) == world.prompt_token_ids([p])[0]
        assert bos_once(loaded, p)[:2].count(tok.bos_token_id) == int(tokenizer_adds_bos or world_prepends_bos)
    assert loaded.padding_side == "left"
    assert bos_once(tok, texts[0]) == before and tok.padding_side == "right"  # the world's own is left alone


def test_generation_a_run_saves_its_temperature_and_length_cap(exact_task, tmp_path):
    from rlhf_zoo.runner import run

    run("best-of-n", task="exact", out=tmp_path / "run", device="cpu", preset="smoke", progress=False,
        options={"temperature": 0.7, "max_new_tokens": 3})
    policy = tmp_path / "run" / "policy"
    cfg = json.loads((policy / "generation_config.json").read_text())
    assert (cfg["temperature"], cfg["max_new_tokens"], cfg["suppress_tokens"]) == (0.7, 3, exact_task.suppress_ids)
    tok = AutoTokenizer.from_pretrained(policy)
    assert tok("x y")["input_ids"] == exact_task.prompt_token_ids(["x y"])[0]
