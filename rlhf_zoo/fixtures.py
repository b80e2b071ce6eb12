"""Small Hugging Face models, BPE tokenizers and datasets built offline in seconds, for trying the zoo on
"your own model" without a download, for its tests and for docs/your-own-model.md:

    python -m rlhf_zoo.fixtures demo            # demo/gpt2, demo/qwen2, demo/llama, demo/rm, demo/*.jsonl,
                                                # demo/keyword_reward.py

Each policy directory is what ``save_pretrained`` writes for a real model (config.json, safetensors,
generation_config.json, tokenizer files with a chat template), in three tokenizer conventions:

  gpt2    GPT-2 architecture (absolute positions); byte-level BPE; no BOS added; pad == eos (<|endoftext|>)
  qwen2   Qwen2 architecture; no BOS; eos <|im_end|>, a distinct pad <|endoftext|>
  llama   Llama architecture; BOS <s> added by the tokenizer (and written by the chat template: never
          twice); eos </s>; no pad token at all (the zoo pads with eos, masks say what is padding)
  rm      a Llama sequence-classification reward model (one label) with its OWN tokenizer, different
          from the policies': the reward scores the decoded text re-tokenised

The policies are briefly pretrained on a small synthetic corpus (``pretrain_steps``) so that they write
words and end with EOS; the reward model is untrained unless ``rm_steps`` > 0 (then it learns to prefer
responses with the word "happy", the keyword of the example Python reward).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

KEYWORD = "happy"
SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a bird", "the child", "our neighbour", "the robot"]
VERBS = ["likes", "sees", "finds", "wants", "makes", "reads", "paints", "visits"]
OBJECTS = ["a ball", "the garden", "a book", "the sea", "a song", "the city", "a cake", "the hills"]
ADJECTIVES = ["happy", "sad", "quiet", "green", "bright", "old", "small", "tired"]
QUESTIONS = ["tell me about", "write a line about", "say something about", "describe"]

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
LLAMA_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE

ARCHITECTURES = ("gpt2", "qwen2", "llama")


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} and is {rng.choice(ADJECTIVES)} ."


def prompt(rng: random.Random) -> str:
    return f"{rng.choice(QUESTIONS)} {rng.choice(SUBJECTS)}:"


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{prompt(rng)} {sentence(rng)}" for _ in range(n)]


def bpe_tokenizer(texts: list[str], *, vocab_size: int, special: dict[str, str], add_bos: bool,
                  chat_template: str | None) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``; ``special`` maps bos/eos/pad/unk to token strings
    (a role missing from it has no token); ``add_bos``: the tokenizer puts BOS in front of a sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokens = list(dict.fromkeys(special.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        bos = special["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in special.items()})
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _tokenizer(arch: str, texts: list[str]) -> Any:
    if arch == "gpt2":
        return bpe_tokenizer(texts, vocab_size=400, special={"bos": "<|endoftext|>", "eos": "<|endoftext|>",
                                                             "pad": "<|endoftext|>"}, add_bos=False,
                             chat_template=CHAT_TEMPLATE)
    if arch == "qwen2":
        return bpe_tokenizer(texts, vocab_size=400, special={"eos": "<|im_end|>", "pad": "<|endoftext|>"},
                             add_bos=False, chat_template=CHAT_TEMPLATE)
    if arch == "llama":
        return bpe_tokenizer(texts, vocab_size=400, special={"bos": "<s>", "eos": "</s>"}, add_bos=True,
                             chat_template=LLAMA_CHAT_TEMPLATE)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def _config(arch: str, tok: Any, hidden: int, layers: int, positions: int) -> Any:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch == "gpt2":
        return GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=2, n_positions=positions,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    return cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
               tie_word_embeddings=True, attention_dropout=0.0, **ids)


def build_policy(arch: str, out: str | Path, *, hidden: int = 32, layers: int = 2, positions: int = 128,
                 pretrain_steps: int = 60, seed: int = 0) -> Path:
    """A tiny causal LM of ``arch`` with its tokenizer, saved to ``out``."""
    from transformers import AutoModelForCausalLM

    from rlhf_zoo.training import lm_row, train_lm
    from rlhf_zoo.world import bos_once

    out = Path(out)
    texts = corpus(2000, seed)
    tok = _tokenizer(arch, texts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tok, hidden, layers, positions))
    if pretrain_steps:
        rows = [lm_row(bos_once(tok, ""), [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id])
                for t in texts]
        train_lm(model, rows, pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                 steps=pretrain_steps, batch_size=32, lr=3e-3, seed=seed, desc=f"pretrain {arch}", progress=False)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_reward_model(out: str | Path, *, steps: int = 0, seed: int = 0) -> Path:
    """A tiny Llama reward model (one label) with its own word-level-ish BPE tokenizer."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    out = Path(out)
    texts = corpus(1000, seed + 1)
    tok = bpe_tokenizer(texts, vocab_size=300, special={"bos": "[BOS]", "eos": "[EOS]", "pad": "[PAD]"},
                        add_bos=True, chat_template=None)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    if steps:
        _train_keyword_rm(model, tok, steps, seed)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _train_keyword_rm(model: Any, tok: Any, steps: int, seed: int) -> None:
    """Regress the score onto the number of keyword occurrences (a stand-in for a trained RM)."""
    from rlhf_zoo.models import reward_scores
    from rlhf_zoo.world import bos_once, pad_rows

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = [f"{prompt(rng)} {sentence(rng)}" for _ in range(32)]
        rows = [[*bos_once(tok, t), tok.eos_token_id] for t in texts]
        ids, mask = pad_rows(rows, tok.pad_token_id, left=False, device="cpu")
        target = torch.tensor([float(t.split(":", 1)[-1].count(KEYWORD)) for t in texts])
        loss = (reward_scores(model, ids, mask) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


KEYWORD_REWARD = f'''"""A Python reward in TRL's convention: f(prompts, completions, **kwargs) -> list[float]."""


def reward(prompts, completions, **kwargs):
    """How often the completion says "{KEYWORD}" (conversational completions are message lists)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.split().count("{KEYWORD}")) for t in texts]
'''


def write_datasets(out: str | Path, n: int = 64, seed: int = 0) -> dict[str, Path]:
    """The dataset formats the zoo reads, as .jsonl files in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "demos", "demos_messages", "prefs", "conv", "conv_implicit", "rankings", "prompts", "prompts_conv", "ptx")}
    for _ in range(n):
        p = prompt(rng)
        good = sentence(rng).replace(" is ", f" is {KEYWORD} and ", 1)
        bad, other = sentence(rng).replace(KEYWORD, "sad"), sentence(rng).replace(KEYWORD, "old")
        if bad == other:
            other = f"{other} again"
        user = [{"role": "user", "content": p}]
        rows["demos"].append({"prompt": p, "completion": good})
        rows["demos_messages"].append({"messages": [*user, {"role": "assistant", "content": good}]})
        rows["prefs"].append({"prompt": p, "chosen": good, "rejected": bad})
        rows["conv"].append({"prompt": user, "chosen": [{"role": "assistant", "content": good}],
                             "rejected": [{"role": "assistant", "content": bad}]})
        rows["conv_implicit"].append({"chosen": [*user, {"role": "assistant", "content": good}],
                                      "rejected": [*user, {"role": "assistant", "content": bad}]})
        rows["rankings"].append({"prompt": p, "responses": [good, other, bad]})
        rows["prompts"].append({"prompt": p})
        rows["prompts_conv"].append({"prompt": user})
        rows["ptx"].append({"text": f"{p} {sentence(rng)}"})
    paths = {}
    for name, data in rows.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    (out / "keyword_reward.py").write_text(KEYWORD_REWARD)
    paths["keyword_reward"] = out / "keyword_reward.py"
    return paths


def build_all(out: str | Path, *, architectures: tuple[str, ...] = ARCHITECTURES, pretrain_steps: int = 60,
              rm_steps: int = 60) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Writing model shards" bars
    out = Path(out)
    for arch in architectures:
        build_policy(arch, out / arch, pretrain_steps=pretrain_steps)
    build_reward_model(out / "rm", steps=rm_steps)
    write_datasets(out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rlhf_zoo.fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write the models and datasets to")
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES, help="architectures (default: all three)")
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--rm-steps", type=int, default=60)
    args = parser.parse_args(argv)
    build_all(args.out, architectures=tuple(args.arch or ARCHITECTURES), pretrain_steps=args.pretrain_steps,
              rm_steps=args.rm_steps)
    print(f"wrote {', '.join(args.arch or ARCHITECTURES)}, rm, datasets and keyword_reward.py to {args.out}")


if __name__ == "__main__":
    main()
