"""Retention measurement end to end on the tiny random model (benchmarks/retention.py), and its pieces:
top-1 agreement, the unseen corpora of elitekv_demo.corpora and their text extractors."""

from __future__ import annotations

import gzip
import json
import sys
import time
import warnings

import pytest
import torch

from elitekv_demo.corpora import UNSEEN_CORPORA, corpus_files, parse_corpora
from elitekv_demo.corpus_sets import unseen_windows
from elitekv_demo.testing import synthetic_windows
from elitekv_demo.text_formats import fortune_to_text, info_to_text, read_text, roff_to_text
from elitekv_peft.evaluation import RetentionReference, perplexity, score_windows, top1_agreement
from tests.benchmark_modules import load_benchmark
from tests.tiny import VOCAB, tiny_model, tiny_tokenizer

retention = load_benchmark("retention")  # puts benchmarks/ on sys.path for its helper modules
make_recipe, mix_windows = sys.modules["retention_recipes"].make_recipe, sys.modules["retention_recipes"].mix_windows

SEQ = 32
SCHEMA = {"model", "device", "date", "command", "unseen_corpora", "rows"}
ROW_KEYS = {"method", "kv_ratio", "recipe", "train_tokens", "gpu_minutes", "ppl", "top1_agreement"}
TINY_KNOBS = {"seq_len": str(SEQ), "train_tokens": "256", "batch_size": "4", "calib_samples": "4"}


def tiny_bench() -> retention.Bench:
    """The tiny model, an in-domain chain and two chains of other kinds (different seeds), train text of the first."""
    base = tiny_model()
    indomain = synthetic_windows(VOCAB, 40, SEQ, seed=0)
    sets = {
        "indomain": indomain[32:],
        "chain_b": synthetic_windows(VOCAB, 6, SEQ, seed=1),
        "chain_c": synthetic_windows(VOCAB, 6, SEQ, seed=2, branching=8),
    }
    reference = RetentionReference(base, sets, batch_size=4, progress=False)
    return retention.Bench(base, "cpu", reference, indomain[:4], lambda corpora: indomain[:32])


def test_agreement_is_one_for_the_model_itself_and_below_one_for_another():
    model = tiny_model()
    windows = synthetic_windows(VOCAB, 5, SEQ, seed=3)
    own = score_windows(model, windows, keep_predictions=True, batch_size=2, progress=False)
    assert own.predictions.shape == (5, SEQ - 1)
    assert own.perplexity == pytest.approx(perplexity(model, windows, batch_size=3, progress=False), rel=1e-6)
    assert top1_agreement(model, windows, own.predictions, progress=False) == 1.0
    other = tiny_model(seed=1)
    assert top1_agreement(other, windows, own.predictions, progress=False) < 0.9
    with pytest.raises(ValueError, match="same windows"):
        top1_agreement(model, windows, own.predictions[:, :-1], progress=False)


def test_retention_end_to_end_on_the_tiny_model(tmp_path):
    bench = tiny_bench()
    assert bench.reference.measure(bench.base)[1] == {"indomain": 1.0, "chain_b": 1.0, "chain_c": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retention.run_rows(
            bench, ["original", "elitekv:0.25:none"], tmp_path, command="first", overrides=TINY_KNOBS, plot=False
        )
        result = retention.run_rows(
            bench,
            ["elitekv:0.5:lm", "elitekv:0.25:none"],  # the second replaces the first call's row
            tmp_path,
            command="second",
            overrides={**TINY_KNOBS, "learning_rate": "0.01"},
        )
    saved = json.loads((tmp_path / "retention.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved) == SCHEMA
    assert saved["unseen_corpora"] == ["chain_b", "chain_c"]
    assert saved["command"] == "first ; second" and saved["device"] == "cpu"
    rows = {(r["method"], r["kv_ratio"], r["recipe"]): r for r in saved["rows"]}
    assert len(saved["rows"]) == 3 and set(rows) == {("original", 1.0, "none"), ("elitekv", 0.25, "none"),
                                                     ("elitekv", 0.5, "lm")}  # fmt: skip
    for row in saved["rows"]:
        assert ROW_KEYS <= set(row) and "knobs" in row
        assert set(row["ppl"]) == set(row["top1_agreement"]) == {"indomain", "chain_b", "chain_c"}
        assert all(0.0 <= v <= 1.0 for v in row["top1_agreement"].values())
        assert all(v > 1.0 for v in row["ppl"].values())
    original, damaged, trained = (
        rows[("original", 1.0, "none")],
        rows[("elitekv", 0.25, "none")],
        rows[("elitekv", 0.5, "lm")],
    )
    assert original["top1_agreement"] == {"indomain": 1.0, "chain_b": 1.0, "chain_c": 1.0}
    assert original["ppl"] == bench.reference.ppl and original["train_tokens"] == 0
    assert all(v < 1.0 for v in damaged["top1_agreement"].values())
    assert damaged["ppl"] != original["ppl"] and damaged["train_tokens"] == 0
    assert damaged["knobs"]["loss"] == "none" and damaged["knobs"]["train_tokens"] == 0  # --set did not train it
    assert trained["train_tokens"] == 256 and trained["gpu_minutes"] > 0
    assert trained["knobs"]["loss"] == "lm" and trained["knobs"]["learning_rate"] == 0.01
    assert trained["ppl"]["indomain"] != pytest.approx(original["ppl"]["indomain"], rel=1e-4)
    md = (tmp_path / "retention.md").read_text()
    assert "| indomain | chain_b | chain_c |" in md and "100.0%" in md
    assert "* EliteKV 0.25 none (0 tokens" in md and "* EliteKV 0.5 lm (256 tokens" in md  # the goals of issue 18
    assert (tmp_path / "retention.png").stat().st_size > 1000
    again = retention.run_rows(bench, ["elitekv:0.25:none"], tmp_path, command="x", plot=False, skip_done=True)
    assert again["rows"] == saved["rows"] and again["command"] == "first ; second"  # nothing measured
    merged = retention.merge_results([saved, {**saved, "rows": saved["rows"][:1], "command": "third"}])
    assert len(merged["rows"]) == 3 and merged["command"] == "first ; second ; third"


def test_distill_and_selfgen_recipes_train_and_record_their_knobs(tmp_path):
    bench = tiny_bench()
    bench.selfgen_dir = tmp_path / "gen"
    knobs = {**TINY_KNOBS, "selfgen_tokens": "256", "selfgen_batch": "4", "selfgen_prompt_lengths": "4,8"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = retention.run_rows(
            bench, ["elitekv:0.5:distill", "elitekv:0.5:selfgen"], tmp_path, command="c", overrides=knobs, plot=False
        )
    rows = {r["recipe"]: r for r in result["rows"]}
    assert rows["distill"]["knobs"]["loss"] == "distill" and "selfgen_fraction" not in rows["distill"]["knobs"]
    assert rows["selfgen"]["knobs"]["selfgen_fraction"] == 0.5 and rows["selfgen"]["train_tokens"] == 256
    assert rows["selfgen"]["selfgen_minutes"] <= rows["selfgen"]["gpu_minutes"]
    cached = list((tmp_path / "gen").glob("selfgen-*.pt"))
    assert len(cached) == 1 and torch.load(cached[0], weights_only=True)["windows"].shape == (8, SEQ)


def test_a_progressive_row_trains_and_records_its_stages(tmp_path):
    knobs = {**TINY_KNOBS, "progressive_stages": "2"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = retention.run_rows(tiny_bench(), ["elitekv:0.5:distill"], tmp_path, command="c", overrides=knobs)
    (row,) = result["rows"]
    assert row["knobs"]["progressive_stages"] == 2 and row["train_tokens"] > 0
    assert row["ppl"]["indomain"] > 0 and 0.0 <= row["top1_agreement"]["indomain"] <= 1.0


def test_a_row_stopped_by_the_time_limit_resumes_to_the_same_model(tmp_path):
    """--time-limit: training saves a checkpoint and stops, no row is written; the same row later resumes and
    ends where an uninterrupted run ends (same perplexities), its minutes added up."""
    knobs = {**TINY_KNOBS, "train_tokens": "512"}  # 4 steps of 4 x 32 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = retention.run_rows(tiny_bench(), ["elitekv:0.5:lm"], tmp_path / "a", command="a", overrides=knobs)
        bench = tiny_bench()
        bench.ckpt_root, bench.deadline = tmp_path / "ckpt", time.time() - 1.0
        stopped = retention.run_rows(bench, ["elitekv:0.5:lm"], tmp_path / "b", command="b", overrides=knobs)
        assert stopped["rows"] == [] and not (tmp_path / "b" / "retention.json").exists()
        spent = json.loads((tmp_path / "ckpt" / "elitekv-0.5-lm" / "spent.json").read_text())
        assert spent["step"] == 1 and (tmp_path / "ckpt" / "elitekv-0.5-lm" / "checkpoint-1").is_dir()
        bench.deadline = None
        resumed = retention.run_rows(bench, ["elitekv:0.5:lm"], tmp_path / "b", command="b", overrides=knobs)
    (a,), (b,) = whole["rows"], resumed["rows"]
    assert b["train_tokens"] == a["train_tokens"] == 512 and b["gpu_minutes"] > spent["seconds"] / 60.0 > 0
    assert b["resumed_from_step"] == 1 and "resumed_from_step" not in a
    for name in a["ppl"]:
        assert b["ppl"][name] == pytest.approx(a["ppl"][name], rel=1e-4)
    assert not (tmp_path / "ckpt" / "elitekv-0.5-lm").exists()


def test_recipes_rows_and_mixing_reject_bad_input():
    assert retention.parse_row("original") == ("original", 1.0, "none")
    assert retention.parse_row("gqa:0.3333:default") == ("gqa", 0.3333, "default")
    for bad, match in (("elitekv:0.25:magic", "unknown recipe"), ("foo:0.5:lm", "unknown method"),
                       ("elitekv:1:lm", "kv_ratio"), ("elitekv:0.25", "METHOD:KV_RATIO:RECIPE")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            retention.parse_row(bad)
    with pytest.raises(ValueError, match="unknown knob 'nope'"):
        make_recipe("lm", "cpu", {"nope": "1"})
    broad = make_recipe("broad", "cpu", {})
    assert broad.job.loss == "distill" and tuple(broad.job.train_corpora) == ("pydocs", "linuxdoc", "pgdocs")
    real, generated = torch.zeros(6, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    mixed = mix_windows(real, generated, 0.5)
    assert mixed.shape == (12, 4) and int(mixed[:, 0].sum()) == 6  # the 2 generated rows repeated 3 times
    mixed = mix_windows(real[:2], torch.arange(24).reshape(6, 4) + 1, 0.25)  # all 6 generated, 18 real rows
    assert mixed.shape == (24, 4) and int((mixed[:, 0] > 0).sum()) == 6 and len(set(mixed[:, 0].tolist())) == 7


def test_unseen_corpora_are_never_training_text():
    for name in UNSEEN_CORPORA:
        with pytest.raises(ValueError, match="never trained on"):
            parse_corpora(f"pydocs,{name}")
    packages = {c.package for c in UNSEEN_CORPORA.values()}
    assert not packages & {"python3.11-doc", "linux-doc-6.1", "postgresql-doc-15"}
    assert not any(p.startswith("debian-reference") for p in packages)


ROFF = r""".\" a comment
.TH T5 7 2024 "x" "y"
.SH NAME
t5 \- t6 t7
.SH DESCRIPTION
.B t8
t9 \fBt10\fR t11\(em
.BR t12 (7),
.TP
.I t13
t14
.PP
.EX
t15  t16
.EE
.TS
l l.
t17	t18
.TE
.so man7/other.7
"""


def test_text_extractors_on_small_inputs():
    text = roff_to_text(ROFF)
    assert text.startswith("T5(7)\n\nNAME\n\nt5 - t6 t7\n")
    assert "t8 t9 t10 t11\u2014 t12(7),\n" in text and "t13\nt14" in text and "t15  t16" in text
    assert "t17  t18" in text and "comment" not in text and ".so" not in text and "\\" not in text
    assert roff_to_text(".so man7/other.7\n") == ""
    info = "This is x.info\n\x1f\nFile: x.info,  Node: Top,  Next: A\n\nt5 t6\n\x1f\nTag Table:\nNode: Top\x7f1\n"
    assert info_to_text(info) == "This is x.info\n\nt5 t6\n"
    assert fortune_to_text("t5 _\x08t6\n%\nt7 t\x08t8\n%\n") == "t5 t6\n\nt7 t8\n"


def test_unseen_windows_from_a_staged_copy(tmp_path, monkeypatch):
    """A folder given by the environment variable (as on the GPU machine) is read whole, with each format's
    extractor; the package's file list is only used for the shared Debian folders."""
    roots = {}
    for name, corpus in UNSEEN_CORPORA.items():
        root = tmp_path / name
        (root / "sub").mkdir(parents=True)
        words = " ".join(f"t{i}" for i in range(5, 60))
        body, stem = {
            "roff": (ROFF, "sub/page.7"),
            "info": ("File: a,  Node: Top\n\n" + words + "\n", "sub/book"),
            "fortune": ("t5 t6 t7\n%\n" + words + "\n%\n", "sub/q"),
        }[corpus.text_format]
        data = body.encode()
        path = root / (stem + corpus.suffix)
        path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
        for skipped in corpus.skip_suffixes:
            (root / ("sub/q" + skipped)).write_bytes(b"t5 t5 t5")
        monkeypatch.setenv(corpus.env, str(root))
        roots[name] = root
        assert corpus_files(name) == [path.resolve()]
        assert "t5" in read_text(path, corpus.text_format)
    tok = tiny_tokenizer()
    windows = unseen_windows(tok, 8, 3, cache=False)
    assert list(windows) == list(UNSEEN_CORPORA)
    for name, w in windows.items():
        assert w.dtype == torch.long and w.shape[1] == 8 and 1 <= w.shape[0] <= 3, name
    with pytest.raises(ValueError, match="not an unseen corpus"):
        unseen_windows(tok, 8, names=["pydocs"])
