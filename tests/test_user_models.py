"""Runs on a user's own Hugging Face model (issue 10, DESIGN.md section 4b), offline.

The fixtures (`rlhf_zoo.fixtures`) are built once per session in a temporary directory: tiny GPT-2 (pad ==
eos, no BOS, absolute positions), Qwen2 (no BOS, a distinct pad) and Llama (BOS, no pad) policies with BPE
tokenizers and chat templates, a reward model with its own tokenizer, the datasets in the standard and
conversational formats, and a keyword reward in TRL's ``module:function`` convention.

  * every algorithm runs its ``smoke`` preset (two iterations) through the CLI on each architecture and
    each data format that applies to it; the saved ``policy/`` (``model/``) loads with the Auto classes
    and generates; a trained ``model/`` is a ``--reward`` for a following ppo run
  * log-probs of a left-padded batch equal those of each row alone (GPT-2, Qwen2)
  * BOS exactly once (Llama, plain and chat-template text), none where the tokenizer adds none
  * LoRA: only adapter weights change, the reference stays fixed, resume is exact
  * ``zoo check --model``
  * bad input: one-line ``zoo: error:`` naming the option and the value
  * slow: ppo raises a Python keyword reward; dpo raises the chosen-vs-rejected margin on conversational pairs
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_zoo.checkpoint import read_checkpoint
from rlhf_zoo.cli import main

ARCHS = ("gpt2", "qwen2", "llama")
COMMON = ["--preset", "smoke", "--quiet", "--device", "cpu"]
BAD_REWARDS = '''
def short(prompts, completions, **kwargs):
    return [0.0]


def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)
'''


@pytest.fixture(scope="session")
def fx(tmp_path_factory) -> Path:
    """The fixture models and data, built once (about 2 s): policies pretrained for 20 steps."""
    from rlhf_zoo.fixtures import build_all

    root = build_all(tmp_path_factory.mktemp("user-models"), pretrain_steps=20, rm_steps=0)
    (root / "zoo_bad_rewards.py").write_text(BAD_REWARDS)
    return root


@pytest.fixture(autouse=True)
def _in_fixture_dir(fx, monkeypatch):
    """``module:function`` rewards import from the current directory: run from the fixtures'."""
    monkeypatch.chdir(fx)


def one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zoo: error: ")
    assert "Traceback" not in err and "Traceback" not in out
    return lines[0]


def zoo_run(algo: str, out: Path, *args: str) -> int:
    return main(["run", algo, *args, *COMMON, "--out", str(out)])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# --- every algorithm, architecture and data format ----------------------------------------------------
ONLINE = ("ppo", "ppo-ptx", "rrhf", "rejection-sampling", "best-of-n", "rloo", "grpo")


def _matrix() -> list[tuple[str, str, str, str | None]]:
    """(algorithm, architecture, data file, reward) runs: every applicable format on every architecture; the
    online algorithms take both prompt formats on each architecture, each with one of the two reward kinds
    (a Python function, a reward model with another tokenizer), alternating so every pairing occurs."""
    rows: list[tuple[str, str, str, str | None]] = []
    for i, arch in enumerate(ARCHS):
        rows += [("sft", arch, f, None) for f in ("demos", "demos_messages")]
        rows += [("reward-model", arch, f, None) for f in ("prefs", "rankings", "conv")]
        rows += [("dpo", arch, f, None) for f in ("prefs", "conv", "conv_implicit")]
        for j, algo in enumerate(ONLINE):
            rewards = ("keyword_reward:reward", "rm") if (i + j) % 2 == 0 else ("rm", "keyword_reward:reward")
            rows += [(algo, arch, "prompts", rewards[0]), (algo, arch, "prompts_conv", rewards[1])]
        rows.append(("iterated-rlhf", arch, "prompts_conv" if i % 2 else "prompts", None))  # labels with --labeler
    return rows


def test_the_matrix_covers_every_built_in_algorithm():
    from rlhf_zoo.registry import get_registry

    reg = get_registry()
    built_in = {n for n in reg.algorithms if reg.provided_by[("algorithm", n)].distribution == "rlhf-zoo"}
    assert built_in <= {row[0] for row in _matrix()}


def _generates_causal_lm(path: Path, conversational: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert tok.chat_template, "the saved tokenizer lost its chat template"
    if conversational:
        text = tok.apply_chat_template([{"role": "user", "content": "describe a dog:"}], tokenize=False,
                                       add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok("describe a dog:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] > enc["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)


def _scores_sequence_classifier(path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1
    with torch.no_grad():
        score = model(**tok("describe a dog: a dog sees the sea and is happy .", return_tensors="pt")).logits
    assert score.shape == (1, 1) and torch.isfinite(score).all()


@pytest.mark.parametrize(("algo", "arch", "data", "reward"), _matrix(),
                         ids=lambda v: v.replace(":reward", "") if isinstance(v, str) else str(v))
def test_every_algorithm_runs_on_every_architecture_and_format(fx, tmp_path, algo, arch, data, reward):
    args = ["--model", str(fx / arch)]
    if algo == "iterated-rlhf":  # its own reward models, labelled by a Python labeler
        args += ["--prompts", str(fx / f"{data}.jsonl"), "--labeler", "keyword_reward:reward"]
    elif reward is None:
        args += ["--dataset", str(fx / f"{data}.jsonl")]
    else:
        args += ["--prompts", str(fx / f"{data}.jsonl"), "--reward", str(fx / reward) if reward == "rm" else reward]
    if algo == "ppo-ptx":
        args += ["--ptx-dataset", str(fx / "ptx.jsonl")]
    out = tmp_path / "run"
    assert zoo_run(algo, out, *args) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["task"] == "user" and config["world"]["architecture"].lower().startswith(arch)
    if algo != "best-of-n":  # two iterations, each checkpointed (inference algorithms have no loop)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter-000001", "iter-000002"]
        assert read_checkpoint(out / "checkpoints" / "iter-000002")[1]["total"] == 2
    if algo == "reward-model":
        _scores_sequence_classifier(out / "model")
        return
    conversational = data in ("demos_messages", "conv", "conv_implicit", "prompts_conv")
    _generates_causal_lm(out / "policy", conversational)
    if reward is not None:  # no gold: the proxy reward, KL and win rate against the reference
        for key in ("proxy_reward", "baseline_proxy_reward", "kl_to_ref", "win_rate_vs_reference"):
            assert isinstance(summary[key], float), key


def test_trained_reward_model_is_a_reward_for_ppo(fx, tmp_path):
    """reward-model's model/ (the policy's tokenizer) scores the policy's tokens and starts PPO's critic."""
    rm_out, ppo_out = tmp_path / "rm", tmp_path / "ppo"
    assert zoo_run("reward-model", rm_out, "--model", str(fx / "gpt2"), "--dataset", str(fx / "prefs.jsonl")) == 0
    assert zoo_run("ppo", ppo_out, "--model", str(fx / "gpt2"), "--reward", str(rm_out / "model"),
                   "--prompts", str(fx / "prompts.jsonl")) == 0
    world = json.loads((ppo_out / "config.json").read_text())["world"]
    assert world["critic_init_for_ppo"].startswith("reward model")
    summary = json.loads((ppo_out / "summary.json").read_text())
    assert isinstance(summary["proxy_reward"], float)


# --- log-probs of a left-padded batch ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_left_padded_batch_logprobs_equal_each_row_alone(fx, arch):
    from rlhf_zoo.generation import sample
    from rlhf_zoo.ops.logprobs import response_logprobs
    from rlhf_zoo.user_setup import UserSetup

    world = UserSetup(model=str(fx / arch))
    model = world.load_policy("cpu")
    tok = world.tokenizer
    if arch == "gpt2":
        assert tok.pad_token_id == tok.eos_token_id  # pad == eos: only masks may say what is padding
    else:
        assert tok.pad_token_id != tok.eos_token_id and tok.bos_token_id is None
    prompts = ["describe a dog:", "tell me about the teacher and the robot and the bird:",
               world.render_messages([{"role": "user", "content": "say something about my friend:"}])]
    responses = ["the cat likes a ball .", "a bird", "our neighbour paints the hills and is quiet and old ."]
    p_ids, p_mask = world.encode_prompts(prompts)
    r_ids, r_mask = world.encode_responses(responses)
    assert (p_mask[:, 0] == 0).any() and (r_mask[:, -1] == 0).any()  # both paddings are exercised
    with torch.no_grad():
        batch = response_logprobs(model, p_ids, p_mask, r_ids, r_mask)
        for i in range(len(prompts)):
            pi, pm = world.encode_prompts([prompts[i]])
            ri, rm = world.encode_responses([responses[i]])
            alone = response_logprobs(model, pi, pm, ri, rm)
            n = int(rm.sum())
            torch.testing.assert_close(batch[i, :n], alone[0, :n], atol=1e-5, rtol=1e-5)
            assert (batch[i, n:] == 0).all()
    # the log-probs recorded while sampling a left-padded batch equal the trainer's forward
    g = torch.Generator().manual_seed(0)
    s = sample(model, p_ids, p_mask, 12, eos_token_id=world.eos_token_id, pad_token_id=world.pad_token_id,
               suppress_ids=world.suppress_ids, generator=g)
    with torch.no_grad():
        again = response_logprobs(model, p_ids, p_mask, s.response_ids, s.response_mask,
                                  suppress_ids=world.suppress_ids)
    torch.testing.assert_close(again, s.logprobs, atol=1e-5, rtol=1e-5)


# --- BOS exactly once ------------------------------------------------------------------------------------
def test_bos_exactly_once_on_llama_plain_and_chat_text(fx):
    from rlhf_zoo.data import RowPolicy, load_rankings, load_sft
    from rlhf_zoo.user_setup import UserSetup

    world = UserSetup(model=str(fx / "llama"), prompts_source=str(fx / "prompts_conv.jsonl"))
    tok = world.tokenizer
    bos = tok.bos_token_id
    assert bos is not None
    plain = world.prompt_token_ids(["describe a dog:"])[0]
    chat_text = world.render_messages([{"role": "user", "content": "describe a dog:"}])
    assert chat_text.startswith(tok.bos_token)  # the template writes BOS itself
    chat = world.prompt_token_ids([chat_text])[0]
    from_file = world.prompt_token_ids(world.prompts("train"))
    # the prompts of conversational datasets as the algorithms read them (explicit and implicit prompts)
    rankings = [r for f in ("conv", "conv_implicit") for r in load_rankings(fx / f"{f}.jsonl", RowPolicy(), world, 16)[0]]
    demos = load_sft(fx / "demos_messages.jsonl", RowPolicy(), world, 16)[0]
    from_data = world.prompt_token_ids([r.prompt for r in rankings] + [p for p, _ in demos])
    assert len(from_data) == 3 * 64
    for ids in [plain, chat, *from_file, *from_data]:
        assert ids[0] == bos and ids.count(bos) == 1, ids[:4]
    assert plain[1:] == tok("describe a dog:", add_special_tokens=False)["input_ids"]
    response = world.response_token_ids(["a dog sees the sea ."])[0]
    assert response[-1] == tok.eos_token_id and bos not in response
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: the zoo pads with EOS, masks decide


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_no_bos_where_the_tokenizer_adds_none(fx, arch):
    from rlhf_zoo.user_setup import UserSetup

    world = UserSetup(model=str(fx / arch))
    tok = world.tokenizer
    for text in ["describe a dog:", world.render_messages([{"role": "user", "content": "describe a dog:"}])]:
        ids = world.prompt_token_ids([text])[0]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]  # nothing added in front
        assert tok.bos_token_id is None or ids[0] != tok.bos_token_id
    assert world.response_token_ids(["a dog ."])[0][-1] == tok.eos_token_id


# --- LoRA ------------------------------------------------------------------------------------------------
def _lora_setup(fx) -> dict:
    return {"model": str(fx / "gpt2"), "reward": ("keyword_reward:reward",), "prompts": str(fx / "prompts.jsonl"),
            "lora_r": 4}


@pytest.mark.parametrize("algo", ["ppo", "dpo"])
def test_lora_update_changes_only_adapter_weights_and_reference_stays(fx, tmp_path, algo):
    from rlhf_zoo.ops.logprobs import response_logprobs
    from rlhf_zoo.runner import make_context

    options = {"dataset": str(fx / "prefs.jsonl")} if algo == "dpo" else {}
    ctx = make_context(algo, task=None, out=tmp_path / "run", device="cpu", preset="smoke", options=options,
                       progress=False, setup=_lora_setup(fx))
    world = ctx.task
    before = {n: p.detach().clone() for n, p in ctx.policy.named_parameters()}
    trainable = {n for n, p in ctx.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    p_ids, p_mask = world.encode_prompts(["describe a dog:", "tell me about the cat and the robot:"])
    r_ids, r_mask = world.encode_responses(["a dog sees the sea .", "the cat is happy and green ."])
    with torch.no_grad():
        ref_before = response_logprobs(ctx.reference, p_ids, p_mask, r_ids, r_mask)
        base = world.load_reference("cpu")  # the --model itself: the reference is the base, adapter disabled
        torch.testing.assert_close(ref_before, response_logprobs(base, p_ids, p_mask, r_ids, r_mask))
    ctx.algorithm.train(ctx, ctx.config)
    after = dict(ctx.policy.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed, "the update changed nothing"
    assert changed <= trainable, f"non-adapter weights changed: {sorted(changed - trainable)[:3]}"
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter now does something
    with torch.no_grad():
        ref_after = response_logprobs(ctx.reference, p_ids, p_mask, r_ids, r_mask)
        policy_after = response_logprobs(ctx.policy, p_ids, p_mask, r_ids, r_mask)
    assert torch.equal(ref_before, ref_after)
    assert not torch.equal(policy_after, ref_after)


def _figures(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not any(s in k for s in ("seconds", "per_second", "memory"))}


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if "time" not in k and "seconds" not in k} for r in rows]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PeftModel.from_pretrained's
def test_lora_cli_run_saves_merged_policy_and_adapter_and_resumes_exactly(fx, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = ["--model", str(fx / "gpt2"), "--reward", "keyword_reward:reward", "--prompts", str(fx / "prompts.jsonl"),
            "--lora-r", "4", "--checkpoint-every", "1", "--keep-checkpoints", "5"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert zoo_run("ppo", full, *args) == 0
    # policy/ is merged (plain transformers weights), adapter/ loads with peft onto the base
    merged = weights(full / "policy")
    base = weights(fx / "gpt2")
    assert not any("lora" in k for k in merged)
    assert merged.keys() == base.keys()
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert (full / "adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fx / "gpt2"),
                                             full / "adapter").eval()(input_ids=ids).logits
        via_merged = AutoModelForCausalLM.from_pretrained(full / "policy").eval()(input_ids=ids).logits
    torch.testing.assert_close(via_peft, via_merged, atol=1e-5, rtol=1e-4)
    # the checkpoint holds the adapter (and the base) and the adapter's optimizer state
    state, _ = read_checkpoint(full / "checkpoints" / "iter-000001")
    assert any("lora_A" in k for k in state["policy"]) and any("lora_B" in k for k in state["policy"])
    assert "optimizer" in json.dumps(sorted(state["tracked"]))
    # a crash after iteration 1 (the last checkpoint lost), then --resume: bit for bit the uninterrupted run
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter-000002")
    for d in ("policy", "adapter"):
        shutil.rmtree(resumed / d)
    (resumed / "summary.json").unlink()
    assert zoo_run("ppo", resumed, *args, "--resume") == 0
    assert json.loads((resumed / "config.json").read_text())["resumed_from"] == "iter-000001"
    for d in ("policy", "adapter"):
        name = "model.safetensors" if d == "policy" else "adapter_model.safetensors"
        a, b = load_file(str(full / d / name)), load_file(str(resumed / d / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
    assert _metrics(full) == _metrics(resumed)
    assert _figures(json.loads((full / "summary.json").read_text())) == \
        _figures(json.loads((resumed / "summary.json").read_text()))


@pytest.mark.parametrize(("algo", "arch", "data"), [("ppo", "gpt2", "--prompts prompts_conv.jsonl"),
                                                    ("dpo", "llama", "--dataset conv.jsonl")])
def test_lora_and_gradient_checkpointing_warn_nothing(fx, tmp_path, algo, arch, data):
    """No deprecation or peft notice from the libraries on a LoRA run with gradient checkpointing."""
    import warnings

    option, file = data.split()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert zoo_run(algo, tmp_path / "r", "--model", str(fx / arch), option, str(fx / file), "--lora-r", "4",
                       "--gradient-checkpointing", "--reward", "keyword_reward:reward") == 0
    library = [f"{w.category.__name__}: {w.message}" for w in caught
               if any(lib in w.filename for lib in ("transformers", "peft", "torch"))]
    assert library == []


# --- zoo check --model -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("algos", "extra"), [
    (["sft"], ["--dataset", "demos_messages.jsonl"]),
    (["dpo", "reward-model"], ["--dataset", "conv.jsonl"]),
    # a reward model's continuous scores: the keyword reward ties every sample of a tiny model at 0, and
    # group-normalised methods (grpo) rightly take no step on tied groups, failing the kit's update check
    (list(ONLINE), ["--reward", "rm", "--prompts", "prompts.jsonl", "--ptx-dataset", "ptx.jsonl"]),
], ids=["sft", "dpo+reward-model", "online"])
def test_zoo_check_passes_with_model(fx, capsys, algos, extra):
    code = main(["check", *algos, "--model", str(fx / "qwen2"), *extra])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "FAIL" not in out
    for algo in algos:
        assert f"zoo check {algo} " in out and f"on {fx / 'qwen2'}" in out
        assert f"{algo}: " in out and " 0 failed" in out
    assert out.count("PASS  determinism") == len(algos)


def test_zoo_check_model_option_errors(fx, capsys):
    assert main(["check", "ppo", "--task", "exact", "--model", str(fx / "gpt2")]) == 1
    line = one_line_error(capsys)
    assert "--task 'exact'" in line and f"--model '{fx / 'gpt2'}'" in line
    assert main(["check", "ppo", "--reward", "keyword_reward:reward"]) == 1
    assert "--reward applies to a check on your own model: give --model too" in one_line_error(capsys)


# --- bad input: one line naming the option and the value -----------------------------------------------
@pytest.fixture(scope="module")
def bad_dirs(fx, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(fx / "gpt2" / "config.json", no_weights / "config.json")
    no_template = root / "no-template"
    shutil.copytree(fx / "gpt2", no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config_path = no_template / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return {"no_weights": no_weights, "no_template": no_template}


def test_bad_model_without_weights(fx, tmp_path, capsys, bad_dirs):
    path = str(bad_dirs["no_weights"])
    assert zoo_run("dpo", tmp_path / "r", "--model", path, "--dataset", str(fx / "prefs.jsonl")) == 1
    line = one_line_error(capsys)
    assert f"--model {path!r}" in line and "model.safetensors" in line
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize(("algo", "data"), [("dpo", "--dataset conv.jsonl"), ("sft", "--dataset demos_messages.jsonl"),
                                            ("ppo", "--prompts prompts_conv.jsonl")])
def test_bad_conversational_rows_without_chat_template(fx, tmp_path, capsys, bad_dirs, algo, data):
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(bad_dirs["no_template"]).chat_template
    option, file = data.split()
    args = ["--model", str(bad_dirs["no_template"]), option, str(fx / file), "--reward", "keyword_reward:reward"]
    assert zoo_run(algo, tmp_path / "r", *args) == 1
    line = one_line_error(capsys)
    assert f"the tokenizer of --model {str(bad_dirs['no_template'])!r} has none" in line
    assert "--chat-template FILE" in line


@pytest.mark.parametrize(("spec", "expected"), [
    ("zoo_no_such_module:reward", "cannot import module 'zoo_no_such_module'"),
    ("zoo_bad_rewards:missing", "has no attribute 'missing'"),
    ("zoo_bad_rewards:short", "returned 1 values for"),
    ("zoo_bad_rewards:nan", "returned nan for completion 0"),
])
def test_bad_python_reward(fx, tmp_path, capsys, spec, expected):
    args = ["--model", str(fx / "gpt2"), "--reward", spec, "--prompts", str(fx / "prompts.jsonl")]
    assert zoo_run("ppo", tmp_path / "r", *args) == 1
    line = one_line_error(capsys)
    assert f"--reward {spec!r}" in line and expected in line


@pytest.mark.parametrize("option", ["--model", "--reward", "--tokenizer"])
def test_bad_uncached_hub_id_offline(fx, tmp_path, capsys, monkeypatch, option):
    """HF_HUB_OFFLINE set in the running process (huggingface_hub reads it only at import) still means the
    local cache only: no host is even looked up."""
    import socket

    lookups: list[str] = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(f"test: no network ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    try:  # huggingface_hub's telemetry fetches an agent registry once per process, even for the cache only
        from huggingface_hub.utils import _detect_agent
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    except (ImportError, AttributeError):
        pass
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "nobody/not-a-model-xyz"
    args = {"--model": ["--model", hub_id, "--reward", "keyword_reward:reward"],
            "--reward": ["--model", str(fx / "gpt2"), "--reward", hub_id],
            "--tokenizer": ["--model", str(fx / "gpt2"), "--tokenizer", hub_id, "--reward", "keyword_reward:reward"]}
    assert zoo_run("ppo", tmp_path / "r", *args[option], "--prompts", str(fx / "prompts.jsonl")) == 1
    line = one_line_error(capsys)
    assert f"{option} {hub_id!r}" in line and "offline" in line and "cache" in line
    assert lookups == []


def test_bad_reward_weights_count(fx, tmp_path, capsys):
    args = ["--model", str(fx / "gpt2"), "--reward", "keyword_reward:reward", "--reward", str(fx / "rm"),
            "--reward-weights", "1,0.5,2", "--prompts", str(fx / "prompts.jsonl")]
    assert zoo_run("ppo", tmp_path / "r", *args) == 1
    line = one_line_error(capsys)
    assert "--reward-weights" in line and "3 value(s) for 2" in line


def test_bad_reward_weights_not_numbers(fx, tmp_path, capsys):
    args = ["--model", str(fx / "gpt2"), "--reward", "keyword_reward:reward", "--reward-weights", "one",
            "--prompts", str(fx / "prompts.jsonl")]
    assert zoo_run("ppo", tmp_path / "r", *args) == 1
    assert "--reward-weights 'one'" in one_line_error(capsys)


def test_bad_task_together_with_model(fx, tmp_path, capsys):
    args = ["--task", "exact", "--model", str(fx / "gpt2"), "--reward", "keyword_reward:reward",
            "--prompts", str(fx / "prompts.jsonl")]
    assert zoo_run("ppo", tmp_path / "r", *args) == 1
    line = one_line_error(capsys)
    assert "--task 'exact'" in line and f"--model '{fx / 'gpt2'}'" in line
    assert not (tmp_path / "r").exists()


# --- learning (slow) -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_gpt2(tmp_path_factory) -> Path:
    """A GPT-2 pretrained long enough to write the corpus' sentences (and so, sometimes, the keyword)."""
    from rlhf_zoo.fixtures import build_policy

    return build_policy("gpt2", tmp_path_factory.mktemp("gpt2-trained") / "gpt2", pretrain_steps=150)


@pytest.mark.slow
def test_ppo_raises_a_python_keyword_reward(fx, trained_gpt2, tmp_path):
    out = tmp_path / "ppo"
    args = ["--model", str(trained_gpt2), "--reward", "keyword_reward:reward", "--prompts", str(fx / "prompts.jsonl"),
            "--iterations", "15", "--eval-prompts", "8", "--eval-samples", "8", "--quiet", "--device", "cpu"]
    assert main(["run", "ppo", *args, "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    # Measured (seed 0, 1 thread, ~8 s): the reference says "happy" 0.08 times per response, the policy after
    # 15 iterations 5.96 times (win rate 0.98; 3.33 from a GPT-2 pretrained 300 steps): a margin of 1.0 is
    # far inside what PPO does and far outside the noise of 24 evaluation samples.
    assert s["proxy_reward"] > s["baseline_proxy_reward"] + 1.0, s
    assert s["win_rate_vs_reference"] > 0.75, s


@pytest.mark.slow
def test_dpo_raises_the_margin_on_conversational_pairs(fx, trained_gpt2, tmp_path):
    out = tmp_path / "dpo"
    args = ["--model", str(trained_gpt2), "--dataset", str(fx / "conv.jsonl"), "--epochs", "8", "--batch-size", "16",
            "--warmup-steps", "2", "--eval-prompts", "4", "--eval-samples", "1", "--quiet", "--device", "cpu"]
    assert main(["run", "dpo", *args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    first, last = rows[0], rows[-1]
    # Measured (seed 0): margin 0 at the first step (policy == reference), 1.27 after 8 epochs (32 steps);
    # accuracy 0 (ties) -> 1.0. A margin gain of 0.5 leaves room for other seeds and versions.
    assert abs(first["reward_margin"]) < 1e-3
    assert last["reward_margin"] > first["reward_margin"] + 0.5, last
    assert last["reward_accuracy"] > 0.9 > first["reward_accuracy"], last
