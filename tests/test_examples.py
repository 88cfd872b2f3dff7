"""The example scripts run end to end (``--tiny``: tiny random Llama, synthetic data) and save a loadable folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import elitekv_peft  # noqa: F401  (registers the EliteKV model classes)

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(ROOT / "examples" / script), "--tiny", "--no-progress", "--out", str(out), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("uptrain.py", ["--train-tokens", "8192"]),
        ("uptrain_trl.py", ["--train-tokens", "8192", "--no-gradient-checkpointing"]),
        ("uptrain.py", ["--train-tokens", "8192", "--quantize", "4bit", "--trainable", "attention_norms"]),
    ],
)
def test_example_runs_and_saves_a_loadable_folder(tmp_path, script, extra):
    out = tmp_path / "out"
    result = run_example(script, out, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "adapter_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    losses = summary["logged_losses"]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    ppl = summary["perplexity"]
    assert ppl[next(k for k in ppl if k.startswith("uptrained"))] < ppl["training_free"]

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "EliteKVLlamaForCausalLM"
