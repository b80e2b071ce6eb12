"""The environments on a user's own setup (``model=``, ``tokenizer=``, ``reward=``, ``prompts=``, ...):
gymnasium.make / make_vec on a model directory or loaded objects with a Python reward, the same reward and
KL as the CLI's, TokenGen == ResponseGen, check_env, and prompts given at reset (text, messages, ids)."""

from __future__ import annotations

import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_zoo.fixtures import build_policy, prompt, write_datasets
from rlhf_zoo.generation import sample
from rlhf_zoo.ops import sequence_logprobs
from rlhf_zoo_envs.registration import register_envs
from rlhf_zoo_envs.response_gen import ResponseGenEnv, ResponseGenVectorEnv
from rlhf_zoo_envs.token_gen import TokenGenEnv, TokenGenVectorEnv

register_envs()

T = 6  # max_new_tokens
N = 4  # vector width
ATOL = 1e-5
BETA = 0.1
PROMPTS = [prompt(__import__("random").Random(i)) for i in range(12)]
MESSAGES = [{"role": "user", "content": "tell me about the cat:"}]
CALLS: list[tuple[list, list]] = []  # (prompts, completions) of every call of `text_reward`


def text_reward(prompts, completions, completion_ids, **kwargs):
    """A Python reward in TRL's convention that depends on the prompt's form, the text and the ids."""
    CALLS.append((list(prompts), list(completions)))
    out = []
    for p, c, ids in zip(prompts, completions, completion_ids, strict=True):
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(0.25 * len(ids) - 0.1 * text.count("e") + (1.0 if isinstance(p, list) else 0.0))
    return out


REWARD_MODULE = '''
def reward(prompts, completions, completion_ids, **kwargs):
    out = []
    for p, c, ids in zip(prompts, completions, completion_ids):
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(0.25 * len(ids) - 0.1 * text.count("e") + (1.0 if isinstance(p, list) else 0.0))
    return out
'''


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny GPT-2 (pad == eos, no BOS) and Llama (BOS added, no pad) policies, datasets, a reward module."""
    d = tmp_path_factory.mktemp("user_envs")
    build_policy("gpt2", d / "gpt2", pretrain_steps=20)
    build_policy("llama", d / "llama", pretrain_steps=0)
    write_datasets(d, n=16)
    (d / "env_user_reward.py").write_text(REWARD_MODULE)
    return d


@pytest.fixture(scope="module")
def policy(root):
    return AutoModelForCausalLM.from_pretrained(root / "gpt2").eval()


@pytest.fixture(scope="module")
def envs(root):
    """One env of each kind on the GPT-2 directory, a Python reward and a prompt list."""
    kw = dict(model=str(root / "gpt2"), reward=text_reward, prompts=PROMPTS, max_new_tokens=T, beta=BETA,
              prompt_width=40)
    return {"token": TokenGenEnv(**kw), "token_vec": TokenGenVectorEnv(N, **kw),
            "response": ResponseGenEnv(**kw), "response_vec": ResponseGenVectorEnv(N, **kw)}


# --- helpers -----------------------------------------------------------------------------------------------
def prompt_part(obs, P: int) -> list[int]:
    """The real prompt tokens of a single observation."""
    ids, mask = obs["input_ids"][:P], obs["attention_mask"][:P].astype(bool)
    assert mask.sum() == obs["prompt_length"]
    return ids[mask].tolist()


def run_token(env, prompt_, tokens, logprobs):
    """One TokenGen episode on a prompt given at reset. -> per-step rewards, infos, terminated, truncated"""
    env.reset(options={"prompt": prompt_})
    rewards, infos = [], []
    for tok, lp in zip(tokens, logprobs, strict=True):
        _, r, term, trunc, info = env.step({"token": int(tok), "logprob": np.float32(lp)})
        rewards.append(r)
        infos.append(info)
        if term or trunc:
            return np.array(rewards), infos, term, trunc
    raise AssertionError("episode did not end")


def response_action(tokens, logprobs, pad: int) -> dict:
    ids, lp = np.full(T, pad, np.int64), np.zeros(T, np.float32)
    ids[: len(tokens)], lp[: len(tokens)] = tokens, logprobs
    return {"tokens": ids, "logprobs": lp, "length": len(tokens)}


def expected_episode(world, ref_model, prompt_text, tokens, logprobs, eos: int):
    """Per-token rewards computed independently of the envs: the reference's log-probs from one forward,
    the Python reward called on the decoded text (as the CLI's reward calls it), -beta * log-ratio."""
    p_ids = torch.tensor([world.prompt_token_ids([prompt_text])[0]])
    r_ids = torch.tensor([tokens])
    ids = torch.cat([p_ids, r_ids], 1)
    ref = sequence_logprobs(ref_model, ids, torch.ones_like(ids), p_ids.shape[1],
                            suppress_ids=world.suppress_ids)[0].detach().numpy()
    completion = world.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
    original = world.original_prompt(prompt_text)
    rm = text_reward([original], [[{"role": "assistant", "content": completion}] if isinstance(original, list)
                                  else completion], [[t for t in tokens if t != eos]])[0]
    rewards = -BETA * (np.asarray(logprobs, np.float32) - ref)
    rewards[-1] += rm
    return rewards, ref, rm


# --- make / make_vec on the user's own model -------------------------------------------------------------
def test_make_on_a_model_dir_with_a_callable_reward_and_a_prompt_list(root, envs, policy) -> None:
    env = gym.make("rlhf_zoo/TokenGen-v0", model=str(root / "gpt2"), reward=text_reward, prompts=PROMPTS,
                   max_new_tokens=T, beta=BETA)
    core = env.unwrapped.core
    world = core.task
    assert type(world).__name__ == "UserSetup" and world.describe()["rewards"] == [f"{__name__}:text_reward"]
    # the CLI's split: a seeded tenth (at least one) of the prompts held out for evaluation
    train, held = world.prompts("train"), world.prompts("eval")
    assert len(held) == 1 and sorted(train + held) == sorted(set(PROMPTS)) and core.prompt_texts == train
    assert core.prompt_width == max(len(ids) for ids in world.prompt_token_ids(train))
    assert (core.max_new_tokens, core.beta, core.eos_token_id) == (T, BETA, world.tokenizer.eos_token_id)
    obs, info = env.reset(seed=3)
    assert info["prompt"] == train[info["prompt_index"]]
    assert prompt_part(obs, core.prompt_width) == world.prompt_token_ids([info["prompt"]])[0]
    # one episode: the KL part each step and the Python reward at the end, as computed independently
    tokens, lps = [17, 42, 99, 5, 64, 33], [-1.0, -2.5, -0.5, -3.0, -1.5, -2.0]
    rewards = []
    for tok, lp in zip(tokens, lps, strict=True):
        obs, r, term, trunc, step_info = env.step({"token": tok, "logprob": np.float32(lp)})
        rewards.append(r)
    assert (term, trunc, step_info["finish_reason"]) == (False, True, "length")
    want, ref, rm = expected_episode(world, policy, info["prompt"], tokens, lps, core.eos_token_id)
    np.testing.assert_allclose(step_info["ref_logprobs"], ref, atol=ATOL)
    np.testing.assert_allclose(step_info["rm_score"], rm, atol=ATOL)
    np.testing.assert_allclose(rewards, want, atol=ATOL)
    np.testing.assert_allclose(step_info["return"], want.sum(), atol=ATOL)


def test_a_spec_reward_and_a_callable_pay_the_same(root, envs, monkeypatch) -> None:
    """reward="module:function" (the CLI's --reward) and the same function given as a callable, weighted."""
    monkeypatch.syspath_prepend(str(root))
    spec = ResponseGenVectorEnv(N, model=str(root / "gpt2"), reward=["env_user_reward:reward", text_reward],
                                reward_weights=[2.0, -0.5], prompts=str(root / "prompts.jsonl"), max_new_tokens=T,
                                prompt_width=40)
    plain = envs["response_vec"]
    assert [t["spec"] for t in spec.core.reward_fn.describe()] == ["env_user_reward:reward",
                                                                   f"{__name__}:text_reward"]
    prompts = [PROMPTS[0], MESSAGES, PROMPTS[3], PROMPTS[5]]
    tokens = np.array([[17, 42, 99, 5, 64, 33]] * N)
    action = {"tokens": tokens, "logprobs": np.full((N, T), -1.0, np.float32), "length": np.array([6, 3, 1, 4])}
    spec.reset(options={"prompts": prompts})
    plain.reset(options={"prompts": prompts})
    info_spec, info_plain = spec.step(action)[4], plain.step(action)[4]
    assert info_plain["rm_score"][1] > 0.9  # the message prompt reached the reward as messages
    np.testing.assert_allclose(info_spec["rm_score"], 1.5 * info_plain["rm_score"], atol=ATOL)
    assert "env_user_reward" in sys.modules


@pytest.mark.parametrize(("env_id", "cls"), [("rlhf_zoo/TokenGen-v0", TokenGenVectorEnv),
                                             ("rlhf_zoo/ResponseGen-v0", ResponseGenVectorEnv)])
def test_make_vec_on_loaded_objects(root, policy, env_id, cls) -> None:
    tokenizer = AutoTokenizer.from_pretrained(root / "llama")
    model = AutoModelForCausalLM.from_pretrained(root / "llama")
    assert tokenizer.pad_token_id is None
    env = gym.make_vec(env_id, num_envs=3, model=model, tokenizer=tokenizer, reward=text_reward, prompts=PROMPTS,
                       max_new_tokens=T, prompt_width=48)
    assert type(env) is cls
    world = env.core.task
    # the caller's tokenizer is used on a copy (pad = eos added there), the model's reference is a frozen copy
    assert tokenizer.pad_token_id is None and world.pad_token_id == world.eos_token_id == tokenizer.eos_token_id
    assert env.core.ref_model is not model and all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in env.core.ref_model.parameters())
    for a, b in zip(model.parameters(), env.core.ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    ids = world.prompt_token_ids(["a dog likes"])[0] + [7, 8]
    obs, info = env.reset(options={"prompts": ["describe the sea:", MESSAGES, ids]})
    assert obs in env.observation_space and obs["input_ids"].shape == (3, 48 + T)
    assert info["prompt_index"].tolist() == [-1, -1, -1]
    rendered = world.render_messages(MESSAGES)
    expected = [world.prompt_token_ids(["describe the sea:"])[0], world.prompt_token_ids([rendered])[0], ids]
    bos = tokenizer.bos_token_id
    for i, want in enumerate(expected):
        got = obs["input_ids"][i, :48][obs["attention_mask"][i, :48].astype(bool)].tolist()
        assert got == want and obs["prompt_length"][i] == len(want)
        assert got[0] == bos and got[1] != bos  # BOS once: added by the tokenizer or written by the template
    assert info["prompt"][0] == "describe the sea:" and info["prompt"][1] == rendered


# --- TokenGen == ResponseGen on the user's model --------------------------------------------------------------
def episodes_for(world, policy, prompts, seed: int):
    """Responses sampled from the policy (its log-probs), plus hand-made ones ending at EOS early."""
    texts = [world.render_messages(p) if isinstance(p, list) else p for p in prompts]
    ids, mask = world.encode_prompts(texts)
    s = sample(policy, ids, mask, T, eos_token_id=world.eos_token_id, pad_token_id=world.pad_token_id,
               suppress_ids=world.suppress_ids, generator=torch.Generator().manual_seed(seed))
    out = []
    for i, p in enumerate(prompts):
        L = int(s.lengths[i])
        out.append((p, s.response_ids[i, :L].tolist(), s.logprobs[i, :L].tolist()))
    eos = world.eos_token_id
    out[1] = (out[1][0], [33, 61, eos], [-1.25, -0.5, -2.0])  # EOS at step 3
    out[2] = (out[2][0], [eos], [-0.75])  # EOS only
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_token_and_response_envs_pay_the_same(envs, policy, seed) -> None:
    core = envs["token"].core
    world, pad, eos = core.task, core.pad_token_id, core.eos_token_id
    prompts = [PROMPTS[seed], MESSAGES, PROMPTS[4 + seed], [{"role": "user", "content": "describe a bird:"}]]
    episodes = episodes_for(world, policy, prompts, seed)
    tok_mat, lp_mat = np.full((N, T), pad, np.int64), np.zeros((N, T), np.float32)
    for i, (_, tokens, lps) in enumerate(episodes):
        tok_mat[i, : len(tokens)], lp_mat[i, : len(tokens)] = tokens, lps
    lengths = np.array([len(e[1]) for e in episodes])
    # vector TokenGen
    venv = envs["token_vec"]
    venv.reset(options={"prompts": prompts})
    vec_rewards, vec_ends = np.zeros((N, T), np.float32), [{} for _ in range(N)]
    for t in range(T):
        _, r, _, _, info = venv.step({"token": tok_mat[:, t], "logprob": lp_mat[:, t]})
        vec_rewards[:, t] = r
        for i in np.flatnonzero(info.get("_rm_score", np.zeros(N, bool))):
            vec_ends[i] = {k: v[i] for k, v in info.items() if not k.startswith("_")}
    # vector ResponseGen
    envs["response_vec"].reset(options={"prompts": prompts})
    _, rv_ret, rv_term, _, rv_info = envs["response_vec"].step({"tokens": tok_mat, "logprobs": lp_mat,
                                                                "length": lengths})
    assert rv_term.all()
    for i, (p, tokens, lps) in enumerate(episodes):
        L = len(tokens)
        tok_rewards, tok_infos, term, trunc = run_token(envs["token"], p, tokens, lps)
        envs["response"].reset(options={"prompt": p})
        _, ret, _, _, r_info = envs["response"].step(response_action(tokens, lps, pad))
        text = world.render_messages(p) if isinstance(p, list) else p
        want, ref, rm = expected_episode(world, policy, text, tokens, lps, eos)
        assert len(tok_rewards) == L == r_info["response_length"]
        np.testing.assert_allclose(tok_rewards, want, atol=ATOL)  # the same reward and KL as computed by hand
        np.testing.assert_allclose(r_info["rewards"], tok_rewards, atol=ATOL)  # per token, single envs
        np.testing.assert_allclose(tok_infos[-1]["rewards"], tok_rewards, atol=ATOL)
        np.testing.assert_allclose(ret, tok_rewards.sum(), atol=ATOL)  # returns
        np.testing.assert_allclose(vec_rewards[i, :L], tok_rewards, atol=ATOL)
        assert np.all(vec_rewards[i, L:] == 0)
        np.testing.assert_allclose(rv_info["rewards"][i, :L], tok_rewards, atol=ATOL)
        np.testing.assert_allclose(rv_ret[i], ret, atol=ATOL)
        np.testing.assert_allclose([r_info["rm_score"], vec_ends[i]["rm_score"], rv_info["rm_score"][i]], rm,
                                   atol=ATOL)
        np.testing.assert_allclose([x["ref_logprob"] for x in tok_infos], ref, atol=ATOL)
        reason = "eos" if tokens[-1] == eos else "length"
        assert tok_infos[-1]["finish_reason"] == r_info["finish_reason"] == vec_ends[i]["finish_reason"] == reason
        assert (term, trunc) == (reason == "eos", reason == "length")
        assert tok_infos[-1]["response_text"] == r_info["response_text"] == rv_info["response_text"][i]
        assert CALLS[-1][0] == [p]  # the reward saw the prompt as given: text, or messages
        if isinstance(p, list):
            assert CALLS[-1][1] == [[{"role": "assistant", "content": r_info["response_text"]}]]


# --- gymnasium API --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["rlhf_zoo/TokenGen-v0", "rlhf_zoo/ResponseGen-v0"])
def test_check_env_on_a_user_model(root, env_id) -> None:
    env = gym.make(env_id, model=str(root / "gpt2"), reward=text_reward, prompts=str(root / "prompts_conv.jsonl"),
                   max_new_tokens=T)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Box action space|reward is an inf|render fps).*")
        check_env(env.unwrapped)
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# --- prompts given at reset -----------------------------------------------------------------------------------
def test_reset_with_a_text_prompt(envs) -> None:
    for name in ("token", "response"):
        env = envs[name]
        world, P = env.core.task, env.core.prompt_width
        text = "a bird paints the hills and"
        obs, info = env.reset(options={"prompt": text})
        want = world.prompt_token_ids([text])[0]
        assert prompt_part(obs, P) == want and obs["prompt_length"] == len(want) and obs["response_length"] == 0
        ids, mask = world.encode_prompts([text])  # left-padded to P
        np.testing.assert_array_equal(obs["input_ids"][P - ids.shape[1] : P], ids[0].numpy())
        assert not obs["attention_mask"][: P - len(want)].any()
        assert (info["prompt_index"], info["prompt"]) == (-1, text)
        assert obs in env.observation_space


def test_reset_with_messages_and_with_ids(envs) -> None:
    env, P = envs["token"], envs["token"].core.prompt_width
    world = env.core.task
    obs, info = env.reset(options={"prompt": MESSAGES})
    rendered = world.render_messages(MESSAGES)
    assert rendered.startswith("<|user|>") and info["prompt"] == rendered
    assert prompt_part(obs, P) == world.prompt_token_ids([rendered])[0]
    ids = [12, 200, 7, 5]
    for given in (ids, np.array(ids), torch.tensor(ids)):
        obs, info = env.reset(options={"prompt": given})
        assert prompt_part(obs, P) == ids and info["prompt_index"] == -1
        assert info["prompt"] == world.tokenizer.decode(ids)
    obs, info = env.reset(options={"prompt_index": 2})  # the table still works
    assert info["prompt"] == env.core.prompt_texts[2]
    assert prompt_part(obs, P) == world.prompt_token_ids([env.core.prompt_texts[2]])[0]


def test_vector_reset_with_prompts(envs) -> None:
    venv = envs["token_vec"]
    world, P = venv.core.task, venv.core.prompt_width
    prompts = ["describe the sea:", MESSAGES, [9, 8, 7], "the cat"]
    obs, info = venv.reset(options={"prompts": prompts, "reset_mask": np.ones(N, bool)})
    for i, p in enumerate(prompts):
        want = p if isinstance(p[0], int) else world.prompt_token_ids(
            [world.render_messages(p) if isinstance(p, list) else p])[0]
        assert obs["input_ids"][i, :P][obs["attention_mask"][i, :P].astype(bool)].tolist() == want
    assert info["prompt_index"].tolist() == [-1] * N and info["prompt"][0] == "describe the sea:"
    obs, info = venv.reset(options={"prompt": "the cat"})  # one prompt for every row
    assert (obs["input_ids"] == obs["input_ids"][:1]).all() and list(info["prompt"]) == ["the cat"] * N
    with pytest.raises(ValueError, match="needs 4 prompt"):
        venv.reset(options={"prompts": prompts[:3]})


@pytest.mark.parametrize("name", ["token", "token_vec", "response", "response_vec"])
def test_unknown_reset_option_raises(envs, name) -> None:
    env = envs[name]
    with pytest.raises(ValueError, match=r"unknown reset option 'promt'; known: prompt, prompts, prompt_index"):
        env.reset(options={"promt": "hello"})
    with pytest.raises(ValueError, match="both choose the prompts"):
        env.reset(options={"prompt": "hello", "prompt_index": 0})
    env.reset(options={})  # empty options are fine (gymnasium's checker passes them)


def test_bad_prompts_raise_clear_errors(envs) -> None:
    env = envs["response"]
    P = env.core.prompt_width
    with pytest.raises(ValueError, match=rf"prompt width P = {P}.*prompt_width="):
        env.reset(options={"prompt": "the cat likes a ball " * 10})
    with pytest.raises(ValueError, match="no tokens"):
        env.reset(options={"prompt": ""})
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 400\)"):
        env.reset(options={"prompt": [1, 400]})
    with pytest.raises(ValueError, match="a prompt is a text"):
        env.reset(options={"prompt": 3.5})


def test_a_user_model_without_prompts_takes_them_at_reset(root) -> None:
    env = TokenGenEnv(model=str(root / "gpt2"), reward=text_reward, max_new_tokens=T)
    assert env.core.prompt_width == 128 - T  # the context left for a prompt
    with pytest.raises(ValueError, match="no prompts of its own"):
        env.reset()
    obs, info = env.reset(options={"prompt": MESSAGES})
    env.step({"token": env.core.eos_token_id, "logprob": np.float32(-1.0)})
    assert CALLS[-1][0] == [MESSAGES]  # the reward still sees the messages


def test_world_and_reward_arguments_are_checked(root, exact_task) -> None:
    with pytest.raises(ValueError, match="needs reward="):
        TokenGenEnv(model=str(root / "gpt2"), prompts=PROMPTS)
    with pytest.raises(ValueError, match="go with model="):
        TokenGenEnv(exact_task, prompts=PROMPTS)
    with pytest.raises(ValueError, match="not both"):
        TokenGenEnv(exact_task, model=str(root / "gpt2"), reward=text_reward)
    with pytest.raises(TypeError, match="needs a world"):
        ResponseGenVectorEnv(2)
    with pytest.raises(TypeError, match="'rewards'"):
        TokenGenEnv(model=str(root / "gpt2"), rewards=text_reward)


def test_a_callable_reward_on_a_builtin_task(exact_task) -> None:
    """On a built-in task reward= keeps "proxy" | "gold", and also takes a Python callable."""
    env = ResponseGenVectorEnv(2, task=exact_task, reward=text_reward, beta=0.0)
    env.reset(options={"prompt_indices": [0, 1]})
    eos = exact_task.eos_token_id
    tokens = np.array([[5, 6, eos, 0], [6, 6, 6, 6]])
    _, ret, _, _, info = env.step({"tokens": tokens, "logprobs": np.zeros((2, 4), np.float32),
                                   "length": np.array([3, 4])})
    texts = [exact_task.tokenizer.decode([5, 6]), exact_task.tokenizer.decode([6, 6, 6, 6])]
    want = [0.25 * 2 - 0.1 * texts[0].count("e"), 0.25 * 4 - 0.1 * texts[1].count("e")]
    np.testing.assert_allclose(info["rm_score"], want, atol=ATOL)
    np.testing.assert_allclose(ret, want, atol=ATOL)
    assert CALLS[-1][0] == exact_task.prompts("train")[:2]
    with pytest.raises(ValueError, match="unknown reward 'prxy'; known: proxy, gold"):
        ResponseGenVectorEnv(2, task=exact_task, reward="prxy")


def test_prompts_as_a_dataset_and_the_all_split(root, envs) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    env = ResponseGenEnv(model=str(root / "gpt2"), reward=text_reward, prompts=ds, max_new_tokens=T, split="all",
                         prompt_width=40, gold=text_reward)
    world = env.core.task
    assert world.has_gold and world.describe()["gold"] == f"{__name__}:text_reward"
    gold = world.gold([PROMPTS[0], PROMPTS[1]], ["see me", "a cat"])["gold"]  # a callable gold, on text
    n = [len(world.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ("see me", "a cat")]
    np.testing.assert_allclose(gold, [0.25 * n[0] - 0.3, 0.25 * n[1]], atol=ATOL)
    assert env.core.prompt_texts == world.prompts("train") + world.prompts("eval")
    assert world.prompts("train") == envs["token"].core.prompt_texts  # the same seeded split as the list's
    assert sorted(env.core.prompt_texts) == sorted(set(PROMPTS))


def test_make_on_loaded_objects_equals_make_on_the_directory(root, envs) -> None:
    model = AutoModelForCausalLM.from_pretrained(root / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(root / "gpt2")
    env = gym.make("rlhf_zoo/ResponseGen-v0", model=model, tokenizer=tokenizer, reward=text_reward, prompts=PROMPTS,
                   max_new_tokens=T, beta=BETA, prompt_width=40)
    assert env.unwrapped.core.ref_model is not model
    action = response_action([17, 42, 99, 5], [-1.0, -2.0, -0.5, -1.5], 0)
    infos = []
    for e in (env, envs["response"]):
        obs, _ = e.reset(options={"prompt": MESSAGES})
        infos.append((obs, *e.step(action)[1:]))
    np.testing.assert_array_equal(infos[0][0]["input_ids"], infos[1][0]["input_ids"])
    np.testing.assert_allclose(infos[0][1], infos[1][1], atol=ATOL)  # the same return
    np.testing.assert_allclose(infos[0][4]["rewards"], infos[1][4]["rewards"], atol=ATOL)
