"""Issue 14 item 5: ``zoo eval`` scores a saved policy without training, by the evaluation a run ends with,
and ``zoo run best-of-n --prompts F`` answers a prompt file.

  * ``zoo eval RUN_DIR`` on a finished run gives its summary.json figures (smoke ppo on ``exact``, exact
    figures included, and on ``sentiment``; a best-of-n run, whose policy is rebuilt from its config; a run
    on a user's own model) and the rows of its last samples/iter-N.jsonl
  * a policy directory alone, scored with ``--task``; any Hugging Face causal LM with the own-model options
  * user mistakes are one line naming the path: no such directory, a file, not a run, no policy/, a reward
    model (with its held-out accuracy), a vocabulary that is not the task's, two worlds at once
  * best-of-n ``--prompts``: one responses.jsonl row per prompt row in order, each score recomputed with the
    reward function, and the best of 4 scores higher than the best of 1

Everything runs in-process through `rlhf_zoo.cli.main` at the ``smoke`` preset on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_cli import _plain_registry, one_line_error  # noqa: F401 - the autouse fixture: a fresh registry, a scratch cwd

from rlhf_zoo.cli import main
from rlhf_zoo.registry import get_registry

SMOKE = ["--preset", "smoke", "--device", "cpu", "--quiet"]
EVAL = ["--device", "cpu", "--quiet"]
#: summary.json figures that zoo eval must give again
FIGURES = ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_reference", "response_length", "eos_rate",
           "baseline_gold_reward", "baseline_proxy_reward", "baseline_kl_to_ref", "baseline_response_length")
EXACT_FIGURES = ("gold_reward", "proxy_reward", "kl_to_ref", "kl_to_optimum", "frontier_efficiency",
                 "frontier_reward_at_kl", "baseline_gold_reward", "baseline_kl_to_optimum")
CHARS_REWARD = '''
def chars(prompts, completions, **kwargs):
    """The completion's length in characters (a reward that varies a lot between samples)."""
    return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]
'''


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def evaluation(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def same_figures(expected: dict, got: dict, keys: tuple[str, ...]) -> None:
    present = [k for k in keys if k in expected]
    assert len(present) >= 3, f"too few figures to compare: {present}"
    for k in present:
        assert got[k] == pytest.approx(expected[k], abs=1e-6, rel=0), (k, expected[k], got[k])


def last_samples(run: Path) -> list[dict] | None:
    files = sorted((run / "samples").glob("iter-*.jsonl")) if (run / "samples").is_dir() else []
    return [json.loads(line) for line in files[-1].read_text().splitlines()] if files else None


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory) -> Path:
    """A finished smoke ppo run on ``exact``, kept pristine (tests copy it before writing into it)."""
    out = tmp_path_factory.mktemp("eval-exact") / "ppo"
    get_registry(refresh=True)
    assert main(["run", "ppo", "--task", "exact", *SMOKE, "--out", str(out)]) == 0
    return out


@pytest.fixture
def exact_copy(exact_run, tmp_path) -> Path:
    out = tmp_path / "ppo-exact"
    shutil.copytree(exact_run, out)
    return out


# --- a finished run evaluated again gives its summary.json ---------------------------------------------------
def test_eval_of_an_exact_run_reproduces_its_summary(exact_copy, capsys):
    assert main(["eval", str(exact_copy), *EVAL]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"eval of ppo run {exact_copy} on exact (seed 0): gold_reward=")
    out = exact_copy / "eval" / "exact-s0"  # the default --out of a run directory
    got, want = evaluation(out), summary(exact_copy)
    same_figures(want, got, EXACT_FIGURES)
    assert got["kl_to_optimum"] == want["kl_to_optimum"] and got["frontier_efficiency"] == want["frontier_efficiency"]
    assert got["evaluation"] == {"eval_prompts": 2, "eval_samples": 1, "temperature": 1.0, "max_new_tokens": 4,
                                 "beta": json.loads((exact_copy / "config.json").read_text())["beta"]}
    assert (got["run"], got["algorithm"], got["task"], got["seed"]) == (str(exact_copy), "ppo", "exact", 0)
    samples = rows(out / "samples.jsonl")  # on exact: one row per prompt, expectations under the policy
    assert sum(r["gold_score"] for r in samples) / len(samples) == pytest.approx(want["gold_reward"], abs=1e-9)
    if last_samples(exact_copy) is not None:
        assert samples == last_samples(exact_copy)
    # the run's policy/ given instead of the run: the same run, the same figures
    assert main(["eval", str(exact_copy / "policy"), *EVAL, "--out", str(exact_copy / "eval" / "from-policy")]) == 0
    same_figures(want, evaluation(exact_copy / "eval" / "from-policy"), EXACT_FIGURES)


def test_eval_of_a_sentiment_run_reproduces_its_summary_and_samples(tmp_path):
    run = tmp_path / "ppo-sentiment"
    assert main(["run", "ppo", "--task", "sentiment", *SMOKE, "--out", str(run)]) == 0
    assert main(["eval", str(run), *EVAL]) == 0
    got, want = evaluation(run / "eval" / "sentiment-s0"), summary(run)
    same_figures(want, got, FIGURES)
    for k in ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_reference", "response_length"):
        assert got[k] == want[k], k  # bit for bit: the same samples from the same seed
    samples = rows(run / "eval" / "sentiment-s0" / "samples.jsonl")
    assert len(samples) == want["eval_prompts"] * json.loads((run / "config.json").read_text())["config"]["eval_samples"]
    assert sum(r["gold_score"] for r in samples) / len(samples) == pytest.approx(want["gold_reward"], abs=1e-9)
    if last_samples(run) is not None:
        assert samples == last_samples(run)
    # another seed and more samples: other figures, written where --out says
    assert main(["eval", str(run), *EVAL, "--seed", "5", "--eval-samples", "3", "--out", str(tmp_path / "other")]) == 0
    other = evaluation(tmp_path / "other")
    assert other["seed"] == 5 and other["evaluation"]["eval_samples"] == 3
    assert len(rows(tmp_path / "other" / "samples.jsonl")) == want["eval_prompts"] * 3
    assert (other["gold_reward"], other["kl_to_ref"]) != (want["gold_reward"], want["kl_to_ref"])


def test_eval_json_prints_eval_json_alone(exact_copy, capsys):
    assert main(["eval", str(exact_copy), *EVAL, "--json", "--out", str(exact_copy / "eval" / "j")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == evaluation(exact_copy / "eval" / "j")
    assert printed["gold_reward"] == summary(exact_copy)["gold_reward"]


def test_eval_rebuilds_a_best_of_n_run(tmp_path):
    run = tmp_path / "bon"
    assert main(["run", "best-of-n", "--task", "exact", *SMOKE, "--n", "4", "--out", str(run)]) == 0
    assert main(["eval", str(run), *EVAL]) == 0
    got, want = evaluation(run / "eval" / "exact-s0"), summary(run)
    same_figures(want, got, EXACT_FIGURES)
    assert got["n"] == 4 and got["kl_bound"] == want["kl_bound"]
    assert got["gold_reward"] > got["baseline_gold_reward"] + 0.05  # best-of-4, not the saved SFT policy


# --- a policy directory alone, any HF model -----------------------------------------------------------------
def test_policy_directory_alone_with_task(exact_run, tmp_path, capsys):
    alone = tmp_path / "my-policy"
    shutil.copytree(exact_run / "policy", alone)
    assert main(["eval", str(alone), "--task", "exact", *EVAL]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"eval of {alone} on exact (seed 0):")
    got = evaluation(Path("evals") / "my-policy-exact-s0")  # the default --out: evals/ in the current directory
    same_figures(summary(exact_run), got, EXACT_FIGURES)  # exact figures: the run's, without its config
    assert got["run"] is None and got["algorithm"] is None


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """A tiny GPT-2 with its tokenizer, the fixtures' prompt files and a character-count reward."""
    from rlhf_zoo.fixtures import build_all

    root = build_all(tmp_path_factory.mktemp("eval-user"), architectures=("gpt2",), pretrain_steps=20, rm_steps=0)
    (root / "zoo_eval_rewards.py").write_text(CHARS_REWARD)
    return root


def test_any_hf_model_with_the_own_model_options(fx, monkeypatch):
    monkeypatch.chdir(fx)  # module:function rewards import from the current directory
    reward = "zoo_eval_rewards:chars"
    assert main(["eval", "gpt2", "--reward", reward, "--gold", reward, "--prompts", "prompts.jsonl", *EVAL,
                 "--out", "evals/self"]) == 0
    got = evaluation(fx / "evals" / "self")
    # the model is its own reference: the same samples from the same seed, KL 0, every pair tied
    assert got["win_rate_vs_reference"] == 0.5
    assert got["proxy_reward"] == got["baseline_proxy_reward"] and got["gold_reward"] == got["baseline_gold_reward"]
    assert abs(got["kl_to_ref"]) < 1e-4
    assert got["gold_reward"] == pytest.approx(got["proxy_reward"], rel=1e-6)  # the same function (fp32 / fp64)
    assert got["gold_reward"] > 10  # responses are not empty
    assert got["setup"]["model"] == "gpt2" and got["task"] == "user"


def test_eval_of_a_run_on_an_own_model_reproduces_it(fx, monkeypatch, tmp_path):
    monkeypatch.chdir(fx)
    run = tmp_path / "ppo-user"
    reward = "zoo_eval_rewards:chars"
    assert main(["run", "ppo", "--model", "gpt2", "--reward", reward, "--prompts", "prompts.jsonl", *SMOKE,
                 "--out", str(run)]) == 0
    assert main(["eval", str(run), *EVAL]) == 0
    want, got = summary(run), evaluation(run / "eval" / "user-s0")
    same_figures(want, got, FIGURES)
    assert got["win_rate_vs_reference"] == want["win_rate_vs_reference"]
    # own-model options on top of the run's setup: a gold evaluator the run did not have
    assert main(["eval", str(run), *EVAL, "--gold", reward, "--out", str(tmp_path / "gold")]) == 0
    gold = evaluation(tmp_path / "gold")
    assert "gold_reward" not in want and gold["gold_reward"] == pytest.approx(want["proxy_reward"], abs=1e-6)


# --- one-line errors naming the path ------------------------------------------------------------------------
def test_eval_errors_are_one_line(exact_run, fx, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing"), *EVAL]) != 0
    assert one_line_error(capsys) == f"zoo: error: {tmp_path / 'nothing'}: no such directory"
    assert main(["eval", str(exact_run / "summary.json"), *EVAL]) != 0
    assert "a file, not a run directory" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), *EVAL]) != 0
    assert f"{tmp_path / 'empty'}: not a run directory" in one_line_error(capsys)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(exact_run / "config.json", unfinished / "config.json")
    assert main(["eval", str(unfinished), *EVAL]) != 0
    assert f"{unfinished}: the run directory has no policy/" in one_line_error(capsys)
    assert main(["eval", str(exact_run), "--task", "sentiment", *EVAL]) != 0
    msg = one_line_error(capsys)
    assert f"{exact_run}: the policy's vocabulary" in msg and "does not match task 'sentiment'" in msg
    assert main(["eval", str(fx / "gpt2"), "--task", "exact", *EVAL]) != 0
    assert "does not match task 'exact'" in one_line_error(capsys)
    assert main(["eval", str(exact_run), "--task", "exact", "--reward", "length", *EVAL]) != 0
    assert "two different worlds" in one_line_error(capsys)
    assert main(["eval", str(exact_run), "--lora-r", "8", *EVAL]) != 0
    assert "--lora-r" in one_line_error(capsys)


def test_a_reward_model_is_refused_with_its_accuracy(tmp_path, capsys):
    rm = tmp_path / "rm"
    assert main(["run", "reward-model", "--task", "exact", *SMOKE, "--out", str(rm)]) == 0
    accuracy = summary(rm)["heldout_label_accuracy"]
    capsys.readouterr()
    for target in (rm, rm / "model"):
        assert main(["eval", str(target), *EVAL]) != 0
        msg = one_line_error(capsys)
        assert msg.startswith(f"zoo: error: {target} is a reward model, not a policy")
        assert f"heldout_label_accuracy {accuracy:.4g}" in msg and f"--reward {rm / 'model'}" in msg


# --- best-of-n serves a prompt file ---------------------------------------------------------------------------
def test_best_of_n_writes_the_chosen_responses_of_a_prompt_file(fx, monkeypatch, tmp_path):
    import sys

    monkeypatch.chdir(fx)
    monkeypatch.syspath_prepend(str(fx))
    from zoo_eval_rewards import chars

    reward = "zoo_eval_rewards:chars"
    means = {}
    for n in (1, 4):
        run = tmp_path / f"bon-{n}"
        assert main(["run", "best-of-n", "--model", "gpt2", "--reward", reward, "--prompts", "prompts_conv.jsonl",
                     *SMOKE, "--n", str(n), "--max-new-tokens", "12", "--out", str(run)]) == 0
        given = [json.loads(line)["prompt"] for line in (fx / "prompts_conv.jsonl").read_text().splitlines()]
        served = rows(run / "responses.jsonl")
        assert len(served) == len(given) == summary(run)["responses"] == 64
        assert [r["prompt"] for r in served] == given  # as given (message lists), in file order
        assert all(set(r) == {"prompt", "response", "score", "n", "response_length", "eos"} for r in served)
        assert all(r["n"] == n and 1 <= r["response_length"] <= 12 for r in served)
        # each score is what the reward gives the chosen response (no missing-EOS penalty on an own model)
        again = chars([r["prompt"] for r in served], [[{"role": "assistant", "content": r["response"]}] for r in served])
        assert [r["score"] for r in served] == again
        means[n] = sum(again) / len(again)
    assert means[4] > means[1] + 1  # the longest of 4 beats a single draw (the reward counts characters)
    del sys.modules["zoo_eval_rewards"]


def test_best_of_n_prompt_file_bad_row_is_one_line(fx, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(fx)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "describe a dog:"}\n{"prompt": "tell me about the cat:"}\n{"text": "no prompt"}\n')
    assert main(["run", "best-of-n", "--model", "gpt2", "--reward", "length", "--prompts", str(bad), *SMOKE,
                 "--out", str(tmp_path / "bon")]) != 0
    msg = one_line_error(capsys)
    assert "bad.jsonl row 3" in msg and "prompt" in msg
