"""Loss conventions where peers differ (docs/decisions.md, "Loss conventions against peers"): each
convention against a hand computation on explicit per-token log-probs of responses of different lengths,
the options that select them (config and ``zoo run``), and the conventions the zoo fixes without an option."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import rlhf_zoo.runner
from rlhf_zoo.cli import main
from rlhf_zoo.errors import ConfigError
from rlhf_zoo.ops import masked_sum
from rlhf_zoo.ops.policy_losses import clipped_policy_loss
from rlhf_zoo.ops.ranking import ranking_loss
from rlhf_zoo.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, get_registry
from rlhf_zoo.training import lm_loss
from rlhf_zoo_plugins import dpo
from rlhf_zoo_plugins.dpo import DPOConfig, dpo_loss
from rlhf_zoo_plugins.rrhf import RRHFConfig, rrhf_loss

LN2 = math.log(2.0)
BETA = 0.5  # IPO target 1 / (2 beta) = 1


def padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of responses of different lengths -> (B, T) values (0 on padding), (B, T) mask."""
    width = max(len(r) for r in rows)
    values = torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return values, mask


# --- IPO: log-ratios summed (Azar et al., the zoo's default) or averaged per token (TRL) -------------------
# Two pairs, per-token log-probs; chosen and rejected have different lengths within each pair.
#   pair 1: chosen  2 tokens  pi (-0.5, -1.0)        ref (-1.0, -1.5)        ratio sum  1.0  mean  0.5
#           rejected 3 tokens pi (-1.0, -1.0, -2.0)  ref (-1.0, -0.5, -1.0)  ratio sum -1.5  mean -0.5
#   pair 2: chosen  1 token   pi (-2.0,)             ref (-1.0,)             ratio sum -1.0  mean -1.0
#           rejected 2 tokens pi (-0.5, -0.5)        ref (-1.0, -2.0)        ratio sum  2.0  mean  1.0
# h_sum = (2.5, -3.0): loss ((2.5 - 1)^2 + (-3 - 1)^2) / 2 = (2.25 + 16) / 2 = 9.125
# h_mean = (1.0, -2.0): loss ((1 - 1)^2 + (-2 - 1)^2) / 2 = (0 + 9) / 2 = 4.5
POLICY_CHOSEN, REF_CHOSEN = [[-0.5, -1.0], [-2.0]], [[-1.0, -1.5], [-1.0]]
POLICY_REJECTED, REF_REJECTED = [[-1.0, -1.0, -2.0], [-0.5, -0.5]], [[-1.0, -0.5, -1.0], [-1.0, -2.0]]


def ipo_inputs():
    """Sequence log-probs (sums over each response's tokens) and the responses' token counts."""
    seqs, counts = [], []
    for rows in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED):
        values, mask = padded(rows)
        seqs.append(masked_sum(values, mask, dim=-1))
        counts.append(mask.sum(-1))
    chosen, rejected, ref_chosen, ref_rejected = seqs
    return (chosen, rejected, ref_chosen, ref_rejected), (counts[0], counts[1])


def test_ipo_loss_summed_log_ratios_hand_computed():
    seqs, _ = ipo_inputs()
    loss, r_chosen, r_rejected = dpo_loss(*seqs, beta=BETA, loss_type="ipo")
    assert float(loss) == pytest.approx(9.125, abs=1e-12)
    assert r_chosen.tolist() == pytest.approx([BETA * 1.0, BETA * -1.0])
    assert r_rejected.tolist() == pytest.approx([BETA * -1.5, BETA * 2.0])


def test_ipo_loss_per_token_log_ratios_use_each_responses_own_count():
    seqs, (n_chosen, n_rejected) = ipo_inputs()
    assert n_chosen.tolist() == [2, 1] and n_rejected.tolist() == [3, 2]
    loss, r_chosen, r_rejected = dpo_loss(*seqs, beta=BETA, loss_type="ipo", chosen_tokens=n_chosen,
                                          rejected_tokens=n_rejected)
    assert float(loss) == pytest.approx(4.5, abs=1e-12)
    assert r_chosen.tolist() == pytest.approx([BETA * 0.5, BETA * -1.0])  # rewards of the same log-ratios
    assert r_rejected.tolist() == pytest.approx([BETA * -0.5, BETA * 1.0])
    # one count for both responses of a pair (e.g. the pair's longer) is a different number
    longer = torch.maximum(n_chosen, n_rejected)
    shared, _, _ = dpo_loss(*seqs, beta=BETA, loss_type="ipo", chosen_tokens=longer, rejected_tokens=longer)
    assert float(shared) != pytest.approx(4.5)


def test_ipo_conventions_agree_on_one_token_responses():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    seqs = (t([-1.0, -2.0]), t([-3.0, -1.0]), t([-2.0, -2.0]), t([-2.0, -2.0]))
    ones = torch.ones(2, dtype=torch.long)
    summed = dpo_loss(*seqs, beta=BETA, loss_type="ipo")[0]
    averaged = dpo_loss(*seqs, beta=BETA, loss_type="ipo", chosen_tokens=ones, rejected_tokens=ones)[0]
    assert float(summed) == pytest.approx(float(averaged), abs=1e-12) == pytest.approx(2.5)


def test_dpo_config_ipo_logratio_default_and_validation():
    assert DPOConfig().ipo_logratio == "sum" and not DPOConfig(loss_type="ipo").per_token_logratios
    assert DPOConfig.from_dict({"loss_type": "ipo", "ipo_logratio": "mean"}).per_token_logratios
    with pytest.raises(ConfigError, match=r"^ipo_logratio must be of type one of 'sum', 'mean', got 'avg'$"):
        DPOConfig.from_dict({"loss_type": "ipo", "ipo_logratio": "avg"})
    with pytest.raises(ConfigError, match=r"^ipo_logratio 'mean' applies to loss_type 'ipo' only, got loss_type "
                                          r"'sigmoid'$"):
        DPOConfig.from_dict({"ipo_logratio": "mean"})


@pytest.mark.parametrize(("options", "per_token"), [
    ({"loss_type": "ipo", "ipo_logratio": "mean"}, True),
    ({"loss_type": "ipo"}, False),
])
def test_dpo_train_passes_token_counts_only_for_per_token_ipo(exact_task, tmp_path, monkeypatch, options, per_token):
    """The training loop hands dpo_loss each response's own token count (the mask's sum), for ipo + mean only."""
    seen = []

    def recording_loss(*args, **kwargs):
        seen.append(args[8:])
        return dpo_loss(*args, **kwargs)

    monkeypatch.setattr(dpo, "dpo_loss", recording_loss)
    registry = get_registry()
    cfg = DPOConfig(steps=1, batch_size=16, max_pairs=64, warmup_steps=0, **options)
    (tmp_path / "metrics.jsonl").write_text("")
    ctx = rlhf_zoo.runner.RunContext(registry.algorithm("dpo"), cfg, exact_task, 0, torch.device("cpu"), tmp_path,
                                     registry, exact_task.load_policy(),
                                     exact_task.load_policy().requires_grad_(False), exact_task.reward_function(),
                                     torch.Generator().manual_seed(0), show_progress=False)
    dpo.train(ctx, cfg)
    assert seen
    for extra in seen:
        if not per_token:
            assert extra in ((), (None, None))
            continue
        n_chosen, n_rejected = extra
        assert n_chosen.shape == n_rejected.shape and n_chosen.dtype == torch.long
        assert bool((n_chosen >= 1).all()) and bool((n_rejected >= 1).all())
    if per_token:  # the pairs of ``exact`` have responses of different lengths: separate counts matter
        assert any(bool((c != r).any()) for c, r in seen)


# --- RRHF: the fine-tune term averaged over the best candidate's tokens (zoo) or summed (the paper) ----------
# Prompt 1: candidate 0 (score 0) log-probs (-1, -2), p = -1.5; candidate 1 (score 1, the best) (-1, -2, -3),
#   p = -2. Pair r_0 < r_1: hinge max(0, p_0 - p_1) = 0.5.  L_ft: mean 2.0, sum 6.0.
# Prompt 2: candidate 0 (score 1, the best) (-0.2,), p = -0.2; candidate 1 (score 0) (-0.1, -0.1), p = -0.1.
#   Pair r_1 < r_0: max(0, p_1 - p_0) = 0.1.  L_ft: mean 0.2, sum 0.2 (one token).
# ft_weight 2: mean ((0.5 + 2 * 2.0) + (0.1 + 2 * 0.2)) / 2 = 2.5; sum ((0.5 + 2 * 6.0) + (0.1 + 2 * 0.2)) / 2 = 6.5
def rrhf_inputs():
    values, mask = padded([[-1.0, -2.0], [-1.0, -2.0, -3.0], [-0.2], [-0.1, -0.1]])
    return values.view(2, 2, -1), mask.view(2, 2, -1), torch.tensor([[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(("reduction", "ft", "loss"), [("mean", (2.0 + 0.2) / 2, 2.5), ("sum", (6.0 + 0.2) / 2, 6.5)])
def test_rrhf_ft_reduction_hand_computed(reduction, ft, loss):
    got, stats = rrhf_loss(*rrhf_inputs(), ft_weight=2.0, ft_reduction=reduction)
    assert float(got) == pytest.approx(loss, abs=1e-12)
    assert float(stats["ft_loss"]) == pytest.approx(ft, abs=1e-12)
    assert float(stats["rank_loss"]) == pytest.approx((0.5 + 0.1) / 2, abs=1e-12)  # length-normalised either way


def test_rrhf_ft_reduction_default_and_validation():
    assert RRHFConfig().ft_reduction == "mean"
    assert RRHFConfig.from_dict({"ft_reduction": "sum"}).ft_reduction == "sum"
    with pytest.raises(ConfigError, match=r"^ft_reduction must be of type one of 'mean', 'sum', got 'token'$"):
        RRHFConfig.from_dict({"ft_reduction": "token"})
    with pytest.raises(ValueError, match="unknown ft_reduction 'token'"):
        rrhf_loss(*rrhf_inputs(), ft_reduction="token")


# --- the conventions the zoo fixes without an option (pinned, so a change is deliberate) --------------------
class _FixedLogits(torch.nn.Module):
    """A causal LM stub whose logits are given: log-probs are exactly log(probs)."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logits = probs.log()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.logits)


def test_lm_loss_is_the_mean_over_all_counted_tokens_of_the_batch():
    """Row 1 counts 2 tokens (probabilities 1/2, 1/4: NLL ln 2, 2 ln 2), row 2 one token (1/8: 3 ln 2).
    Batch token mean (zoo, TRL's SFTTrainer) = 6 ln 2 / 3 = 2 ln 2; a per-sequence mean would be 2.25 ln 2."""
    p = torch.tensor([[[1.0, 1.0], [0.5, 0.5], [0.25, 0.75], [1.0, 1.0]],
                      [[1.0, 1.0], [0.125, 0.875], [1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)  # (B, L, V=2)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "loss_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])}  # target t+1 predicted at position t
    assert float(lm_loss(_FixedLogits(p), batch)) == pytest.approx(2 * LN2, rel=1e-6)  # float32 inside


def test_ppo_policy_loss_is_the_token_mean_of_the_minibatch():
    """Ratio 1: loss = -mean A over counted tokens. Advantages (1) and (2, 2, 2): token mean -7/4 (zoo, TRL's
    PPOTrainer); a mean per sequence would be -3/2."""
    adv = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    lp = torch.zeros(2, 3)
    assert float(clipped_policy_loss(lp, lp, adv, mask, clip=0.2).loss) == pytest.approx(-7 / 4)


def test_reward_model_loss_is_the_mean_per_prompt_of_its_pairs_then_over_prompts():
    """InstructGPT Eq. 1: prompt 1 ranks 3 responses (scores 2, 1, 0: pair differences 1, 2, 1), prompt 2
    scores (0, 0, 0) (differences 0). With the same K per prompt this equals the mean over all pairs."""
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigmoid(-x)
    expected = ((2 * softplus(-1.0) + softplus(-2.0)) / 3 + LN2) / 2
    assert float(ranking_loss(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))) == pytest.approx(expected, rel=1e-6)


# --- zoo run: the options are accepted, bad values refused in one line ----------------------------------
@pytest.fixture
def _cli(monkeypatch, tmp_path):
    """A fresh registry, a scratch cwd, and `rlhf_zoo.runner.run` replaced by a recorder of its options."""
    monkeypatch.delenv(ENV_BLOCK, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.chdir(tmp_path)
    get_registry(refresh=True)
    calls = []

    def fake_run(name, **kwargs):
        calls.append((name, kwargs["options"]))
        return {"rank": 1}  # a non-main rank: the CLI prints nothing

    monkeypatch.setattr(rlhf_zoo.runner, "run", fake_run)
    yield calls
    monkeypatch.undo()
    get_registry(refresh=True)


@pytest.mark.parametrize(("argv", "key", "value", "cls"), [
    (["dpo", "--loss-type", "ipo", "--ipo-logratio", "mean"], "ipo_logratio", "mean", DPOConfig),
    (["rrhf", "--ft-reduction", "sum"], "ft_reduction", "sum", RRHFConfig),
])
def test_cli_run_accepts_the_convention_options(_cli, argv, key, value, cls):
    assert main(["run", *argv, "--task", "exact", "--device", "cpu"]) == 0
    (name, options), = _cli
    assert name == argv[0] and options[key] == value
    assert getattr(cls.from_dict(options), key) == value


@pytest.mark.parametrize(("argv", "flag"), [
    (["dpo", "--loss-type", "ipo", "--ipo-logratio", "avg"], "'--ipo-logratio'"),
    (["rrhf", "--ft-reduction", "token"], "'--ft-reduction'"),
])
def test_cli_run_refuses_a_bad_convention_value_in_one_line(_cli, capsys, argv, flag):
    assert main(["run", *argv, "--task", "exact", "--device", "cpu"]) != 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: "), err
    assert flag in lines[0] and argv[-1] in lines[0] and "Traceback" not in out + err
    assert not _cli
