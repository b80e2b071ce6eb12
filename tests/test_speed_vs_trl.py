"""benchmarks/speed_vs_trl.py at its ``--quick`` configuration: the zoo-only path (always; TRL is an
optional benchmark dependency) and, where trl is installed, the side-by-side comparison. The script runs
in a subprocess: it sets process-wide state (torch threads, offline Hub variables, warning filters).

The figures are checked for shape and consistency (finite, positive, medians of the per-rep values,
ratio = zoo median / TRL median), not for speed: timings on a shared CI machine prove nothing."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_vs_trl.py"


def run_script(tmp_path: Path, *extra: str, env_extra: dict[str, str] | None = None) -> tuple[dict, str]:
    out = tmp_path / "speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-user", "--threads", "1", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_side(side: dict, key: str) -> None:
    """Per-rep lists, their medians, and throughput x seconds = the same amount of work every rep."""
    assert side[key] and len(side[key]) == len(side["seconds"])
    assert all(positive(x) for x in side[key] + side["seconds"])
    assert side[f"median_{key}"] == pytest.approx(statistics.median(side[key]), rel=1e-12)
    assert side["median_seconds"] == pytest.approx(statistics.median(side["seconds"]), rel=1e-12)
    work = [t * s for t, s in zip(side[key], side["seconds"], strict=True)]
    assert work == pytest.approx([work[0]] * len(work), rel=1e-9)
    assert all(math.isfinite(x) and x >= 0 for x in side["median_phase_seconds"].values())


def check_env(result: dict) -> None:
    env = result["env"]
    for name in ("plain", "plain_ref", "env"):
        assert all(positive(x) for x in env[name]["seconds"])
        assert env[name]["median_seconds"] == pytest.approx(statistics.median(env[name]["seconds"]), rel=1e-12)
    assert env["ratio_env_vs_plain"] == pytest.approx(env["env"]["median_seconds"] / env["plain"]["median_seconds"],
                                                      rel=1e-12)
    assert env["ratio_env_vs_plain_ref"] == pytest.approx(
        env["env"]["median_seconds"] / env["plain_ref"]["median_seconds"], rel=1e-12)
    assert env["ratio_per_rep"] == pytest.approx(
        [e / p for e, p in zip(env["env"]["seconds"], env["plain"]["seconds"], strict=True)], rel=1e-12)
    assert isinstance(env["meets_target"], bool)


def check_common(result: dict) -> None:
    assert result["settings"]["quick"] is True
    assert result["machine"]["torch_threads"] == 1
    assert result["versions"]["torch"] and result["versions"]["rlhf-zoo"]
    check_side(result["dpo"]["zoo"], "pairs_per_second")
    check_side(result["online"]["zoo"], "samples_per_second")
    s = result["settings"]
    assert result["online"]["zoo"]["median_seconds"] * result["online"]["zoo"]["median_samples_per_second"] == \
        pytest.approx(s["iterations"] * s["samples"], rel=1e-9)
    check_env(result)


def test_zoo_only_path_runs_when_trl_is_missing(tmp_path):
    """A ``trl`` that fails to import (as in CI, where it is not installed) skips the TRL sides with a
    message; the zoo sides and the env comparison still run."""
    fake = tmp_path / "site" / "trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'trl' (simulated)\")\n")
    path = os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])
    result, md = run_script(tmp_path, env_extra={"PYTHONPATH": path})
    check_common(result)
    assert result["trl"]["available"] is False
    assert "simulated" in result["trl"]["skipped_reason"] and "pip install trl" in result["trl"]["skipped_reason"]
    for section in ("dpo", "online"):
        assert "trl" not in result[section] and "ratio_zoo_vs_trl" not in result[section]
        assert result[section]["meets_target"] is None
    assert "TRL sides skipped" in md and "| n/a |" in md


def test_side_by_side_with_trl(tmp_path):
    pytest.importorskip("trl")
    result, md = run_script(tmp_path)
    check_common(result)
    assert result["trl"]["available"] is True
    dpo, online = result["dpo"], result["online"]
    check_side(dpo["trl"], "pairs_per_second")
    check_side(online["trl"], "samples_per_second")
    assert dpo["ratio_zoo_vs_trl"] == pytest.approx(
        dpo["zoo"]["median_pairs_per_second"] / dpo["trl"]["median_pairs_per_second"], rel=1e-12)
    assert online["ratio_zoo_vs_trl"] == pytest.approx(
        online["zoo"]["median_samples_per_second"] / online["trl"]["median_samples_per_second"], rel=1e-12)
    for section, key in ((dpo, "pairs"), (online, "samples")):
        zoo, trl = section["zoo"], section["trl"]
        assert positive(zoo["median_cpu_seconds"]) and positive(trl["median_cpu_seconds"])
        assert section["ratio_zoo_vs_trl_cpu_time"] == pytest.approx(
            (zoo[f"median_{key}"] / zoo["median_cpu_seconds"]) / (trl[f"median_{key}"] / trl["median_cpu_seconds"]),
            rel=1e-12)
    assert len(dpo["ratio_per_rep"]) == len(online["ratio_per_rep"]) == result["settings"]["reps"]
    assert all(positive(x) for x in dpo["ratio_per_rep"] + online["ratio_per_rep"])
    # the same work on both sides: identical token rows, pairs, samples; no suppressed id sampled by TRL
    c = dpo["checks"]
    assert c["rows_identical"] == c["rows"] == c["trl_rows"] == c["zoo_pairs"] == dpo["trl"]["median_pairs"]
    assert c["trl_steps"] == math.ceil(c["rows"] / result["settings"]["dpo_batch"])
    assert online["trl"]["median_samples"] == online["zoo"]["median_samples"]
    assert online["trl"]["median_suppressed_tokens_sampled"] == 0
    assert f"{dpo['ratio_zoo_vs_trl']:.2f}" in md and f"{online['ratio_zoo_vs_trl']:.2f}" in md


# --- the user-model path (realistic shape's builder, at the test's mini size) ---------------------------
def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_vs_trl_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_setup_builder_shapes(tmp_path):
    """The realistic shape's builder at the mini size: a BPE of the asked size, a Qwen2 policy and a
    one-label reward model of the same architecture, prompts and responses of exactly the shape's length."""
    m = _script_module()
    shape = m.USER_SHAPES["mini"]
    built = m.build_user_setup(tmp_path / "setup", shape)
    paths = built["paths"]
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["policy"])
    assert len(tok) == built["vocab_size"] == shape["vocab_size"]
    assert tok.bos_token is None and tok.eos_token == m.EOS_TOKEN and tok.pad_token == m.PAD_TOKEN
    cfg, rm_cfg = AutoConfig.from_pretrained(paths["policy"]), AutoConfig.from_pretrained(paths["rm"])
    assert cfg.model_type == rm_cfg.model_type == "qwen2" and rm_cfg.num_labels == 1
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (shape["layers"], shape["hidden"])
    prefs = m._read_jsonl(paths["prefs"])
    assert len(prefs) == shape["rows"]
    for row in prefs:
        assert len(tok(row["prompt"], add_special_tokens=False)["input_ids"]) == shape["prompt_tokens"]
        for k in ("chosen", "rejected"):
            assert len(tok(row[k], add_special_tokens=False)["input_ids"]) == shape["response_tokens"] - 1
    # the realistic shape is what the issue asks for: ~32k vocabulary, 8 layers x 512, 64 + 64 tokens
    real = m.USER_SHAPES["realistic"]
    assert (real["vocab_size"], real["layers"], real["hidden"], real["prompt_tokens"], real["response_tokens"]) == \
        (32000, 8, 512, 64, 64)


def test_user_path_tokenisation_identical_to_trl(tmp_path):
    pytest.importorskip("trl")
    m = _script_module()
    m._quiet()
    shape, work = m.USER_SHAPES["mini"], m.USER_WORK["mini"]
    paths = m.build_user_setup(tmp_path / "setup", shape)["paths"]
    checks = m.user_token_checks(paths, shape, work, tmp_path / "checks")
    for name in ("dpo", "reward-model", "sft"):
        assert checks[name]["rows_identical"] == checks[name]["rows"] == checks[name]["trl_rows"] == work["pairs"]
    assert checks["lengths"] == {"prompt_tokens": [shape["prompt_tokens"]],
                                 "response_tokens_with_eos": [shape["response_tokens"]]}


def test_user_comparisons_quick(tmp_path):
    """--quick --user-only: every trainer with a TRL counterpart, both sides, at the mini shape."""
    pytest.importorskip("trl")
    out = tmp_path / "user.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--user-only", "--threads", "1", "--algorithms",
                           "dpo,sft,reward-model,rloo,grpo", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    algos = result["user"]["algorithms"]
    assert set(algos) == {"dpo", "sft", "reward-model", "rloo", "grpo"}
    for a in algos.values():
        key = a["unit"]
        for side in ("zoo", "trl"):
            check_side(a[side], key)
            assert math.isfinite(a[side]["median_peak_rss_mb"])
        assert a["ratio_zoo_vs_trl"] == pytest.approx(a["zoo"][f"median_{key}"] / a["trl"][f"median_{key}"], rel=1e-12)
    md = out.with_suffix(".md").read_text()
    assert "`GRPOTrainer`" in md and "`RewardTrainer`" in md and "`SFTTrainer`" in md
