"""benchmarks/generate_speed.py and decode_host_ops.py end to end on the tiny model (CPU): the converted model is the
reloaded standalone class, every context x batch x model is measured, each converted row carries its ratio to the
original, and the host-work counts add up."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_modules import load_benchmark

generate_speed = load_benchmark("generate_speed")


def test_generate_speed_on_the_tiny_model(tmp_path):
    argv = ["--tiny", "--device", "cpu", "--dtype", "float32", "--contexts", "24,40", "--batches", "1,2"]
    argv += ["--new-tokens", "12", "--repeats", "3", "--paths", "auto,reconstruct", "--out", str(tmp_path)]
    report = generate_speed.main(argv)

    saved = json.loads((tmp_path / "generate_speed.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["converted_class"].startswith("EliteKV") and report["converted_class"].endswith("ForCausalLM")
    labels = [row["model"] for row in report["rows"]]
    assert labels == ["original"] * 4 + ["elitekv 0.25 (auto)"] * 4 + ["elitekv 0.25 (reconstruct)"] * 4
    assert [(r["context"], r["batch"]) for r in report["rows"][:4]] == [(24, 1), (24, 2), (40, 1), (40, 2)]
    by_key = {(r["model"], r["context"], r["batch"]): r for r in report["rows"]}
    for row in report["rows"]:
        assert row["decode_tokens_per_s"] > 0 and row["ms_per_step"] > 0
        if row["model"] == "original":
            assert "speed_vs_original" not in row
        else:
            base = by_key[("original", row["context"], row["batch"])]
            assert row["speed_vs_original"] == pytest.approx(row["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    markdown = (tmp_path / "generate_speed.md").read_text()
    assert (
        markdown.count("\n| elitekv 0.25 (auto) |") == 4 and "Command: `python benchmarks/generate_speed.py" in markdown
    )


def test_generate_speed_with_preallocated_caches(tmp_path):
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--contexts",
        "24",
        "--batches",
        "2",
        "--cache",
        "static",
    ]
    report = generate_speed.main(
        argv + ["--new-tokens", "12", "--repeats", "3", "--paths", "auto", "--out", str(tmp_path)]
    )
    assert report["cache"] == "static" and [r["model"] for r in report["rows"]] == ["original", "elitekv 0.25 (auto)"]
    assert all(r["decode_tokens_per_s"] > 0 for r in report["rows"])
    assert "pre-allocated cache" in (tmp_path / "generate_speed_static.md").read_text()
    assert not (tmp_path / "generate_speed.json").exists()


def test_generate_speed_rejects_a_single_new_token(tmp_path):
    with pytest.raises(SystemExit):
        generate_speed.main(["--tiny", "--device", "cpu", "--new-tokens", "1", "--out", str(tmp_path)])


def test_decode_host_ops_counts_calls_per_step(tmp_path):
    host_ops = load_benchmark("decode_host_ops")
    report = host_ops.main(["--paths", "reconstruct", "--top", "3", "--out", str(tmp_path)])
    original, converted = report["rows"]
    assert original["model"] == "original" and original["calls_per_step"] > 50
    assert converted["path"] == "reconstruct" and len(converted["top_extra_per_layer"]) == 3
    layers = int(report["model"].split("(")[1].split()[0])
    assert converted["extra_per_layer"] == pytest.approx(
        (converted["calls_per_step"] - original["calls_per_step"]) / layers
    )
    assert "| elitekv 0.25 | reconstruct |" in (tmp_path / "decode_host_ops.md").read_text()
