"""Algorithm configs: presets, overrides, unknown keys, type checks (bool is not an int), Literal choices,
range checks and immutability."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from rlhf_zoo.config import AlgoConfig, check_range, field_type, option
from rlhf_zoo.errors import ConfigError, ZooError
from rlhf_zoo_plugins.best_of_n import BestOfNConfig
from rlhf_zoo_plugins.reward_model import RewardModelConfig
from rlhf_zoo_plugins.sft import SFTConfig


@dataclass(frozen=True)
class ToyConfig(AlgoConfig):
    presets = {"fast": {"steps": 5, "mode": "b"}, "wide": {"width": 2.5}}

    steps: int = option(100, "Steps.")
    width: float = option(1.0, "Width.")
    mode: Literal["a", "b"] = option("a", "Mode.")
    name: str = option("", "A name.")
    flag: bool = option(False, "A flag.")
    limit: int | None = option(None, "An optional limit.")


# --- presets and overrides ------------------------------------------------------------------------------
def test_config_from_dict_defaults():
    cfg = ToyConfig.from_dict({})
    assert cfg == ToyConfig()
    assert (cfg.steps, cfg.width, cfg.mode, cfg.eval_prompts, cfg.temperature) == (100, 1.0, "a", 64, 1.0)


def test_config_from_dict_preset_then_overrides():
    cfg = ToyConfig.from_dict({"steps": 7}, preset="fast")
    assert cfg.steps == 7  # the override beats the preset
    assert cfg.mode == "b"  # from the preset
    assert cfg.width == 1.0  # default


@pytest.mark.parametrize("preset", [None, "default"])
def test_config_from_dict_default_preset_is_the_defaults(preset):
    assert ToyConfig.from_dict({"width": 3.0}, preset=preset) == ToyConfig(width=3.0)


def test_config_from_dict_none_values_do_not_override():
    # the CLI passes None for options not given; they must leave the preset's value alone
    cfg = ToyConfig.from_dict({"steps": None, "mode": None}, preset="fast")
    assert (cfg.steps, cfg.mode) == (5, "b")


def test_config_from_dict_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge' for ToyConfig; known: default, fast, wide"):
        ToyConfig.from_dict({}, preset="huge")


def test_config_from_dict_unknown_key_names_it():
    with pytest.raises(ConfigError) as info:
        ToyConfig.from_dict({"stepz": 3, "steps": 4})
    msg = str(info.value)
    assert msg.startswith("unknown config key(s) stepz;")
    assert "steps" in msg.split("known:")[1]  # the known keys are listed


def test_config_from_dict_reports_all_unknown_keys_sorted():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) alpha, zeta;"):
        ToyConfig.from_dict({"zeta": 1, "alpha": 2})


def test_config_round_trips_through_to_dict():
    cfg = ToyConfig.from_dict({"steps": 9, "limit": 3, "flag": True}, preset="wide")
    d = cfg.to_dict()
    assert d["steps"] == 9 and d["width"] == 2.5 and d["limit"] == 3 and d["flag"] is True
    assert ToyConfig.from_dict(d) == cfg


def test_config_builtin_quick_presets():
    assert BestOfNConfig.from_dict({}, preset="quick").n == 8
    assert SFTConfig.from_dict({}, preset="quick").steps == 100
    assert SFTConfig.from_dict({}, preset="quick").eval_prompts == 32
    assert RewardModelConfig.from_dict({"steps": 3}, preset="quick").steps == 3


# --- type checks ----------------------------------------------------------------------------------------
def test_config_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError) as info:
        ToyConfig.from_dict({"steps": "10"})
    assert str(info.value) == "steps must be of type int, got '10'"


def test_config_float_for_int_rejected():
    with pytest.raises(ConfigError, match=r"^steps must be of type int, got 1\.5$"):
        ToyConfig(steps=1.5)


@pytest.mark.parametrize("value", [True, False])
def test_config_bool_not_accepted_for_int(value):
    with pytest.raises(ConfigError, match=rf"^steps must be of type int, got {value}$"):
        ToyConfig(steps=value)


def test_config_bool_not_accepted_for_float():
    with pytest.raises(ConfigError, match=r"^width must be of type float, got True$"):
        ToyConfig(width=True)


def test_config_int_accepted_for_float():
    assert ToyConfig(width=3).width == 3


def test_config_str_field_rejects_number():
    with pytest.raises(ConfigError, match=r"^name must be of type str, got 5$"):
        ToyConfig(name=5)


def test_config_bool_field_rejects_int_and_string():
    with pytest.raises(ConfigError, match="^flag must be of type bool"):
        ToyConfig(flag=1)
    with pytest.raises(ConfigError, match="^flag must be of type bool"):
        ToyConfig.from_dict({"flag": "yes"})


def test_config_optional_field_accepts_none_and_int_only():
    assert ToyConfig(limit=None).limit is None
    assert ToyConfig(limit=4).limit == 4
    with pytest.raises(ConfigError, match="^limit must be of type"):
        ToyConfig(limit="4")


def test_config_literal_choices_validated():
    assert ToyConfig(mode="b").mode == "b"
    with pytest.raises(ConfigError) as info:
        ToyConfig(mode="c")
    assert str(info.value) == "mode must be of type one of 'a', 'b', got 'c'"


def test_config_builtin_literal_field():
    assert field_type(SFTConfig, "start_from") == Literal["pretrained", "sft"]
    assert SFTConfig(start_from="sft").start_from == "sft"
    with pytest.raises(ConfigError, match="start_from.*'pretrained', 'sft'.*'scratch'"):
        SFTConfig.from_dict({"start_from": "scratch"})


# --- range checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [("eval_prompts", 0), ("eval_samples", -1), ("temperature", 0.0)])
def test_config_base_fields_must_be_positive(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be > 0, got {value!r}$"):
        ToyConfig.from_dict({key: value})


def test_config_max_new_tokens_may_be_zero_not_negative():
    assert ToyConfig(max_new_tokens=0).max_new_tokens == 0
    with pytest.raises(ConfigError, match=r"^max_new_tokens must be >= 0, got -1$"):
        ToyConfig(max_new_tokens=-1)


@pytest.mark.parametrize(("cls", "key"), [(SFTConfig, "steps"), (SFTConfig, "learning_rate"),
                                          (BestOfNConfig, "n"), (RewardModelConfig, "batch_size")])
def test_config_builtin_positive_fields(cls, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be > 0"):
        cls.from_dict({key: 0})


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1])
def test_config_reward_model_heldout_fraction_open_interval(value):
    with pytest.raises(ConfigError, match="heldout_fraction must be in"):
        RewardModelConfig(heldout_fraction=value)
    assert RewardModelConfig(heldout_fraction=0.5).heldout_fraction == 0.5


def test_config_check_range_inclusive():
    cfg = ToyConfig(width=2.0)
    check_range(cfg, "width", 0.0, 2.0)
    with pytest.raises(ConfigError, match=r"^width must be in \[0.0, 1.5\], got 2.0$"):
        check_range(cfg, "width", 0.0, 1.5)


# --- immutability and errors ----------------------------------------------------------------------------
def test_config_is_frozen():
    cfg = ToyConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        BestOfNConfig().n = 2  # type: ignore[misc]


def test_config_replace_revalidates():
    with pytest.raises(ConfigError):
        dataclasses.replace(ToyConfig(), steps="many")


def test_config_error_is_user_error_and_value_error():
    with pytest.raises(ConfigError) as info:
        ToyConfig(steps="x")
    assert isinstance(info.value, ZooError) and isinstance(info.value, ValueError)


def test_config_option_carries_help():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(ToyConfig)}
    assert helps["steps"] == "Steps."
    assert helps["eval_prompts"] == "Held-out prompts used for the final evaluation."
    assert all(helps.values())
