"""benchmarks/decode_speed.py end to end at the tiny shape (its ``--quick``), without the compiled methods
(torch.compile takes tens of seconds on CPU); the setup directory is reused and checked."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_speed_quick_runs_end_to_end(bench, tmp_path):
    out = tmp_path / "results" / "decode.json"
    res = bench.main(["--quick", "--threads", "1", "--setup-dir", str(tmp_path / "setup"), "--batches", "3",
                      "--methods", "sample,sample_static,generate_static", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Decode speed") and res["git_commit"] in md
    assert res["methods"] == ["sample", "sample_static", "generate_static", "generate"]  # the baseline is added
    assert res["under_load"] == (("MEASURED UNDER LOAD" in md))
    (shape,) = res["shapes"]
    assert shape["name"] == "tiny" and shape["vocab_size"] == 512 and shape["zoo_static_supported"]
    (b,) = shape["batches"]
    assert (b["batch"], b["max_new_tokens"], b["tokens_per_call"], b["reps"]) == (3, 16, 48, 1)
    assert b["errors"] == {} and b["prompt_tokens"] == 16
    for name, r in b["methods"].items():
        assert math.isfinite(r["tokens_per_second"]) and r["tokens_per_second"] > 0
        assert r["tokens_per_second"] == pytest.approx(48 / r["median_seconds"])
        assert len(r["seconds"]) == 1 and r["warmup_seconds"] > 0
        assert f"| {name} | {r['tokens_per_second']:.4g} |" in md
    assert b["methods"]["generate"]["time_ratio_vs_generate"]["median"] == 1.0
    assert b["methods"]["sample_static"]["tokens_identical_to_sample"] is True


def test_decode_speed_setup_dir_is_reused_and_checked(bench, tmp_path):
    shape, where, built = bench.setup("mini", tmp_path, tmp_path / "unused")
    assert built is not None and (where / "policy" / "config.json").exists()
    again = bench.setup("mini", tmp_path, tmp_path / "unused")
    assert again[1] == where and again[2] is None  # reused, not rebuilt
    (tmp_path / "tiny").symlink_to(where)  # a mini model where the tiny shape is expected
    with pytest.raises(SystemExit, match="not the tiny shape's"):
        bench.setup("tiny", tmp_path, tmp_path / "unused")
