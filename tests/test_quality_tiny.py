"""`benchmarks/quality.py` end to end on a CPU (``--tiny``: a tiny random Llama on synthetic windows): every row is
what the library computes for it, the saved folder reloads to the same perplexity, and the report pairs the rows."""

from __future__ import annotations

import json
import math

import pytest
from peft import get_peft_model

from elitekv_demo.testing import tiny_data, tiny_model
from elitekv_peft import EliteKVConfig
from elitekv_peft.evaluation import perplexity

from .benchmark_modules import load_benchmark

BUDGET = ["--eval-windows", "8", "--calib-samples", "8", "--train-tokens", "4096", "--batch-size", "4"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The state file of a training-free and an uptraining part, and the report written from it."""
    quality, report = load_benchmark("quality"), load_benchmark("quality_report")
    folder = tmp_path_factory.mktemp("quality")
    state = folder / "state.json"
    common = ["--tiny", "--state", str(state), *BUDGET]
    quality.main([*common, "--part", "training_free", "--only", "original,elitekv0.25,gqa"])
    quality.main([*common, "--part", "uptrain", "--only", "original,elitekv0.25:lm", "--save-dir", str(folder)])
    report.report(state, folder, command="test", device="cpu", date="2026-12-02")
    found = json.loads(state.read_text())["rows"]
    by_key = {(r["method"], r["kv_ratio"], r["stage"], r.get("variant", "")): r for r in found}
    assert len(by_key) == len(found) == 6, found
    return by_key, (folder / "quality.md").read_text()


def test_training_free_rows_are_the_library_perplexities(rows):
    by_key, _ = rows
    data = tiny_data(4096, 64, 8, 8)  # --tiny's windows: seq_len 64
    original = tiny_model(0)
    assert by_key[("original", 1.0, "as_is", "")]["ppl"] == pytest.approx(perplexity(original, data["eval"]), 1e-6)
    converted = get_peft_model(original, EliteKVConfig(kv_ratio=0.25, calibration_data=data["calib"]))
    elitekv = by_key[("elitekv", 0.25, "training_free", "")]
    assert elitekv["ppl"] == pytest.approx(perplexity(converted, data["eval"]), rel=1e-6)
    assert ("gqa", 0.5, "training_free", "") in by_key  # 2 KV heads: one group is the only ratio below 1


def test_uptrained_rows_train_the_budget_and_reload(rows):
    by_key, _ = rows
    uptrained = by_key[("elitekv", 0.25, "uptrained_lm", "")]
    original = by_key[("original", 1.0, "uptrained_lm", "")]
    assert uptrained["train_tokens"] == original["train_tokens"] == 4096  # 16 steps of 4 x 64
    assert original["ppl"] < by_key[("original", 1.0, "as_is", "")]["ppl"]
    assert uptrained["ppl"] < by_key[("elitekv", 0.25, "training_free", "")]["ppl"]
    reloaded = by_key[("elitekv", 0.25, "uptrained_lm", "reloaded_automodel")]
    assert math.isclose(reloaded["ppl"], uptrained["ppl"], rel_tol=1e-4)


def test_report_tables_and_pairs_the_rows(rows):
    by_key, text = rows
    up, base = by_key[("elitekv", 0.25, "uptrained_lm", "")]["ppl"], by_key[("original", 1.0, "uptrained_lm", "")]
    assert f"| elitekv | 0.25 | uptrained_lm | 4,096 | {up:.2f} |" in text
    assert f"4,096 tokens, train=pydocs: EliteKV 25% (lm) {up:.2f} vs original {base['ppl']:.2f}" in text
    assert "reloaded_automodel" in text  # an ablation row, not in the main table
