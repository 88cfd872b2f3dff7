"""The benchmark reports' target checks, on synthetic results (no GPU, no model): they decide what README claims."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def decode():
    return load_benchmark("decode")


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


@pytest.fixture(scope="module")
def quality_report():
    return load_benchmark("quality_report")


def _row(method, ms, path=None, ratio=1.0, batch=3, fits=None, bw=None):
    return dict(
        model="m", context=32768, batch=batch, method=method, kv_ratio=ratio, path=path, ms_per_step=ms,
        tokens_per_s=round(batch * 1000 / ms, 1), peak_mem_gib=1.0, max_batch_fits=fits, kernel_bandwidth_gbps=bw,
    )  # fmt: skip


def _run(tmp_path: Path, name: str, rows: list[dict], copy: float = 3000.0) -> str:
    run = dict(device="gpu", date="2026-11-23", command=f"run {name}", notes="synthetic", copy_bandwidth_gbps=copy)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**run, "rows": rows}))
    return str(path)


def _report_text(decode, result: dict, tmp_path: Path) -> str:
    """The decode.md that `write_report` makes of ``result`` (no plot)."""
    md = tmp_path / "decode.md"
    decode.write_report(result, md, None)
    return md.read_text()


def test_decode_targets_take_each_runs_fastest_elitekv_step_and_the_median_run(decode, tmp_path):
    first = _run(
        tmp_path,
        "first",
        [
            _row("baseline_dynamic", 100.0, fits=3),
            _row("baseline_static", 25.0),
            _row("elitekv", 21.0, "absorbed_kernel", 0.25, fits=16, bw=1000.0),
        ],
    )
    second = _run(
        tmp_path,
        "second",
        [
            _row("baseline_static", 25.0),
            _row("baseline_compiled", 24.0),
            _row("elitekv", 20.0, "absorbed_kernel", 0.25, bw=1800.0),
            _row("elitekv", 18.0, "absorbed_compiled", 0.25),
        ],
    )
    result = decode.merge([first, second])
    assert [r["run"] for r in result["rows"]] == [0, 0, 0, 1, 1, 1, 1]
    text = _report_text(decode, result, tmp_path)
    # per run, the fastest EliteKV step of the same kind over that run's baseline: static vs the uncompiled kernel
    # row 25/21 = 1.19x (run 0) and 25/20 = 1.25x (run 1), median 1.22; compiled vs the fastest absorbed step 24/18 =
    # 1.33x (run 1 only); DynamicCache 100/21 (run 0 only)
    assert "throughput >= 1.3x StaticCache + CUDA graph (median of 2 runs): 1.22 -> NOT reached" in text
    assert "throughput >= 1.3x StaticCache + torch.compile (median of 1 runs): 1.33 -> reached" in text
    assert "throughput >= 2x DynamicCache (median of 1 runs): 4.76 -> reached" in text
    # bandwidth from the last run's kernel row (1800 of 3000), batch growth from the row that searched it (16 / 3)
    assert "kernel bandwidth on cache bytes >= 60% of copy bandwidth: 0.60 -> reached" in text
    assert "largest batch >= 3.5x the DynamicCache baseline's: 5.33 -> reached" in text
    # "x DynamicCache (same run)": run 1 has no DynamicCache row, so its rows show "-"
    second_run_rows = [line for line in text.splitlines() if line.startswith("| m | 32768 | 3 |")][3:]
    assert second_run_rows and all("| - |" in line for line in second_run_rows)


def test_quality_target_checks_pair_rows_trained_alike(quality_report):
    rows = [
        dict(method="original", kv_ratio=1.0, stage="uptrained_lm", train_tokens=10, ppl=10.0),
        dict(method="elitekv", kv_ratio=0.25, stage="uptrained_lm", train_tokens=10, ppl=10.4),
        dict(method="elitekv", kv_ratio=0.125, stage="uptrained_lm", train_tokens=10, ppl=13.0),
        dict(method="gqa", kv_ratio=0.3333, stage="uptrained_lm", train_tokens=10, ppl=12.0),
        # another training set: paired only with its own original
        dict(method="original", kv_ratio=1.0, stage="uptrained_lm", train_tokens=12, ppl=7.0, variant="train=a+b"),
        dict(method="elitekv", kv_ratio=0.25, stage="uptrained_lm", train_tokens=12, ppl=9.0, variant="train=a+b"),
        # distillation is uptraining too (its teacher choice is part of the loss, not of the tokens) ...
        dict(
            method="elitekv", kv_ratio=0.25, stage="uptrained_distill", train_tokens=10, ppl=11.0,
            variant="teacher=uptrained",
        ),
        dict(
            method="elitekv", kv_ratio=0.25, stage="uptrained_distill", train_tokens=10, ppl=10.8,
            variant="hidden=1,teacher=uptrained",
        ),
        # ... and so is starting from the original adapted on part of the same budget (its row's tokens are the total)
        dict(
            method="elitekv", kv_ratio=0.25, stage="uptrained_lm", train_tokens=10, ppl=10.2,
            variant="from=uptrained(5.0M)",
        ),
        # that source (an original on fewer tokens) is never a baseline, even planted at the same token count
        dict(
            method="original", kv_ratio=1.0, stage="uptrained_lm", train_tokens=10, ppl=9.0,
            variant="tokens=5.0M,source",
        ),
        # ... but a recipe variant is never paired, with either loss
        dict(method="elitekv", kv_ratio=0.25, stage="uptrained_lm", train_tokens=10, ppl=9.9, variant="lr=3e-4"),
        dict(method="elitekv", kv_ratio=0.25, stage="uptrained_distill", train_tokens=10, ppl=9.9, variant="lr=3e-4"),
        dict(
            method="elitekv", kv_ratio=0.25, stage="uptrained_lm", train_tokens=10, ppl=9.9, variant="latent_lr=0.25x"
        ),
    ]  # fmt: skip
    lines = quality_report.target_checks(rows)
    assert len(lines) == 6
    assert "EliteKV 25% (lm) 10.40 vs original 10.00: +4.0% (target <= +5%): reached" in lines[0]
    assert "EliteKV 25% (lm, from=uptrained(5.0M)) 10.20 vs original 10.00: +2.0% (target <= +5%): reached" in lines[1]
    assert "EliteKV 25% (distill, hidden=1,teacher=uptrained) 10.80 vs original 10.00: +8.0%" in lines[2]
    assert "EliteKV 25% (distill, teacher=uptrained) 11.00 vs original 10.00: +10.0%" in lines[3]
    assert lines[2].endswith("NOT reached") and lines[3].endswith("NOT reached")
    assert "EliteKV 12.5% (lm) 13.00 vs GQA 12.00 (GQA at 33%" in lines[4] and lines[4].endswith("NOT reached")
    assert "train=a+b: EliteKV 25% (lm, train=a+b) 9.00 vs original 7.00: +28.6%" in lines[5]
    assert lines[5].endswith("NOT reached")


def test_decode_report_lists_the_compiled_ratio_of_every_run(decode, tmp_path):
    """One fast run must not be the only number shown: each run that timed both rows gets its own ratio."""
    runs = [
        _run(tmp_path, f"run{i}", [_row("baseline_compiled", 24.0), _row("elitekv", ms, "absorbed_compiled", 0.25)])
        for i, ms in enumerate([20.0, 18.0])
    ]
    first = _run(
        tmp_path, "dyn", [_row("baseline_dynamic", 100.0, fits=3), _row("elitekv", 21.0, "absorbed_kernel", 0.25)]
    )
    result = decode.merge([first, *runs])
    ratios = decode.same_run_ratios(result["rows"], ("m", 32768, 3), decode.COMPILED_BASELINES, 0.25)
    assert [run for run, _ in ratios] == [1, 2]  # run 0 has no compiled baseline
    assert [ratio for _, ratio in ratios] == pytest.approx([24.0 / 20.0, 24.0 / 18.0], rel=1e-2)  # tokens/s rounded
    text = _report_text(decode, result, tmp_path)
    assert "- StaticCache + torch.compile: run 1 1.20x, run 2 1.33x" in text
    # the target counts the median run (1.27), not the last one (1.33)
    assert "throughput >= 1.3x StaticCache + torch.compile (median of 2 runs): 1.27 -> NOT reached" in text


def test_decode_targets_compare_the_fastest_rows_of_each_side(decode, tmp_path):
    """With both ways of running the compiled step (the compiler's CUDA graphs, or Inductor's default mode captured
    by hand), each side counts with its faster row: a faster baseline lowers the ratio."""
    run = _run(
        tmp_path,
        "both",
        [
            _row("baseline_dynamic", 100.0, fits=3),
            _row("baseline_static", 25.0),
            _row("baseline_compiled", 24.0),
            _row("baseline_compiled_graph", 22.0),
            _row("elitekv", 20.0, "absorbed_kernel", 0.25, fits=16, bw=1500.0),
            _row("elitekv", 19.0, "absorbed_compiled", 0.25),
            _row("elitekv", 16.0, "absorbed_compiled_graph", 0.25),
        ],
    )
    result = decode.merge([run])
    text = _report_text(decode, result, tmp_path)
    # 22 / 16 = 1.375 (not 24 / 16 = 1.5 against the slower baseline, nor 22 / 19 against the slower EliteKV step)
    assert "throughput >= 1.3x StaticCache + torch.compile (median of 1 runs): 1.37 -> reached" in text
    ratios = decode.same_run_ratios(result["rows"], ("m", 32768, 3), decode.COMPILED_BASELINES, 0.25)
    assert [ratio for _, ratio in ratios] == pytest.approx([22.0 / 16.0], rel=1e-2)
    # the uncompiled graph baseline meets the uncompiled EliteKV graph (25 / 20), not the compiled step (25 / 16)
    assert "throughput >= 1.3x StaticCache + CUDA graph (median of 1 runs): 1.25 -> NOT reached" in text


def test_decode_report_marks_a_missing_baseline_with_a_dash(decode, tmp_path):
    """A run without a compiled baseline shows '-' in that column (it once printed 'nanx')."""
    run = _run(
        tmp_path,
        "no_compiled",
        [
            _row("baseline_dynamic", 100.0, fits=3),
            _row("baseline_static", 25.0),
            _row("elitekv", 20.0, "absorbed_kernel", 0.25, fits=16, bw=1500.0),
        ],
    )
    text = _report_text(decode, decode.merge([run]), tmp_path)
    assert "nan" not in text
    assert "| 0 | elitekv 25.0% absorbed_kernel | 150.0 | 20.0 | 5.00x | 1.25x | - |" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--part", "uptrain", "--quantize", "4bit"], "trainable"),
        (["--part", "uptrain", "--config-overrides", '{"rope_chunks": 8}'], "--variant"),
        (["--part", "uptrain", "--only", "elitekv0.25:distill", "--distill-weight", "0.5"], "--variant"),
        (["--part", "uptrain", "--only", "elitekv0.25:distill", "--hidden-weight", "1"], "--variant"),
        (["--part", "uptrain", "--only", "elitekv0.25:lm", "--latent-lr-ratio", "10"], "--variant"),
        (["--part", "uptrain", "--only", "elitekv0.25:distill", "--teacher", "uptrained"], "add `original`"),
        (["--part", "uptrain", "--only", "original", "--convert-from", "uptrained"], "name them in --only"),
        (["--part", "training_free", "--tiny", "--train-corpora", "pydocs,pgdocs"], "drop --train-corpora"),
    ],
)
def test_quality_refuses_runs_that_would_replace_the_main_rows(quality, monkeypatch, capsys, argv, message):
    """A recipe change without a label would overwrite the main row of that method and ratio in the state file;
    a quantized run that trains everything, or a teacher / starting point that this run never makes, would fail only
    after loading the model. All stop at parsing, naming the fix."""
    monkeypatch.setattr(sys, "argv", ["quality.py", *argv])
    monkeypatch.setattr(quality, "run_parts", lambda args: pytest.fail("ran"))
    with pytest.raises(SystemExit):
        quality.main()
    assert message in capsys.readouterr().err


def test_quality_labels_quantized_rows(quality, monkeypatch):
    seen = {}
    argv = ["--part", "uptrain", "--quantize", "4bit", "--config-overrides", '{"trainable": "attention_norms"}']
    monkeypatch.setattr(quality, "run_parts", lambda args: seen.setdefault("variant", args.variant))
    quality.main(argv)
    assert seen["variant"] == "quantize=4bit,trainable=attention_norms"


def test_decode_report_checks_each_latent_layout_on_its_own(decode, tmp_path):
    """S-LRD rows (keys and values in their own latents) get their own target lines; the J-LRD lines ignore them."""
    slrd = dict(decomposition="separate")
    run = _run(
        tmp_path,
        "layouts",
        [
            _row("baseline_dynamic", 100.0, fits=3),
            _row("baseline_static", 25.0),
            _row("elitekv", 20.0, "absorbed_kernel", 0.25, fits=16, bw=1300.0),
            {**_row("elitekv", 16.0, "absorbed_kernel", 0.25, fits=16, bw=2400.0), **slrd},
        ],
    )
    text = _report_text(decode, decode.merge([run]), tmp_path)
    joint, separate = text.split("Targets of issue 5 (25% cache, this context and batch")[1:3]
    assert "kernel bandwidth on cache bytes >= 60% of copy bandwidth: 0.43 -> NOT reached" in joint
    assert "StaticCache + CUDA graph (median of 1 runs): 1.25 -> NOT reached" in joint  # 25 / 20, not 25 / 16
    assert separate.startswith("; S-LRD cache")
    assert "kernel bandwidth on cache bytes >= 60% of copy bandwidth: 0.80 -> reached" in separate
    assert "StaticCache + CUDA graph (median of 1 runs): 1.56 -> reached" in separate
    assert "| elitekv 25.0% absorbed_kernel S-LRD |" in text


def test_decode_report_says_not_measured_for_a_layout_without_a_batch_search(decode, tmp_path):
    run = _run(
        tmp_path,
        "no_search",
        [
            _row("baseline_dynamic", 100.0, fits=3),
            _row("elitekv", 20.0, "absorbed_kernel", 0.25, fits=16, bw=1300.0),
            {**_row("elitekv", 16.0, "absorbed_kernel", 0.25, bw=2400.0), "decomposition": "separate"},
        ],
    )
    text = _report_text(decode, decode.merge([run]), tmp_path)
    joint, separate = text.split("Targets of issue 5 (25% cache, this context and batch")[1:3]
    assert "largest batch >= 3.5x the DynamicCache baseline's: 5.33 -> reached" in joint
    assert "largest batch >= 3.5x the DynamicCache baseline's: not measured" in separate


def test_decode_report_sets_each_kernel_row_against_its_own_runs_copy_bandwidth(decode, tmp_path):
    first = _run(tmp_path, "first", [_row("baseline_dynamic", 100.0, fits=3)])  # copy 3000 GB/s
    second = _run(tmp_path, "second", [_row("elitekv", 16.0, "absorbed_kernel", 0.25, fits=16, bw=1800.0)], 2400.0)
    text = _report_text(decode, decode.merge([first, second]), tmp_path)
    assert "| 1800.0 (75%) |" in text  # 1800 / 2400, not 1800 / 3000 = 60%
    assert "kernel bandwidth on cache bytes >= 60% of copy bandwidth: 0.75 -> reached" in text


def test_multigpu_report_reads_settings_from_names_and_errors_from_logs(tmp_path):
    report = load_benchmark("multigpu_report")
    summary = {
        "processes": 2,
        "train_tokens": 4096,
        "steps": 4,
        "logged_losses": [5.0, 3.0],
        "perplexity": {"training_free": 200.0, "uptrained_sft": 20.0, "reloaded": 20.02},
        "seconds": 3.0,
    }
    (tmp_path / "fsdp2_trl_real.log").write_text("starting\n")
    (tmp_path / "fsdp2_trl_real.summary.json").write_text(json.dumps(summary))
    (tmp_path / "fsdp_real_ramload.log").write_text(
        "[rank1]: RuntimeError: other rank\n[rank0]: RuntimeError: size mismatch\n[rank0]: ValueError: later\n"
    )
    out = tmp_path / "multigpu.json"
    report.main([str(tmp_path), "--device", "d", "--date", "t", "--command", "c", "--versions", "v", "--out", str(out)])
    rows = {r["run"]: r for r in json.loads(out.read_text())["rows"]}
    ok, failed = rows["fsdp2_trl_real"], rows["fsdp_real_ramload"]
    assert (ok["launcher"], ok["trainer"], ok["model"], ok["cpu_ram_efficient_loading"]) == (
        "FSDP2",
        "SFTTrainer",
        "SmolLM2-135M",
        False,
    )
    assert ok["ppl_uptrained"] == 20.0 and ok["reload_diff_pct"] == pytest.approx(0.1)
    assert (failed["launcher"], failed["trainer"], failed["cpu_ram_efficient_loading"]) == ("FSDP1", "Trainer", True)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: size mismatch"
    assert "| fsdp_real_ramload | FSDP1 | Trainer | SmolLM2-135M | on |" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="expected"):
        report.run_settings("zero_real")


def test_multigpu_job_names_its_runs_the_way_the_report_reads_them():
    """Every `launch NAME` in benchmarks/multigpu_job.sh is a name `multigpu_report.run_settings` understands, with
    the launcher it names and `_ramload` exactly where accelerate's default CPU-RAM-efficient loading stays on."""
    import re

    report = load_benchmark("multigpu_report")
    job = (Path(__file__).resolve().parents[1] / "benchmarks" / "multigpu_job.sh").read_text()
    settings = {name: re.search(rf'^{name}="(.*?)"', job, re.M | re.S).group(1) for name in ("FSDP", "FSDP2")}
    ram_efficient = {"$" + k: "--fsdp_cpu_ram_efficient_loading false" not in v for k, v in settings.items()}
    launches = re.findall(r"^\s*(?:\w+\) )?launch (\w+) \d+ \S+ (.*?) -- ", job, re.M)
    assert len(launches) >= 7
    for name, accelerate_args in launches:
        run = report.run_settings(name)
        assert run["launcher"] == {"--multi_gpu": "DDP", "$FSDP": "FSDP1", "$FSDP2": "FSDP2"}[accelerate_args], name
        assert run["cpu_ram_efficient_loading"] == ram_efficient.get(accelerate_args, False), name


def test_uptrain_speed_variants_run_on_the_tiny_model(tmp_path, monkeypatch):
    speed = load_benchmark("uptrain_speed")
    assert speed.parse_variant("distill+compile+bs64", 32) == {
        "name": "distill+compile+bs64", "loss": "distill", "compile": True, "batch_size": 64,
    }  # fmt: skip
    for bad in ("kl", "distill+fast"):
        with pytest.raises(ValueError, match="variant"):
            speed.parse_variant(bad, 32)
    argv = "--tiny --device cpu --steps 2 --warmup 0 --batch-size 2 --seq-len 16 --profile-steps 0"
    monkeypatch.setattr(sys, "argv", ["uptrain_speed.py", *argv.split(), "--variants", "lm,distill+bs4"])
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--out", str(tmp_path)])
    speed.main()
    report = json.loads((tmp_path / "uptrain_speed.json").read_text())
    assert report["baseline"] == "lm" and list(report["variants"]) == ["lm", "distill+bs4"]
    assert report["variants"]["lm"]["tokens_per_s_vs_baseline"] == 1.0
    assert report["variants"]["distill+bs4"]["batch_size"] == 4
    assert "| distill+bs4 | 4 |" in (tmp_path / "uptrain_speed.md").read_text()


def test_uptrain_host_ops_counts_layers_apart_from_the_rest(tmp_path):
    report = load_benchmark("uptrain_host_ops").main(["--out", str(tmp_path)])
    original, converted = report["rows"]
    assert original["calls_per_layer"] > 100 and converted["calls_per_layer"] > original["calls_per_layer"]
    assert converted["calls_outside_layers"] == original["calls_outside_layers"]  # embeddings, head and loss alike
    assert converted["top_extra_per_layer"] and "| original |" in (tmp_path / "uptrain_host_ops.md").read_text()
