"""DPO: the loss and its variants against hand-computed values, the data path, the cached reference
log-probs, the concatenated forward, the plugin contract, and learning runs (``slow``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_zoo.errors import ConfigError, DataError
from rlhf_zoo.hookspecs import hookimpl
from rlhf_zoo.ops import masked_sum, response_logprobs
from rlhf_zoo.registry import build_registry
from rlhf_zoo.runner import run
from rlhf_zoo_plugins.dpo import (
    DPOConfig,
    dpo_loss,
    encode_pairs,
    load_pairs,
    pair_logprobs,
    reference_logprobs,
)

LN2 = math.log(2.0)
BETA = 0.5


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), computed by hand."""
    return math.log(1.0 + math.exp(x))


def loss_of(chosen, rejected, ref_chosen, ref_rejected, **kw) -> float:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return float(dpo_loss(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), **kw)[0])


# --- the loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("loss_type", "label_smoothing", "expected"), [
    ("sigmoid", 0.0, LN2),
    ("sigmoid", 0.2, LN2),  # (1 - eps) ln 2 + eps ln 2
    ("ipo", 0.0, (1 / (2 * BETA)) ** 2),  # (0 - 1/(2 beta))^2 = 1
    ("hinge", 0.0, 1.0),  # relu(1 - 0)
])
def test_dpo_loss_special_value_when_policy_equals_reference(loss_type, label_smoothing, expected):
    lp = [-1.5, -7.0, -0.2]
    got = loss_of(lp, [-3.0, -2.0, -9.0], lp, [-3.0, -2.0, -9.0], beta=BETA, loss_type=loss_type,
                  label_smoothing=label_smoothing)
    assert got == pytest.approx(expected, abs=1e-12)


# Two pairs, beta = 0.5: log-ratios chosen (1, 0), rejected (-1, 1), so h = (2, -1) and beta h = (1, -0.5).
TWO_PAIRS = ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0])


@pytest.mark.parametrize(("loss_type", "label_smoothing", "expected"), [
    ("sigmoid", 0.0, (softplus(-1.0) + softplus(0.5)) / 2),  # 0.643669...
    # cDPO: 0.9 softplus(-beta h) + 0.1 softplus(beta h)
    ("sigmoid", 0.1, (0.9 * softplus(-1.0) + 0.1 * softplus(1.0) + 0.9 * softplus(0.5) + 0.1 * softplus(-0.5)) / 2),
    ("ipo", 0.0, ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2),  # 2.5
    ("hinge", 0.0, (max(0.0, 1 - 1.0) + max(0.0, 1 + 0.5)) / 2),  # 0.75
])
def test_dpo_loss_matches_hand_computed_two_pairs(loss_type, label_smoothing, expected):
    assert loss_of(*TWO_PAIRS, beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing) == pytest.approx(expected, rel=1e-12)


def test_dpo_loss_hand_computed_numbers():
    assert loss_of(*TWO_PAIRS, beta=BETA) == pytest.approx(0.6436693359, abs=1e-9)
    assert loss_of(*TWO_PAIRS, beta=BETA, label_smoothing=0.1) == pytest.approx(0.6686693359, abs=1e-9)


def test_dpo_loss_implicit_rewards_are_beta_times_log_ratios():
    t = [torch.tensor(v) for v in TWO_PAIRS]
    _, chosen, rejected = dpo_loss(*t, beta=BETA)
    assert chosen.tolist() == pytest.approx([0.5, 0.0])
    assert rejected.tolist() == pytest.approx([-0.5, 0.5])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_lower_when_policy_moves_towards_chosen(loss_type):
    ref = ([-2.0, -4.0], [-3.0, -1.0])
    at_ref = loss_of(*ref, *ref, beta=BETA, loss_type=loss_type)
    towards = loss_of([-1.5, -3.5], [-3.5, -1.5], *ref, beta=BETA, loss_type=loss_type)
    away = loss_of([-2.5, -4.5], [-2.5, -0.5], *ref, beta=BETA, loss_type=loss_type)
    assert towards < at_ref < away


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-2.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=BETA)
    loss.backward()
    # d/d logpi_w of -log sigmoid(beta h) at h = 0 is -beta / 2, divided by the 2 pairs of the mean
    assert chosen.grad.tolist() == pytest.approx([-BETA / 4] * 2)
    assert rejected.grad.tolist() == pytest.approx([BETA / 4] * 2)


@pytest.mark.parametrize(("options", "match"), [
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to loss_type 'sigmoid' only"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"batch_size": 0}, "batch_size must be > 0"),
    ({"max_pairs": -1}, "max_pairs must be >= 0"),
    ({"rpo_alpha": -0.1}, "rpo_alpha must be >= 0"),
    ({"loss_type": "kto"}, "loss_type must be of type one of"),
])
def test_dpo_config_rejects_bad_values(options, match):
    with pytest.raises(ConfigError, match=match):
        DPOConfig.from_dict(options)


# --- data -------------------------------------------------------------------------------------------
def test_load_pairs_user_jsonl_missing_chosen_names_the_row(exact_task, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "x y", "chosen": "x", "rejected": "y"}) + "\n"
                    + json.dumps({"prompt": "x y", "rejected": "y"}) + "\n")
    with pytest.raises(DataError, match=r"row 2: key 'chosen' is missing"):
        load_pairs(exact_task, DPOConfig(dataset=str(path)))


def test_load_pairs_ranked_responses_give_all_pairs_best_first(exact_task, tmp_path):
    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps({"prompt": "x y", "responses": ["x", "y", "z"]}) + "\n"
                    + json.dumps({"prompt": "z z", "chosen": "z", "rejected": "x x"}) + "\n")
    pairs = load_pairs(exact_task, DPOConfig(dataset=str(path)))
    assert pairs == [("x y", "x", "y"), ("x y", "x", "z"), ("x y", "y", "z"), ("z z", "z", "x x")]
    assert len(load_pairs(exact_task, DPOConfig(dataset=str(path), max_pairs=2))) == 2


def test_load_pairs_task_pairs_by_default(exact_task):
    pairs = load_pairs(exact_task, DPOConfig())
    ds = exact_task.dataset("pairs")
    assert len(pairs) == len(ds) > 1000
    assert pairs[0] == (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"])


def test_encode_pairs_counts_and_drops_identical_pairs(exact_task):
    triples = [("x y", "x", "y"), ("x y", "z z", "z z"), ("y y", "", "x"), ("z x", "x", "x"),
               ("y z", "x y z x y", "x y z x z")]  # the last differ only after the 4-token cap
    pairs, identical = encode_pairs(exact_task, triples, max_len=4, device="cpu")
    assert identical == 3
    assert len(pairs) == 2
    tok = exact_task.tokenizer
    assert pairs.chosen_ids[0, :2].tolist() == [tok.convert_tokens_to_ids("x"), tok.eos_token_id]
    assert pairs.rejected_ids[1, :2].tolist() == [tok.convert_tokens_to_ids("x"), tok.eos_token_id]
    assert pairs.chosen_mask[1].tolist() == [1, 0, 0, 0]  # the empty response is its EOS


def test_encode_pairs_all_identical_is_an_error(exact_task):
    with pytest.raises(DataError, match="all 1 preference pairs have identical"):
        encode_pairs(exact_task, [("x y", "z", "z")], max_len=4, device="cpu")


# --- log-probs --------------------------------------------------------------------------------------
TRIPLES = [("x y", "x", "y z"), ("z z", "", "x x x"), ("y", "z y x", "z"), ("x z y", "y y", "x")]


def one_pair_logprobs(task, model, prompt: str, response: str) -> float:
    """log pi(response | prompt) from a batch of one, no padding at all."""
    p_ids, p_mask = task.encode_prompts([prompt])
    r_ids, r_mask = task.encode_responses([response])
    lp = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, 1.0, task.suppress_ids)
    return float(masked_sum(lp, r_mask, dim=-1))


def test_pair_logprobs_concatenated_forward_equals_separate_forwards(exact_task):
    model = exact_task.load_policy()
    pairs, _ = encode_pairs(exact_task, TRIPLES, max_len=4, device="cpu")
    idx = torch.tensor([2, 0, 3])
    calls = []
    handle = model.register_forward_hook(lambda m, a, out: calls.append(1))
    with torch.no_grad():
        chosen, rejected, tokens = pair_logprobs(model, pairs, idx, exact_task.suppress_ids)
    handle.remove()
    assert len(calls) == 1  # one forward for chosen and rejected together
    with torch.no_grad():
        sep = []
        for ids, mask in ((pairs.chosen_ids, pairs.chosen_mask), (pairs.rejected_ids, pairs.rejected_mask)):
            lp = response_logprobs(model, pairs.prompt_ids[idx], pairs.prompt_mask[idx], ids[idx], mask[idx],
                                   1.0, exact_task.suppress_ids)
            sep.append(masked_sum(lp, mask[idx], dim=-1))
    torch.testing.assert_close(chosen, sep[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected, sep[1], rtol=0, atol=1e-5)
    assert tokens == int(pairs.prompt_mask[idx].sum()) * 2 + int(pairs.chosen_mask[idx].sum() + pairs.rejected_mask[idx].sum())


def test_reference_logprobs_precomputed_equal_on_the_fly(exact_task):
    model = exact_task.load_policy()
    pairs, _ = encode_pairs(exact_task, TRIPLES, max_len=4, device="cpu")
    ref_chosen, ref_rejected = reference_logprobs(model, pairs, exact_task.suppress_ids)
    with torch.no_grad():
        fly_chosen = [one_pair_logprobs(exact_task, model, p, c) for p, c, _ in TRIPLES]
        fly_rejected = [one_pair_logprobs(exact_task, model, p, r) for p, _, r in TRIPLES]
    assert ref_chosen.tolist() == pytest.approx(fly_chosen, abs=1e-5)
    assert ref_rejected.tolist() == pytest.approx(fly_rejected, abs=1e-5)
    assert not ref_chosen.requires_grad


# --- the plugin contract through the runner ----------------------------------------------------------
class Watcher:
    """Snapshots the run's models at the start, counts reference forwards, compares at the end."""

    def __init__(self) -> None:
        self.ref_calls_at_iteration: list[int] = []
        self.ref_calls = 0

    @hookimpl
    def on_run_start(self, run):
        self.policy0 = {k: v.detach().clone() for k, v in run.policy.named_parameters() if v.requires_grad}
        self.reference0 = {k: v.detach().clone() for k, v in run.reference.state_dict().items()}
        run.reference.register_forward_hook(lambda *a: setattr(self, "ref_calls", self.ref_calls + 1))
        self.pairs, _ = encode_pairs(run.task, load_pairs(run.task, run.config), run.max_new_tokens, run.device)
        self.ref_logprobs0 = reference_logprobs(run.reference, self.pairs, run.task.suppress_ids)
        self.ref_calls = 0

    @hookimpl
    def on_iteration_end(self, run, iteration, metrics):
        self.ref_calls_at_iteration.append(self.ref_calls)

    @hookimpl
    def on_run_end(self, run, summary):
        self.changed = {k: not torch.equal(v, dict(run.policy.named_parameters())[k]) for k, v in self.policy0.items()}
        self.reference_same = all(torch.equal(v, run.reference.state_dict()[k]) for k, v in self.reference0.items())
        self.ref_logprobs1 = reference_logprobs(run.reference, self.pairs, run.task.suppress_ids)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, exact_task):
    watcher = Watcher()
    out = tmp_path_factory.mktemp("dpo")
    summary = run("dpo", task="exact", seed=0, out=out, device="cpu", progress=False,
                  registry=build_registry(extra_plugins={"dpo-test-watcher": watcher}),
                  options={"steps": 2, "batch_size": 16, "max_pairs": 300, "warmup_steps": 0,
                           "eval_prompts": 1, "eval_samples": 1})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, watcher


def test_train_changes_every_trainable_parameter_and_not_the_reference(tiny_run):
    _, _, w = tiny_run
    assert w.changed and all(w.changed.values()), [k for k, c in w.changed.items() if not c]
    assert w.reference_same


def test_train_reference_logprobs_never_change(tiny_run):
    _, _, w = tiny_run
    for before, after in zip(w.ref_logprobs0, w.ref_logprobs1, strict=True):
        torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_train_never_runs_the_reference_inside_the_loop(tiny_run):
    _, _, w = tiny_run
    batches = math.ceil(300 / 256)  # the one precompute pass, before the first step
    assert w.ref_calls_at_iteration == [batches, batches]


def test_train_logs_per_step_metrics_and_reports_identical_pairs(tiny_run):
    summary, rows, _ = tiny_run
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "identical_pairs"):
        assert key in rows[0], key
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)  # the first step starts at policy = reference
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert summary["identical_pairs"] == 0 and summary["pairs"] == 300
    assert summary["trained_tokens"] > 0
    assert "kl_to_optimum" in summary


# --- learning (slow) --------------------------------------------------------------------------------
@pytest.mark.slow
def test_dpo_learns_sentiment_quick(tmp_path):
    summary = run("dpo", task="sentiment", seed=0, preset="quick", out=tmp_path, progress=False)
    assert summary["gold_reward"] > summary["baseline_gold_reward"]
    assert summary["identical_pairs"] == 0


@pytest.fixture(scope="module")
def exact_rpo_summary(tmp_path_factory):
    return run("dpo", task="exact", seed=0, preset="rpo", out=tmp_path_factory.mktemp("dpo-exact"), progress=False)


@pytest.mark.slow
def test_dpo_exact_reaches_a_third_of_the_baseline_kl_to_optimum(exact_rpo_summary):
    s = exact_rpo_summary
    assert s["kl_to_optimum"] <= 0.3 * s["baseline_kl_to_optimum"]  # measured: 0.174 vs 0.670 (0.26x)
    assert s["gold_reward"] > s["baseline_gold_reward"] + 0.2
