"""The ``zoo`` command line, in-process through `rlhf_zoo.cli.main`: listing, one-line user errors,
generated ``--help``, and one real (quick) best-of-n run on the ``exact`` task."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from rlhf_zoo.cli import build_cli, main
from rlhf_zoo.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, get_registry

SUMMARY_KEYS = ("algorithm", "task", "seed", "gold_reward", "proxy_reward", "kl_to_ref", "baseline_gold_reward",
                "wall_seconds", "tokens_per_second", "peak_memory_mb", "kl_to_optimum", "frontier_efficiency")


@pytest.fixture(autouse=True)
def _plain_registry(monkeypatch, tmp_path):
    """No env controls, a fresh registry, and a scratch cwd (a default ``runs/`` would land there)."""
    monkeypatch.delenv(ENV_BLOCK, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.chdir(tmp_path)
    get_registry(refresh=True)
    yield
    monkeypatch.undo()  # env restored before the registry is rebuilt for whoever runs next
    get_registry(refresh=True)


def one_line_error(capsys) -> str:
    """The single stderr line of a user error (asserting there is exactly one and no traceback)."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zoo: error: ")
    assert "Traceback" not in err and "Traceback" not in out
    return lines[0]


# --- zoo list -------------------------------------------------------------------------------------------
def test_cli_list_json_names_and_distribution(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    algos = {a["name"]: a for a in data["algorithms"]}
    tasks = {t["name"]: t for t in data["tasks"]}
    assert {"sft", "reward-model", "best-of-n"} <= set(algos)
    assert {"exact", "sentiment", "hh"} <= set(tasks)
    for row in [*(algos[n] for n in ("sft", "reward-model", "best-of-n")), *(tasks[n] for n in ("exact", "sentiment", "hh"))]:
        assert row["distribution"] == "rlhf-zoo"
        assert row["version"] == "0.1.0"
        assert row["description"]
    assert algos["best-of-n"]["plugin"] == "best-of-n"
    assert tasks["exact"]["plugin"] == "tasks"
    assert data["load_errors"] == []
    assert [a["name"] for a in data["algorithms"]] == sorted(algos)


def test_cli_list_text_has_sections(capsys):
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    assert out.index("Algorithms:") < out.index("  best-of-n ") < out.index("Tasks:") < out.index("  exact ") \
        < out.index("Reward functions:") < out.index("  distinct-words ") < out.index("  length ")
    assert err == ""


def test_cli_list_json_honours_block_env(monkeypatch, capsys):
    monkeypatch.setenv(ENV_BLOCK, "best-of-n")
    get_registry(refresh=True)
    assert main(["list", "--json"]) == 0
    names = {a["name"] for a in json.loads(capsys.readouterr().out)["algorithms"]}
    assert "best-of-n" not in names and {"sft", "reward-model", "ppo"} <= names


# --- one-line user errors -------------------------------------------------------------------------------
def test_cli_run_unknown_algorithm_one_line(capsys):
    rc = main(["run", "nosuch"])
    line = one_line_error(capsys)
    assert rc != 0
    known = ", ".join(sorted(get_registry().algorithms))
    assert line == f"zoo: error: unknown algorithm 'nosuch'; known: {known}"


def test_cli_run_unknown_task_one_line(capsys, tmp_path):
    rc = main(["run", "best-of-n", "--task", "nosuch", "--device", "cpu", "--out", str(tmp_path / "r")])
    line = one_line_error(capsys)
    assert rc != 0
    assert line == "zoo: error: unknown task 'nosuch'; known: exact, hh, sentiment"
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


def test_cli_run_malformed_int_option_one_line(capsys):
    rc = main(["run", "best-of-n", "--n", "abc"])
    line = one_line_error(capsys)
    assert rc != 0
    assert "'--n'" in line and "'abc'" in line and "integer" in line


def test_cli_run_malformed_choice_option_one_line(capsys):
    rc = main(["run", "sft", "--start-from", "bogus"])
    line = one_line_error(capsys)
    assert rc != 0
    assert "'--start-from'" in line and "bogus" in line and "pretrained" in line


def test_cli_run_invalid_config_value_one_line(capsys):
    rc = main(["run", "best-of-n", "--n", "0", "--task", "exact", "--device", "cpu"])
    line = one_line_error(capsys)
    assert rc == 1
    assert line == "zoo: error: n must be > 0, got 0"


def test_cli_run_unknown_preset_one_line(capsys):
    rc = main(["run", "best-of-n", "--preset", "huge", "--task", "exact"])
    line = one_line_error(capsys)
    assert rc == 1
    assert "unknown preset 'huge'" in line and "known: default, quick" in line


def test_cli_run_bad_device_one_line(capsys, tmp_path):
    rc = main(["run", "best-of-n", "--task", "exact", "--device", "tpu", "--out", str(tmp_path / "r")])
    line = one_line_error(capsys)
    assert rc == 1
    assert "device must be auto, cpu or cuda[:N], got 'tpu'" in line


def test_cli_run_malformed_config_file_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"n": 4,\n oops}')
    rc = main(["run", "best-of-n", "--task", "exact", "--config", str(bad)])
    line = one_line_error(capsys)
    assert rc == 1
    assert f"config file {bad}: invalid JSON at line 2" in line


def test_cli_run_config_file_not_an_object_one_line(capsys, tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    assert main(["run", "best-of-n", "--task", "exact", "--config", str(bad)]) == 1
    assert "expected a JSON object of config values, got list" in one_line_error(capsys)


def test_cli_run_config_file_unknown_key_one_line(capsys, tmp_path):
    bad = tmp_path / "typo.json"
    bad.write_text('{"nn": 4}')
    assert main(["run", "best-of-n", "--task", "exact", "--config", str(bad)]) == 1
    assert "unknown config key(s) nn" in one_line_error(capsys)


def test_cli_run_config_file_values_are_validated(capsys, tmp_path):
    bad = tmp_path / "zero.json"
    bad.write_text('{"n": 0}')
    assert main(["run", "best-of-n", "--task", "exact", "--config", str(bad)]) == 1
    assert one_line_error(capsys) == "zoo: error: n must be > 0, got 0"
    # ... and an option on the command line wins over the file: the same file is then accepted up to
    # the next check (an unknown task), proving the file was read and overridden
    assert main(["run", "best-of-n", "--task", "nosuch", "--config", str(bad), "--n", "2"]) == 1
    assert "unknown task 'nosuch'" in one_line_error(capsys)


def test_cli_run_config_file_wrong_type_one_line(capsys, tmp_path):
    bad = tmp_path / "type.json"
    bad.write_text('{"n": "four"}')
    assert main(["run", "best-of-n", "--task", "exact", "--config", str(bad)]) == 1
    assert one_line_error(capsys) == "zoo: error: n must be of type int, got 'four'"


def test_cli_run_missing_config_file_one_line(capsys, tmp_path):
    rc = main(["run", "best-of-n", "--config", str(tmp_path / "absent.json")])
    line = one_line_error(capsys)
    assert rc != 0
    assert "absent.json" in line and "does not exist" in line


# --- generated --help -----------------------------------------------------------------------------------
def _algorithm_help(name: str, capsys) -> str:
    """Help text of ``zoo run NAME`` through the ``run`` group (registry lookup included)."""
    rc = build_cli().commands["run"].main([name, "--help"], prog_name="zoo run", standalone_mode=False)
    assert rc == 0
    return " ".join(capsys.readouterr().out.split())  # undo click's wrapping


def test_cli_run_sft_help_lists_fields_with_help(capsys):
    from rlhf_zoo_plugins.sft import SFTConfig

    text = _algorithm_help("sft", capsys)
    for f in dataclasses.fields(SFTConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "--start-from [pretrained|sft]" in text
    assert "--learning-rate FLOAT" in text
    assert "--steps INTEGER" in text
    assert "[default: 300]" in text
    assert "Preset: default, quick, smoke." in text
    for common in ("--task", "--seed", "--out", "--preset", "--device", "--config", "--quiet"):
        assert common in text


def test_cli_run_reward_model_help_has_bool_flag_pair(capsys):
    text = _algorithm_help("reward-model", capsys)
    assert "--use-margin / --no-use-margin" in text
    assert "Subtract the Llama 2 margin" in text


def test_cli_run_help_shows_each_default_once(capsys):
    text = _algorithm_help("sft", capsys)
    assert "[default: (" not in text
    assert text.count("[default: 300]") == 1


def test_cli_main_help_of_algorithm_returns_0(capsys):
    assert main(["run", "sft", "--help"]) == 0
    assert "--learning-rate" in capsys.readouterr().out


def test_cli_unknown_option_of_list_is_one_line(capsys):
    rc = main(["list", "--bogus"])
    assert rc == 2
    assert "--bogus" in one_line_error(capsys)


# --- one real run ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bon_run(tmp_path_factory):
    """``zoo run best-of-n --task exact --preset quick`` with a config file (n = 4) and one option that
    overrides the file. The exact task makes every figure an exact expectation."""
    tmp = tmp_path_factory.mktemp("bon")
    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps({"n": 4, "eval_samples": 3}))
    out = tmp / "run"
    get_registry(refresh=True)
    rc = main(["run", "best-of-n", "--task", "exact", "--preset", "quick", "--out", str(out), "--quiet",
               "--device", "cpu", "--config", str(cfg), "--eval-samples", "1", "--seed", "3"])
    return rc, out


def test_cli_run_best_of_n_writes_run_directory(bon_run):
    rc, out = bon_run
    assert rc == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "policy/model.safetensors", "policy/config.json"):
        assert (out / name).is_file(), name
    assert (out / "policy" / "model.safetensors").stat().st_size > 0
    assert json.loads((out / "policy" / "config.json").read_text())["model_type"] == "llama"


def test_cli_run_best_of_n_config_json(bon_run):
    _, out = bon_run
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["algorithm"], cfg["task"], cfg["seed"], cfg["device"], cfg["preset"]) == (
        "best-of-n", "exact", 3, "cpu", "quick")
    assert cfg["config"]["n"] == 4  # the config file beats the preset's 8
    assert cfg["config"]["eval_samples"] == 1  # the command line beats the config file's 3
    assert cfg["config"]["eval_prompts"] == 64  # from the preset
    assert cfg["algorithm_distribution"] == "rlhf-zoo"
    plugins = {p["name"]: p for p in cfg["plugins"]}
    assert {"sft", "reward-model", "best-of-n", "tasks"} <= set(plugins)
    assert all(p["version"] == "0.1.0" and p["distribution"] == "rlhf-zoo" for p in plugins.values())
    assert cfg["plugin_load_errors"] == []
    assert cfg["versions"]["rlhf-zoo"] == "0.1.0"
    assert cfg["max_new_tokens"] == 4 and cfg["beta"] == 0.5  # the exact task's defaults


def test_cli_run_best_of_n_summary_keys(bon_run):
    _, out = bon_run
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert (summary["algorithm"], summary["task"], summary["seed"]) == ("best-of-n", "exact", 3)
    for key in SUMMARY_KEYS[3:]:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), key
    assert summary["wall_seconds"] > 0 and summary["peak_memory_mb"] > 0
    assert (out / "metrics.jsonl").read_text() == ""  # best-of-n trains nothing: no iterations


def test_cli_run_best_of_n_invariants_on_exact(bon_run):
    _, out = bon_run
    s = json.loads((out / "summary.json").read_text())
    n = 4
    bound = math.log(n) - (n - 1) / n
    assert s["n"] == n
    assert s["kl_bound"] == pytest.approx(bound, abs=1e-12)
    assert 0.0 < s["kl_to_ref"] <= bound + 1e-9
    assert s["gold_reward"] > s["baseline_gold_reward"]
    assert s["baseline_kl_to_ref"] == pytest.approx(0.0, abs=1e-9)  # the SFT policy against itself
    assert s["proxy_reward"] == pytest.approx(s["gold_reward"], abs=1e-6)  # exact pays the gold reward
    assert s["kl_to_optimum"] >= 0.0
    assert 0.0 < s["frontier_efficiency"] <= 1.0 + 1e-9  # nothing beats the KL-regularised optimum
