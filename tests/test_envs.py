"""The text-generation environments: gymnasium API, reward placement, TokenGen == ResponseGen, seeding,
the incremental reference, pad == eos."""

from __future__ import annotations

import copy
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from rlhf_zoo.generation import sample
from rlhf_zoo.ops import sequence_logprobs
from rlhf_zoo_envs.registration import register_envs
from rlhf_zoo_envs.response_gen import ResponseGenEnv, ResponseGenVectorEnv
from rlhf_zoo_envs.token_gen import TokenGenEnv, TokenGenVectorEnv

register_envs()

N = 4  # vector width
ATOL = 1e-5
# No shrinking: an example costs ~50 ms and shrinking a failure took minutes; the failing draw is printed
# as is. No example database: nothing is written into the checkout.
PROPERTY = settings(max_examples=25, deadline=None, database=None, phases=(Phase.explicit, Phase.generate))


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is as fast, and several slow down ~5x on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def envs(exact_task):
    """One env of each kind on the exact task (T = 4), built once."""
    return {
        "token": TokenGenEnv(exact_task),
        "token_vec": TokenGenVectorEnv(N, task=exact_task),
        "response": ResponseGenEnv(exact_task),
        "response_vec": ResponseGenVectorEnv(N, task=exact_task),
    }


@pytest.fixture(scope="module")
def policy(exact_task):
    return exact_task.load_policy()


@pytest.fixture(scope="module")
def pad_is_eos_task(exact_task):
    """A copy of the exact task whose tokenizer pads with EOS (so suppress_ids no longer holds pad)."""
    tok = PreTrainedTokenizerFast.from_pretrained(exact_task.path / "tokenizer")
    tok.pad_token = tok.eos_token
    variant = copy.copy(exact_task)
    variant.__dict__["tokenizer"] = tok  # the cached_property's slot
    assert variant.pad_token_id == variant.eos_token_id == exact_task.eos_token_id
    assert variant.eos_token_id not in variant.suppress_ids
    return variant


# --- helpers -----------------------------------------------------------------------------------------------
def valid_ids(task) -> list[int]:
    return [i for i in range(len(task.tokenizer)) if i not in task.suppress_ids]


def cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def run_token(env: TokenGenEnv, prompt_index: int, tokens, logprobs):
    """One TokenGen episode. -> per-step rewards, infos, terminated, truncated"""
    env.reset(options={"prompt_index": prompt_index})
    rewards, infos = [], []
    for tok, lp in zip(tokens, logprobs, strict=True):
        _, r, term, trunc, info = env.step({"token": int(tok), "logprob": np.float32(lp)})
        rewards.append(r)
        infos.append(info)
        if term or trunc:
            return np.array(rewards), infos, term, trunc
    raise AssertionError("episode did not end")


def run_token_vec(env: TokenGenVectorEnv, prompt_indices, tokens: np.ndarray, logprobs: np.ndarray):
    """Synchronous TokenGen episodes; tokens/logprobs (N, T) (entries after a row ends are ignored).
    -> rewards (N, T) by step, ref_logprobs (N, T) by step, the end info of each row, terminations, truncations"""
    env.reset(options={"prompt_indices": list(prompt_indices)})
    n, T = tokens.shape
    rewards, refs = np.zeros((n, T), np.float32), np.zeros((n, T), np.float32)
    ends: list[dict] = [{} for _ in range(n)]
    for t in range(T):
        _, r, term, trunc, info = env.step({"token": tokens[:, t], "logprob": logprobs[:, t]})
        rewards[:, t] = r
        if info:  # empty once every row is done
            refs[:, t] = np.where(info["_ref_logprob"], info["ref_logprob"], 0.0)
        for i in np.flatnonzero(info.get("_rm_score", np.zeros(n, bool))):
            ends[i] = {k: v[i] for k, v in info.items() if not k.startswith("_")}
    return rewards, refs, ends, term, trunc


def response_action(tokens, logprobs, T: int, pad: int, length: int | None = None) -> dict:
    L = len(tokens)
    ids = np.full(T, pad, np.int64)
    ids[:L] = tokens
    lp = np.zeros(T, np.float32)
    lp[:L] = logprobs
    return {"tokens": ids, "logprobs": lp, "length": L if length is None else length}


@st.composite
def responses(draw, ids: list[int], eos: int, T: int, n_prompts: int):
    """(prompt index, tokens, logprobs) of a complete episode: up to the first EOS, or T tokens without."""
    tokens = cut_at_eos(draw(st.lists(st.sampled_from(ids), min_size=T, max_size=T)), eos)
    logprobs = draw(st.lists(st.floats(-6.0, 0.0, width=32), min_size=len(tokens), max_size=len(tokens)))
    return draw(st.integers(0, n_prompts - 1)), tokens, logprobs


def check_all_envs_agree(envs, episodes) -> None:
    """Every env pays the same per-token rewards for the same (prompt, tokens, logprobs) episodes."""
    core = envs["token"].core
    T, pad = core.max_new_tokens, core.pad_token_id
    assert len(episodes) == N
    idx = [e[0] for e in episodes]
    tok_mat, lp_mat = np.full((N, T), pad, np.int64), np.zeros((N, T), np.float32)
    for i, (_, tokens, lps) in enumerate(episodes):
        tok_mat[i, : len(tokens)], lp_mat[i, : len(tokens)] = tokens, lps
    vec_rewards, _, vec_ends, _, _ = run_token_vec(envs["token_vec"], idx, tok_mat, lp_mat)

    envs["response_vec"].reset(options={"prompt_indices": idx})
    lengths = np.array([len(e[1]) for e in episodes])
    _, rv_ret, rv_term, rv_trunc, rv_info = envs["response_vec"].step(
        {"tokens": tok_mat, "logprobs": lp_mat, "length": lengths})
    assert rv_term.all() and not rv_trunc.any()

    for i, (p, tokens, lps) in enumerate(episodes):
        L = len(tokens)
        tok_rewards, tok_infos, term, trunc = run_token(envs["token"], p, tokens, lps)
        envs["response"].reset(options={"prompt_index": p})
        _, ret, r_term, r_trunc, r_info = envs["response"].step(response_action(tokens, lps, T, pad))
        assert (r_term, r_trunc) == (True, False)
        assert len(tok_rewards) == L == r_info["response_length"]
        np.testing.assert_allclose(tok_rewards, r_info["rewards"], atol=ATOL)  # per token, single envs
        np.testing.assert_allclose(tok_rewards, tok_infos[-1]["rewards"], atol=ATOL)
        np.testing.assert_allclose(tok_rewards.sum(), ret, atol=ATOL)  # returns
        np.testing.assert_allclose(vec_rewards[i, :L], tok_rewards, atol=ATOL)  # vector TokenGen
        assert np.all(vec_rewards[i, L:] == 0)
        np.testing.assert_allclose(rv_info["rewards"][i, :L], tok_rewards, atol=ATOL)  # vector ResponseGen
        np.testing.assert_allclose(rv_ret[i], ret, atol=ATOL)
        np.testing.assert_allclose(vec_ends[i]["rm_score"], r_info["rm_score"], atol=ATOL)
        np.testing.assert_allclose([t["kl"] for t in tok_infos], r_info["kl"], atol=ATOL)
        reason = "eos" if tokens[-1] == core.eos_token_id else "length"
        assert tok_infos[-1]["finish_reason"] == r_info["finish_reason"] == vec_ends[i]["finish_reason"] == reason
        assert (term, trunc) == (reason == "eos", reason == "length")
        assert tok_infos[-1]["response_text"] == r_info["response_text"] == rv_info["response_text"][i]


def sampled_episodes(task, policy, prompt_indices, seed: int, T: int):
    """Responses sampled from the SFT (= reference) policy with `rlhf_zoo.generation.sample`."""
    prompts = task.prompts("train")
    ids, mask = task.encode_prompts([prompts[i] for i in prompt_indices])
    s = sample(policy, ids, mask, T, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
               suppress_ids=task.suppress_ids, generator=torch.Generator().manual_seed(seed))
    out = []
    for i, p in enumerate(prompt_indices):
        L = int(s.lengths[i])
        out.append((int(p), s.response_ids[i, :L].tolist(), s.logprobs[i, :L].tolist()))
    return out, s


# --- gymnasium API -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["rlhf_zoo/TokenGen-v0", "rlhf_zoo/ResponseGen-v0"])
def test_check_env(exact_task, env_id) -> None:
    env = gym.make(env_id, task=exact_task)
    with warnings.catch_warnings():
        # expected: the log-prob Box is unbounded below, token Boxes are not in [-1, 1], and a random
        # action can be a suppressed id (reference log-prob -inf, reward -inf)
        warnings.filterwarnings("ignore", message=".*(Box action space|reward is an inf|render fps).*")
        check_env(env.unwrapped)


@pytest.mark.parametrize(("env_id", "cls"), [("rlhf_zoo/TokenGen-v0", TokenGenVectorEnv),
                                             ("rlhf_zoo/ResponseGen-v0", ResponseGenVectorEnv)])
def test_make_vec_returns_the_batched_env(exact_task, env_id, cls) -> None:
    env = gym.make_vec(env_id, num_envs=4, task=exact_task)
    assert type(env) is cls
    assert env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.DISABLED
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    P, T = env.core.prompt_width, env.core.max_new_tokens
    assert obs["input_ids"].shape == (4, P + T)
    register_envs()  # idempotent


# --- equivalence -------------------------------------------------------------------------------------------
@PROPERTY
@given(data=st.data())
def test_token_and_response_envs_pay_the_same_random_tokens(envs, exact_task, data) -> None:
    T = envs["token"].core.max_new_tokens
    strategy = responses(valid_ids(exact_task), exact_task.eos_token_id, T, len(exact_task.prompts("train")))
    check_all_envs_agree(envs, [data.draw(strategy) for _ in range(N)])


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), prompts=st.lists(st.integers(0, 511), min_size=N, max_size=N))
def test_token_and_response_envs_pay_the_same_sampled(envs, exact_task, policy, seed, prompts) -> None:
    episodes, _ = sampled_episodes(exact_task, policy, prompts, seed, envs["token"].core.max_new_tokens)
    check_all_envs_agree(envs, episodes)


def test_step_tensors_matches_step(envs, exact_task, policy) -> None:
    env = envs["response_vec"]
    idx = [0, 1, 2, 3]
    _, s = sampled_episodes(exact_task, policy, idx, 7, env.core.max_new_tokens)
    env.reset(options={"prompt_indices": idx})
    res = env.step_tensors(s.response_ids, s.response_mask, s.logprobs)
    env.reset(options={"prompt_indices": idx})
    _, ret, _, _, info = env.step({"tokens": s.response_ids.numpy(), "logprobs": s.logprobs.numpy(),
                                   "length": s.lengths.numpy()})
    np.testing.assert_allclose(res["rewards"].numpy(), info["rewards"], atol=ATOL)
    np.testing.assert_allclose(res["returns"].numpy(), ret, atol=ATOL)
    assert torch.equal(res["response_mask"], s.response_mask)
    with pytest.raises(RuntimeError):
        env.step_tensors(s.response_ids, s.response_mask, s.logprobs)  # the episodes are over


# --- where the reward sits ---------------------------------------------------------------------------------
def test_score_lands_on_the_last_real_token(envs, exact_task, policy) -> None:
    """With logprob == ref_logprob (sampled from the reference itself) the KL part vanishes: the only
    non-zero reward is the score, on the last real token."""
    T = envs["token"].core.max_new_tokens
    episodes, _ = sampled_episodes(exact_task, policy, list(range(16)), 3, T)
    for p, tokens, lps in episodes:
        rewards, infos, _, _ = run_token(envs["token"], p, tokens, lps)
        end = infos[-1]
        np.testing.assert_allclose(rewards[:-1], 0.0, atol=ATOL)
        np.testing.assert_allclose(rewards[-1], end["score"], atol=ATOL)
        np.testing.assert_allclose(end["rewards"][-1], end["score"], atol=ATOL)
        envs["response"].reset(options={"prompt_index": p})
        _, _, _, _, info = envs["response"].step(response_action(tokens, lps, T, exact_task.pad_token_id))
        np.testing.assert_allclose(info["rewards"][:-1], 0.0, atol=ATOL)
        np.testing.assert_allclose(info["rewards"][-1], info["score"], atol=ATOL)


def test_missing_eos_penalty_applied_once_and_only_without_eos(exact_task) -> None:
    penalty = 1.5
    plain = ResponseGenVectorEnv(N, task=exact_task, missing_eos_penalty=0.0)
    penal = ResponseGenVectorEnv(N, task=exact_task, missing_eos_penalty=penalty)
    tok_env = TokenGenEnv(exact_task, missing_eos_penalty=penalty)
    eos, pad = exact_task.eos_token_id, exact_task.pad_token_id
    x, y = valid_ids(exact_task)[1:3]
    rows = [[x, eos], [x, y, x, y], [y, x], [eos]]  # EOS, cut at T, no EOS and short, EOS only
    T = plain.core.max_new_tokens
    actions = [response_action(r, [-1.0] * len(r), T, pad) for r in rows]
    batch = {k: np.stack([a[k] for a in actions]) for k in ("tokens", "logprobs", "length")}
    infos = []
    for env in (plain, penal):
        env.reset(options={"prompt_indices": [0, 1, 2, 3]})
        infos.append(env.step(batch)[4])
    no_eos = np.array([eos not in r for r in rows])
    np.testing.assert_allclose(infos[1]["rm_score"], infos[0]["rm_score"], atol=ATOL)
    np.testing.assert_allclose(infos[1]["score"], infos[1]["rm_score"] - penalty * no_eos, atol=ATOL)
    diff = infos[1]["rewards"] - infos[0]["rewards"]  # (N, T)
    expected = np.zeros_like(diff)
    for i, r in enumerate(rows):
        expected[i, len(r) - 1] = -penalty * no_eos[i]
    np.testing.assert_allclose(diff, expected, atol=ATOL)
    assert list(infos[1]["finish_reason"]) == ["eos", "length", "length", "eos"]
    # the same through TokenGen: the penalty sits once, on the last step
    rewards, step_infos, term, trunc = run_token(tok_env, 1, rows[1], [-1.0] * 4)
    np.testing.assert_allclose(rewards, infos[1]["rewards"][1], atol=ATOL)
    assert (term, trunc) == (False, True) and step_infos[-1]["finish_reason"] == "length"


def test_finish_reason_and_termination(exact_task) -> None:
    eos = exact_task.eos_token_id
    x, y, z = valid_ids(exact_task)[1:4]
    default = TokenGenEnv(exact_task)
    terminal = TokenGenEnv(exact_task, truncation_is_terminal=True)
    response = ResponseGenEnv(exact_task, truncation_is_terminal=True)
    # EOS: terminated at the EOS step whatever the setting
    for env in (default, terminal):
        _, infos, term, trunc = run_token(env, 0, [x, eos], [-1.0, -1.0])
        assert (term, trunc, infos[-1]["finish_reason"], len(infos)) == (True, False, "eos", 2)
    # cut at T without EOS: truncated, or terminated under truncation_is_terminal
    _, infos, term, trunc = run_token(default, 0, [x, y, z, x], [-1.0] * 4)
    assert (term, trunc, infos[-1]["finish_reason"]) == (False, True, "length")
    assert all("finish_reason" not in i for i in infos[:-1])
    _, infos, term, trunc = run_token(terminal, 0, [x, y, z, x], [-1.0] * 4)
    assert (term, trunc, infos[-1]["finish_reason"]) == (True, False, "length")
    # ResponseGen always terminates after its one step
    response.reset(options={"prompt_index": 0})
    obs, _, term, trunc, info = response.step(response_action([x, y, z, x], [-1.0] * 4, 4, 0))
    assert (term, trunc, info["finish_reason"]) == (True, False, "length")
    assert obs["response_length"] == 4


def test_done_rows_ignore_further_actions(exact_task) -> None:
    env = TokenGenVectorEnv(N, task=exact_task)
    eos = exact_task.eos_token_id
    x = valid_ids(exact_task)[1]
    env.reset(options={"prompt_indices": [0, 1, 2, 3]})
    obs, r, term, trunc, info = env.step({"token": np.array([eos, x, x, eos]), "logprob": np.full(N, -1.0, np.float32)})
    assert term.tolist() == [True, False, False, True] and not trunc.any()
    assert info["_rm_score"].tolist() == [True, False, False, True]
    frozen = {k: v[[0, 3]].copy() for k, v in obs.items()}
    for t in range(3):
        # garbage (even out of range) for the finished rows is ignored
        tokens = np.array([999, eos if t == 1 else x, x, 5])
        obs, r, term, trunc, info = env.step({"token": tokens, "logprob": np.array([-9, -1, -1, -9], np.float32)})
        assert r[0] == 0 and r[3] == 0
        assert term[0] and term[3] and not trunc[0] and not trunc[3]
        assert not info["_ref_logprob"][0] and not info["_ref_logprob"][3]
        assert not info.get("_rm_score", np.zeros(N, bool))[[0, 3]].any()
        for k, v in frozen.items():
            np.testing.assert_array_equal(obs[k][[0, 3]], v)
    assert term.tolist() == [True, True, False, True] and trunc.tolist() == [False, False, True, False]
    # everything done: further steps change nothing
    obs2, r, term2, trunc2, info = env.step({"token": np.full(N, x), "logprob": np.zeros(N, np.float32)})
    assert not r.any() and info == {} and (term2 == term).all() and (trunc2 == trunc).all()
    np.testing.assert_array_equal(obs2["input_ids"], obs["input_ids"])
    env.reset(options={"prompt_indices": [0, 1, 2, 3]})
    with pytest.raises(ValueError):  # out-of-range tokens of live rows are refused
        env.step({"token": np.array([x, x, x, 999]), "logprob": np.zeros(N, np.float32)})


# --- seeding and prompts -----------------------------------------------------------------------------------
def test_seeding_and_prompt_options(envs, exact_task) -> None:
    env, venv = envs["token"], envs["token_vec"]
    a, info_a = env.reset(seed=5)
    b, info_b = env.reset(seed=5)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert info_a["prompt_index"] == info_b["prompt_index"]
    assert len({env.reset(seed=s)[1]["prompt_index"] for s in range(20)}) > 1
    va, _ = venv.reset(seed=5)
    vb, _ = venv.reset(seed=5)
    np.testing.assert_array_equal(va["input_ids"], vb["input_ids"])
    assert len({tuple(venv.reset(seed=s)[1]["prompt_index"]) for s in range(5)}) > 1
    prompts = exact_task.prompts("train")
    for i in (0, 7, 511):
        obs, info = env.reset(seed=1, options={"prompt_index": i})
        assert info["prompt_index"] == i and info["prompt"] == prompts[i]
        ids, mask = exact_task.encode_prompts([prompts[i]])
        P = env.core.prompt_width
        np.testing.assert_array_equal(obs["input_ids"][P - ids.shape[1] : P], ids[0].numpy())
        assert obs["prompt_length"] == mask.sum() and obs["response_length"] == 0
    obs, info = venv.reset(options={"prompt_indices": [3, 1, 4, 1]})
    assert info["prompt_index"].tolist() == [3, 1, 4, 1]
    obs, info = envs["response"].reset(options={"prompt_index": 9})
    assert info["prompt_index"] == 9


# --- the incremental reference -----------------------------------------------------------------------------
def test_incremental_reference_equals_full_forward(exact_task, policy) -> None:
    n = 16
    env = TokenGenVectorEnv(n, task=exact_task)
    T, P = env.core.max_new_tokens, env.core.prompt_width
    idx = list(range(0, 512, 512 // n))
    episodes, s = sampled_episodes(exact_task, policy, idx, 11, T)
    assert len(set(s.lengths.tolist())) > 1  # rows finish at different steps
    _, refs, ends, _, _ = run_token_vec(env, idx, s.response_ids.numpy(), s.logprobs.numpy())
    prompt_ids, prompt_mask = env.core.prompts(np.array(idx))
    full = sequence_logprobs(policy, torch.cat([prompt_ids, s.response_ids], 1),
                             torch.cat([prompt_mask, s.response_mask], 1), P, suppress_ids=exact_task.suppress_ids)
    full = torch.where(s.response_mask.bool(), full, 0.0).detach().numpy()
    np.testing.assert_allclose(refs, full, atol=ATOL)
    for i in range(n):
        np.testing.assert_allclose(ends[i]["ref_logprobs"], full[i], atol=ATOL)


# --- pad == eos --------------------------------------------------------------------------------------------
def test_pad_equal_to_eos(exact_task, pad_is_eos_task) -> None:
    task = pad_is_eos_task
    eos = task.eos_token_id
    x, y = (i for i in valid_ids(exact_task)[1:3])
    T = 4
    plain = ResponseGenVectorEnv(2, task=exact_task, beta=0.0)
    venv = ResponseGenVectorEnv(2, task=task, beta=0.0)
    tok_env = TokenGenEnv(task)
    # [x, EOS] then pad(=EOS) fill; row 1 claims length T: the response still ends at its first EOS
    fill = np.array([[x, eos, eos, eos], [x, eos, eos, eos]])
    action = {"tokens": fill, "logprobs": np.full((2, T), -1.0, np.float32), "length": np.array([2, T])}
    venv.reset(options={"prompt_indices": [5, 5]})
    _, ret, _, _, info = venv.step(action)
    assert info["response_length"].tolist() == [2, 2]
    assert list(info["finish_reason"]) == ["eos", "eos"]
    for i in range(2):  # beta = 0: the score alone, on the EOS (index 1), nothing on the fill
        np.testing.assert_allclose(info["rewards"][i], [0.0, info["score"][i], 0.0, 0.0], atol=ATOL)
    # the same response with a distinct pad: the same score, read at the same token
    plain.reset(options={"prompt_indices": [5, 5]})
    pad = exact_task.pad_token_id
    _, _, _, _, ref_info = plain.step({**action, "tokens": np.array([[x, eos, pad, pad]] * 2)})
    np.testing.assert_allclose(info["rm_score"], ref_info["rm_score"], atol=ATOL)
    np.testing.assert_allclose(info["rewards"], ref_info["rewards"], atol=ATOL)
    # step_tensors given an all-ones mask (as if padding were found by id) is not fooled either
    venv.reset(options={"prompt_indices": [5, 5]})
    res = venv.step_tensors(torch.as_tensor(fill), torch.ones(2, T), torch.full((2, T), -1.0))
    assert res["response_mask"].sum(-1).tolist() == [2, 2] and res["has_eos"].all()
    # TokenGen: EOS terminates, the observation is padded with EOS but the mask says where it ends
    tok_env.reset(options={"prompt_index": 5})
    tok_env.step({"token": x, "logprob": np.float32(-1.0)})
    obs, r, term, trunc, end = tok_env.step({"token": eos, "logprob": np.float32(-1.0)})
    P = tok_env.core.prompt_width
    assert (term, trunc, end["finish_reason"], obs["response_length"]) == (True, False, "eos", 2)
    assert obs["input_ids"][P:].tolist() == [x, eos, eos, eos]
    assert obs["attention_mask"][P:].tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(end["rm_score"], info["rm_score"][0], atol=ATOL)
    np.testing.assert_allclose(end["rewards"][-1] - end["score"], -tok_env.core.beta * (-1.0 - end["ref_logprobs"][-1]),
                               atol=ATOL)
    # sampling with pad == eos: the sampler's fill is EOS; its rows score exactly like the plain task's
    prompts = task.prompts("train")[:8]
    ids, mask = task.encode_prompts(prompts)
    s = sample(task.load_policy(), ids, mask, T, eos_token_id=eos, pad_token_id=task.pad_token_id,
               suppress_ids=task.suppress_ids, generator=torch.Generator().manual_seed(0))
    short = s.finished & (s.lengths < T)
    assert short.any() and (s.response_ids[short][:, -1] == eos).all()  # EOS fill after the real EOS
    env8 = ResponseGenVectorEnv(8, task=task)
    env8.reset(options={"prompt_indices": list(range(8))})
    res = env8.step_tensors(s.response_ids, torch.ones_like(s.response_mask), s.logprobs)
    assert torch.equal(res["response_mask"], s.response_mask)
    assert (res["rewards"][s.response_mask == 0] == 0).all()
