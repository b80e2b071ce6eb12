"""docs/your-own-model.md runs as written: its bash blocks as one script from an empty directory (the
first block builds the model and data offline), then its Python blocks where the script ended."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "your-own-model.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_the_pipeline_and_a_python_block():
    script = "\n".join(blocks("bash"))
    for step in ("python -m rlhf_zoo.fixtures demo", "zoo run sft --model", "zoo run reward-model --model",
                 "zoo run ppo --model", "zoo run best-of-n --model", "zoo run dpo --model", "--lora-r",
                 "--nproc 2", "zoo bench --suite"):
        assert step in script, step
    assert len(blocks("python")) == 2


@pytest.mark.slow
def test_every_command_in_the_doc_runs_verbatim(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cwd_file = tmp_path / "cwd.txt"
    script = "set -euo pipefail\n" + "\n".join(blocks("bash")) + f"\npwd > {cwd_file}\n"
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = Path(cwd_file.read_text().strip())
    for run in ("sft", "rm", "ppo", "bon", "dpo", "ppo-gold", "ppo-other-rm", "dpo-lora", "ppo-2"):
        assert (end / "runs" / run / "summary.json").is_file(), run
    ppo = json.loads((end / "runs" / "ppo" / "summary.json").read_text())
    assert ppo["proxy_reward"] > ppo["baseline_proxy_reward"]  # PPO raised the reward it was trained on
    assert (end / "runs" / "dpo-lora" / "adapter" / "adapter_config.json").is_file()
    assert (end / "bench-mine" / "report.md").is_file()
    loading, environment = (subprocess.run([sys.executable, "-c", b], cwd=end, env=env, capture_output=True,
                                           text=True, timeout=300) for b in blocks("python"))
    assert loading.returncode == 0, loading.stderr[-3000:]
    assert "<|assistant|>" in loading.stdout  # the saved tokenizer's chat template rendered the prompt
    assert environment.returncode == 0, environment.stderr[-3000:]
    assert "tensor(" in environment.stdout
