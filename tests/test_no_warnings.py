"""A fresh install prints no deprecation warning during ``zoo run`` (issue 10): the decode loop and every
forward use the newest transformers cache API, on a built-in task and on a user's own model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rlhf_zoo.fixtures import build_policy, write_datasets

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(args: list[str], cwd) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "rlhf_zoo", "run", *args, "--quiet", "--device", "cpu"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Warning" in line or "deprecated" in line.lower()]


def test_zoo_run_on_a_built_in_task_prints_no_warning(tmp_path):
    assert _warnings(_run(["ppo", "--task", "exact", "--preset", "smoke", "--out", str(tmp_path / "run")], tmp_path)) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zoo_run_on_a_user_model_prints_no_warning(tmp_path, arch):
    build_policy(arch, tmp_path / arch, pretrain_steps=0)
    write_datasets(tmp_path, n=8)
    stderr = _run(["ppo", "--model", arch, "--reward", "keyword_reward:reward", "--prompts", "prompts_conv.jsonl",
                   "--preset", "smoke", "--out", str(tmp_path / "run")], tmp_path)
    assert _warnings(stderr) == []
