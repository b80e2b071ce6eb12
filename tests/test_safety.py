"""Safe loading: nothing the project loads can run code the user did not ask for.

A static scan of every Python file of the project (package, plugins, envs, benchmarks) for pickle-based
loading, ``torch.load`` without ``weights_only=True``, ``allow_pickle=True``, ``trust_remote_code=True``
and ``eval``/``exec``; and behavioural checks: a model directory holding pickled weights is refused, a
model directory asking for its own code is refused unless the caller trusts it, checkpoints hold only
safetensors and JSON.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from rlhf_zoo.models import load_policy, new_causal_lm, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["rlhf_zoo", "plugins", "envs", "benchmarks"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            out.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if func.endswith("torch.load") or func == "load" and "weights_only" in kw:
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    out.append(f"{where} calls {func} without weights_only=True")
            if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True:
                out.append(f"{where} passes allow_pickle=True")
            if isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is True:
                out.append(f"{where} passes trust_remote_code=True")
            if func in ("eval", "exec"):
                out.append(f"{where} calls {func}()")
            if func.endswith(".from_pretrained") and "Tokenizer" not in func and "Config" not in func \
                    and not (isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True):
                out.append(f"{where} calls {func} without use_safetensors=True")
    return out


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\n"
                   "import numpy as np\nz = np.load('f', allow_pickle=True)\neval('1')\n"
                   "from transformers import AutoModel\nm = AutoModel.from_pretrained('p', trust_remote_code=True)\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _findings(bad)
    finally:
        ROOT = saved
    assert len(found) == 7, found  # import, 2 torch.load, allow_pickle, eval, trust_remote_code, use_safetensors


def test_no_pickle_anywhere_in_the_project():
    files = _python_files()
    assert len(files) > 40
    findings = [f for p in files for f in _findings(p)]
    assert not findings, "\n".join(findings)


def test_a_model_directory_with_pickled_weights_is_refused(tmp_path):
    model = new_causal_lm(tiny_llama_config(16, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=8, num_layers=1, num_heads=2), seed=0)
    model.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the old pickled format
    with pytest.raises(OSError, match="safetensors"):
        load_policy(tmp_path / "bin")
    model.save_pretrained(tmp_path / "safe")
    loaded = load_policy(tmp_path / "safe")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_a_model_directorys_own_code_runs_only_when_trusted(tmp_path):
    model = new_causal_lm(tiny_llama_config(16, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=8, num_layers=1, num_heads=2), seed=0)
    model.save_pretrained(tmp_path)
    marker = tmp_path / "ran.txt"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import LlamaForCausalLM\n\n\nclass Evil(LlamaForCausalLM):\n    pass\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_policy(tmp_path)  # the built-in Llama class; the directory's code is not imported
    assert type(loaded).__name__ == "LlamaForCausalLM" and not marker.exists()
    load_policy(tmp_path, trust_remote_code=True)  # only when the caller says so
    assert marker.read_text() == "ran"


def test_checkpoints_hold_only_safetensors_and_json(tmp_path):
    from rlhf_zoo.runner import run

    run("dpo", task="exact", out=tmp_path, device="cpu", preset="smoke", progress=False, checkpoint_every=1)
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}
    assert {p.suffix for p in (tmp_path / "policy").iterdir()} <= {".safetensors", ".json", ".jinja", ".txt"}
