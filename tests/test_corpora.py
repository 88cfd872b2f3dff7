"""Corpora and training mixes: fake documentation trees in ``tmp_path``, the tiny word-level tokenizer.

Nothing here needs a Debian package; the last tests (``slow``) check the real packages when they are
installed and skip with the install command otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elitekv_demo.corpora import (
    CORPORA,
    cache_root,
    corpus_files,
    corpus_splits,
    parse_corpora,
    pydocs_files,
    split_files,
)
from elitekv_demo.corpus_sets import load_corpus_data, mix_tokens
from elitekv_demo.text_formats import html_to_text
from elitekv_demo.tokens import token_stream, token_windows
from elitekv_peft.pipeline import JobSettings

from .tiny import tiny_tokenizer

# word ranges per corpus, so that a window tells which corpus it came from (tiny vocabulary t0 .. t127;
# t0 .. t3 are special and the tokenizer matches them inside words, so words start at t40)
WORDS = {"pydocs": range(40, 60), "linuxdoc": range(60, 80), "pgdocs": range(80, 100)}
NAV_WORD = "t120"  # only in the HTML navigation bars, which the extractor drops
SEQ = 8


def _words(name: str, i: int) -> str:
    r = WORDS[name]
    return " ".join(f"t{r[(i * 7 + j) % len(r)]}" for j in range(20 + i % 17))


def _page(body: str) -> str:
    nav = f'<div class="navheader"><table><tr><td><a href="x.html">{NAV_WORD}</a></td></tr></table></div>'
    foot = f'<div class="navfooter"><div><a href="y.html">{NAV_WORD}</a></div></div>'
    return (
        '<?xml version="1.0" encoding="UTF-8"?><html><head><title>t121</title><style>t122</style></head>'
        f'<body>{nav}<div class="sect1"><h2>{body.split()[0]}</h2><p>{body}</p></div>{foot}</body></html>'
    )


def _fake_docs(tmp_path: Path, n: int = 120) -> dict[str, Path]:
    """Three small corpora laid out like the Debian packages, with a few files the corpora must ignore."""
    roots = {
        "pydocs": tmp_path / "python3.11" / "html" / "_sources",
        "linuxdoc": tmp_path / "linux-doc-6.1" / "html" / "_sources",
        "pgdocs": tmp_path / "postgresql-doc-15" / "html",
    }
    for i in range(n):
        p = roots["pydocs"] / f"sub{i % 5}" / f"page{i:03d}.rst.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_words("pydocs", i))
        p = roots["linuxdoc"] / f"area{i % 9}" / f"doc{i:03d}.rst.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_words("linuxdoc", i))
        p = roots["pgdocs"] / f"chapter-{i:03d}.html"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_page(_words("pgdocs", i)))
    (roots["pgdocs"] / "bookindex.html").write_text(_page("t125 t125 t125"))  # excluded by name
    (roots["pgdocs"] / "stylesheet.css").write_text("t126")  # not .html
    (roots["linuxdoc"] / "area0" / "figure.svg").write_text("t127")  # not .txt
    return roots


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """Fake corpora found through the environment variables, and a private token cache."""
    roots = _fake_docs(tmp_path)
    for name, root in roots.items():
        monkeypatch.setenv(CORPORA[name].env, str(root))
    monkeypatch.setenv("ELITEKV_CACHE", str(tmp_path / "cache"))
    return roots


def _words_of(windows: torch.Tensor) -> set[int]:
    return set(windows.flatten().tolist()) - {2}  # EOS separates files


# ---------------------------------------------------------------- files and split


def test_corpus_files_follow_the_environment_and_skip_other_files(docs):
    for name, root in docs.items():
        files = corpus_files(name)
        assert len(files) == 120
        assert all(p.is_relative_to(root.resolve()) for p in files)
        keys = [p.relative_to(root.resolve()).as_posix() for p in files]
        assert keys == sorted(keys)
    assert "bookindex.html" not in {p.name for p in corpus_files("pgdocs")}


@pytest.mark.parametrize("name", ["pydocs", "linuxdoc", "pgdocs"])
def test_split_is_deterministic_disjoint_and_by_file(docs, name, tmp_path):
    a = corpus_splits(name)
    b = corpus_splits(name, root=docs[name])  # explicit root = the environment's
    assert a == b
    train, ev, calib = set(a["train"]), set(a["eval"]), set(a["calib"])
    assert not train & ev
    assert train | ev == set(corpus_files(name))
    assert calib <= train
    assert ev  # every corpus has held-out files
    if name == "pydocs":
        assert calib
    else:
        assert not calib  # calibration always comes from the Python docs
    # the assignment depends on the relative path only: a copy of the tree elsewhere splits the same way
    copy_root = tmp_path / "elsewhere" / name
    for p in corpus_files(name):
        target = copy_root / p.relative_to(docs[name].resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    moved = corpus_splits(name, root=copy_root)
    for split in ("train", "eval", "calib"):
        assert [p.relative_to(copy_root.resolve()) for p in moved[split]] == [
            p.relative_to(docs[name].resolve()) for p in a[split]
        ]


def test_pydocs_split_equals_the_original_pydocs_split(docs):
    """``corpus_splits("pydocs")`` is the split every committed number used: ``split_files(pydocs_files())``."""
    assert corpus_splits("pydocs") == split_files(pydocs_files())


# ---------------------------------------------------------------- mixes


def test_extra_corpora_leave_the_python_docs_eval_and_calib_unchanged(docs):
    tok = tiny_tokenizer()
    base = load_corpus_data(tok, SEQ, eval_windows=50, calib_samples=6)
    mixed = load_corpus_data(tok, SEQ, eval_windows=50, calib_samples=6, train_corpora=("pydocs", "linuxdoc", "pgdocs"))
    old = split_files(pydocs_files())  # what elitekv_demo.job.load_default_data read before corpora existed
    expected_eval = token_windows(tok, old["eval"], SEQ, max_windows=50, split="eval", cache=False)
    expected_calib = token_windows(tok, old["calib"], SEQ, max_windows=6, split="calib", cache=False)
    for data in (base, mixed):
        assert torch.equal(data["eval"], expected_eval)
        assert torch.equal(data["calib"], expected_calib)
        assert _words_of(data["eval"]) <= {int(t[1:]) for t in (f"t{i}" for i in WORDS["pydocs"])}
    assert torch.equal(base["train"], token_windows(tok, old["train"], SEQ, split="train", cache=False))


def test_the_mix_holds_exactly_the_requested_corpora_in_order(docs):
    tok = tiny_tokenizer()
    single = {
        name: load_corpus_data(tok, SEQ, 20, 4, train_corpora=(name,))["train"] for name in ("pydocs", "linuxdoc")
    }
    assert _words_of(single["linuxdoc"]) <= set(WORDS["linuxdoc"])
    assert _words_of(single["pydocs"]) <= set(WORDS["pydocs"])

    data = load_corpus_data(tok, SEQ, 20, 4, train_corpora="linuxdoc,pgdocs")
    assert _words_of(data["train"]) <= set(WORDS["linuxdoc"]) | set(WORDS["pgdocs"])
    assert torch.equal(data["train/linuxdoc"], single["linuxdoc"])
    assert _words_of(data["train/pgdocs"]) <= set(WORDS["pgdocs"])  # navigation, title, style and index dropped
    assert torch.equal(data["train"], torch.cat([data["train/linuxdoc"], data["train/pgdocs"]]))
    assert data["train/linuxdoc"].data_ptr() == data["train"].data_ptr()  # a view, not a copy
    assert mix_tokens(data) == {"linuxdoc": data["train/linuxdoc"].numel(), "pgdocs": data["train/pgdocs"].numel()}
    assert sorted(k for k in data if k.startswith("eval/")) == ["eval/linuxdoc", "eval/pgdocs"]
    assert _words_of(data["eval/linuxdoc"]) <= set(WORDS["linuxdoc"])
    assert _words_of(data["eval"]) <= set(WORDS["pydocs"])  # the default eval set, whatever the mix

    # held-out files of a corpus never reach its training windows
    splits = corpus_splits("linuxdoc")
    held_out = token_stream(tok, splits["eval"], cache=False)
    train = token_stream(tok, splits["train"], cache=False)
    assert held_out.numel() + train.numel() == token_stream(tok, corpus_files("linuxdoc"), cache=False).numel()

    swapped = load_corpus_data(tok, SEQ, 20, 4, train_corpora=("pgdocs", "linuxdoc"))
    assert torch.equal(swapped["train"], torch.cat([data["train/pgdocs"], data["train/linuxdoc"]]))


def test_parse_corpora_rejects_unknown_repeated_and_empty_names():
    assert parse_corpora("pydocs, linuxdoc") == ("pydocs", "linuxdoc")
    assert parse_corpora(["pgdocs"]) == ("pgdocs",)
    with pytest.raises(ValueError, match="choose from pydocs, linuxdoc, pgdocs"):
        parse_corpora("pydocs,debian-reference")
    with pytest.raises(ValueError, match="twice"):
        parse_corpora("pydocs,pydocs")
    with pytest.raises(ValueError, match="no corpus"):
        parse_corpora(" , ")


@pytest.mark.parametrize(
    ("name", "command", "env"),
    [
        ("linuxdoc", "apt-get install -y linux-doc-6.1", "ELITEKV_LINUXDOC_DIR"),
        ("pgdocs", "apt-get install -y postgresql-doc-15", "ELITEKV_PGDOCS_DIR"),
        ("pydocs", "apt-get install -y python3.11-doc", "ELITEKV_PYDOCS_DIR"),
    ],
)
def test_a_missing_corpus_names_the_install_command(docs, monkeypatch, tmp_path, name, command, env):
    monkeypatch.setenv(env, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=command) as info:
        load_corpus_data(tiny_tokenizer(), SEQ, 4, 2, train_corpora=(name,))
    assert env in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=command):
        corpus_files(name, empty)


def test_reserved_text_is_refused(tmp_path):
    root = tmp_path / "debian-reference-en" / "html"
    root.mkdir(parents=True)
    (root / "index.en.txt").write_text("t40 t41")
    with pytest.raises(ValueError, match="reserved"):
        corpus_files("linuxdoc", root)


# ---------------------------------------------------------------- HTML


def test_html_to_text_keeps_the_text_and_drops_the_chrome():
    page = (
        "<html><head><title>Title</title><script>var x = 1;</script></head><body>"
        '<div class="navheader"><table><tr><td>Prev</td><td>Next</td></tr></table></div>'
        "<h1>Heading</h1><p>One   line\nof &amp; text &lt;b&gt;</p>"
        "<pre>  indented\n    code</pre><ul><li>first</li><li>second</li></ul>"
        "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"
        '<div class="navfooter"><div><div>Home</div></div></div>tail<br/>end</body></html>'
    )
    text = html_to_text(page)
    assert text == (
        "Heading\n\nOne line of & text <b>\n\n  indented\n    code\n\nfirst\nsecond\n\na b\nc d\n\ntail\nend\n"
    )
    assert html_to_text("<html><head><title>x</title></head><body></body></html>") == ""


def test_html_corpus_is_tokenised_from_the_extracted_text_and_cached_apart(docs, monkeypatch):
    tok = tiny_tokenizer()
    files = corpus_files("pgdocs")[:3]
    html = token_stream(tok, files, split="unit", text_format="html")
    nav_id = tok.convert_tokens_to_ids(NAV_WORD)
    assert nav_id not in html.tolist()
    expected = sum(len(html_to_text(p.read_text()).split()) for p in files) + len(files)
    assert html.numel() == expected
    cached = sorted((cache_root() / "tokens").glob("unit-*.arrow"))
    token_stream(tok, files, split="unit")  # plain text of the same files: another cache entry
    assert len(sorted((cache_root() / "tokens").glob("unit-*.arrow"))) == len(cached) + 1
    with pytest.raises(ValueError, match="text_format"):
        token_stream(tok, files, text_format="markdown")


# ---------------------------------------------------------------- options


def test_job_settings_and_cli_validate_the_mix(capsys):
    from elitekv_cli import main

    assert parse_corpora(JobSettings().resolved().train_corpora) == ("pydocs",)
    assert parse_corpora(JobSettings(train_corpora="pydocs,linuxdoc").train_corpora) == ("pydocs", "linuxdoc")
    with pytest.raises(SystemExit) as info:
        main(["run", "--train-corpora", "pydocs,wikipedia", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown training corpus 'wikipedia': choose from pydocs, linuxdoc, pgdocs" in err
    assert "manpages" not in err  # the unseen corpora are not training choices


# ---------------------------------------------------------------- the real packages (slow tier)

REAL = {
    # name: (files, train, eval) for Debian 12's packages (linux-doc-6.1 6.1.176-1, postgresql-doc-15 15.18)
    "linuxdoc": (3184, 3026, 158),
    "pgdocs": (1166, 1092, 74),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_corpus_split_is_pinned(name):
    corpus = CORPORA[name]
    if not corpus.root().is_dir():
        pytest.skip(f"{corpus.package} is not installed (apt-get install -y {corpus.package})")
    n_files, n_train, n_eval = REAL[name]
    splits = corpus_splits(name)
    assert (len(splits["train"]) + len(splits["eval"]), len(splits["train"]), len(splits["eval"])) == REAL[name]
    assert n_files == len(corpus_files(name)) and not splits["calib"]
    assert not set(splits["train"]) & set(splits["eval"])
    if name == "pgdocs":
        select = html_to_text((corpus.root() / "sql-select.html").read_text())
        assert select.startswith("SELECT\n\nSELECT, TABLE, WITH") and "navheader" not in select
        assert "    [ FROM from_item [, ...] ]\n" in select  # the synopsis keeps its layout


def test_run_job_uptrains_on_the_mix_and_reports_each_corpus(docs, monkeypatch, tmp_path, capsys):
    """``elitekv run --train-corpora pydocs,linuxdoc`` end to end, with the tiny model in place of SmolLM2."""
    import elitekv_demo.real_model
    from elitekv_demo.job import JobSettings, run_job

    from .tiny import tiny_model

    monkeypatch.setattr(elitekv_demo.real_model, "load_smollm2", lambda device="cpu": (tiny_model(), tiny_tokenizer()))
    settings = JobSettings(
        train_tokens=128,
        seq_len=32,
        batch_size=4,
        eval_windows=4,
        calib_samples=4,
        device="cpu",
        output_dir=str(tmp_path / "job"),
        progress=False,
        train_corpora=("pydocs", "linuxdoc"),
        loss="lm",
    )
    summary = run_job(settings)
    splits = {name: corpus_splits(name)["train"] for name in ("pydocs", "linuxdoc")}
    expected = {n: token_windows(tiny_tokenizer(), f, 32, cache=False).numel() for n, f in splits.items()}
    assert summary["train_split_tokens"] == expected
    assert summary["train_tokens"] == 128
    final = summary["rows"][-1]
    assert final["stage"] == "uptrained_lm" and set(final) >= {"ppl", "ppl_linuxdoc"} and "ppl_pydocs" not in final
    assert summary["eval_tokens"] == 4 * 32  # the Python docs' held-out windows
    # `eval --held-out` would split DATA by the user-data rule, not the embedded one: mostly training files
    from elitekv_peft.cli import main

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"paragraph {i} of some text" for i in range(40)))
    with pytest.raises(SystemExit) as info:
        main(["eval", settings.output_dir, "--data", str(text), "--held-out", "--device", "cpu", "--seq-len", "8"])
    assert info.value.code == 2 and "made by `elitekv run`" in capsys.readouterr().err


def test_run_job_reports_the_unseen_corpora_against_the_original(docs, monkeypatch, tmp_path, capsys):
    """``elitekv run`` measures the original and the final model on the unseen corpora (small synthetic ones here;
    one missing, which is skipped with its apt package named) and records them in summary.json and the card."""
    import gzip
    import json

    import elitekv_demo.real_model
    from elitekv_demo.job import JobSettings, run_job

    from .tiny import tiny_model

    man, info = tmp_path / "man" / "man1", tmp_path / "info"
    for folder in (man, info):
        folder.mkdir(parents=True)
    for i in range(6):
        body = " ".join(f"t{100 + (i * 3 + j) % 20}" for j in range(30))
        (man / f"tool{i}.1.gz").write_bytes(gzip.compress(f".TH TOOL{i} 1\n.SH NAME\n{body}\n".encode()))
        (info / f"manual{i}.info.gz").write_bytes(gzip.compress(f"File: manual{i}.info\n\n{body}\n".encode()))
    monkeypatch.setenv("ELITEKV_MANPAGES_DIR", str(tmp_path / "man"))
    monkeypatch.setenv("ELITEKV_GNUSTANDARDS_DIR", str(info))
    monkeypatch.setenv("ELITEKV_FORTUNES_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(elitekv_demo.real_model, "load_smollm2", lambda device="cpu": (tiny_model(), tiny_tokenizer()))
    settings = JobSettings(
        train_tokens=128, seq_len=16, batch_size=4, eval_windows=3, calib_samples=4, device="cpu",
        output_dir=str(tmp_path / "job"), progress=False, loss="lm",
    )  # fmt: skip
    summary = run_job(settings)
    printed = capsys.readouterr().out
    assert "fortunes" in printed and "apt-get install -y fortunes" in printed
    assert set(summary["unseen"]) == {"manpages", "gnustandards"}
    for name, row in summary["unseen"].items():
        assert row["tokens"] <= 3 * 16 and row["tokens"] > 0
        assert 0.0 <= row["top1_agreement"] <= 1.0
        assert row["ppl"] > 1.0 and row["original_ppl"] > 1.0 and row["ppl"] != row["original_ppl"]
        assert f"| {name} | {row['original_ppl']:.2f} |" in printed
    saved = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert saved["unseen"] == summary["unseen"]
    card = (tmp_path / "job" / "README.md").read_text()
    assert "top1_agreement_with_original" in card and "manpages" in card and "gnustandards" in card


def test_the_original_agrees_with_itself_on_the_unseen_corpora(docs):
    """The reference used by ``elitekv run``: the unchanged model scores 100% top-1 agreement and its own perplexity."""
    from elitekv_peft.evaluation import RetentionReference

    from .tiny import tiny_model

    model = tiny_model()
    windows = {"synthetic": torch.randint(4, 128, (3, 16), generator=torch.Generator().manual_seed(0))}
    reference = RetentionReference(model, windows, progress=False)
    ppl, agreement = reference.measure(model)
    assert agreement == {"synthetic": 1.0} and ppl["synthetic"] == pytest.approx(reference.ppl["synthetic"])
