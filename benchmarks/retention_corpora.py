"""The manifest of the retention benchmark's evaluation sets: ``benchmarks/results/retention_corpora.{json,md}``.

For ``indomain`` (the Python docs' held-out files) and each unseen corpus: the Debian package and its installed
version, the files (keys relative to the corpus root), bytes, SmolLM2 tokens, the windows the benchmark takes, and
an overlap check against every training text of the library (the train splits of pydocs, linuxdoc and pgdocs): the
share of the set's 13-token n-grams that occur anywhere in the training text (13-grams as in GPT-3's contamination
check; boilerplate such as licence text shows up here).

    python benchmarks/retention.py manifest [--out benchmarks/results]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
NGRAM = 13
SEQ_LEN = 512


def ngram_hashes(stream: torch.Tensor, n: int = NGRAM) -> np.ndarray:
    """uint64 rolling hashes of every ``n``-token window of a token stream ``[T]`` -> ``[T - n + 1]`` (wrapping
    polynomial hash; collisions are negligible at these sizes)."""
    tokens = stream.numpy().astype(np.uint64)
    if tokens.size < n:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(tokens.size - n + 1, dtype=np.uint64)
    base = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * base + tokens[j : tokens.size - n + 1 + j] + np.uint64(1)
    return h


def overlap_share(stream: torch.Tensor, training: np.ndarray) -> float:
    """Share of the stream's n-grams found in ``training`` (sorted unique hashes)."""
    grams = ngram_hashes(stream)
    return float(np.isin(grams, training, assume_unique=False).mean()) if grams.size else 0.0


def package_version(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def write_manifest(out_dir: Path, eval_windows: int = 200) -> dict[str, Any]:
    """Build the manifest on this machine (every corpus installed) and write it as JSON and Markdown."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from corpus_tokens import smollm2_tokenizer

    from elitekv_demo.corpora import CORPORA, UNSEEN_CORPORA, corpus_splits, get_corpus
    from elitekv_demo.tokens import token_stream

    tokenizer = smollm2_tokenizer()
    training = []
    for name, corpus in CORPORA.items():
        split = "train" if name == "pydocs" else f"{name}-train"  # the cache names of data.corpus_windows
        stream = token_stream(tokenizer, corpus_splits(name)["train"], split=split, text_format=corpus.text_format)
        training.append(np.unique(ngram_hashes(stream)))
    train_grams = np.unique(np.concatenate(training))
    sets = [("indomain", "pydocs")] + [(name, name) for name in UNSEEN_CORPORA]
    entries = []
    for label, name in sets:
        corpus = get_corpus(name)
        root = corpus.root().resolve()
        files = corpus_splits(name)["eval"]
        split = "eval" if name == "pydocs" else f"{name}-eval"
        stream = token_stream(tokenizer, files, split=split, text_format=corpus.text_format)
        entries.append(
            {
                "name": label,
                "corpus": name,
                "package": corpus.package,
                "version": package_version(corpus.package),
                "root": str(corpus.default_root),
                "text_format": corpus.text_format,
                "split": "held-out files (10% by hash)" if name == "pydocs" else "all files of the package",
                "n_files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
                "tokens": int(stream.numel()),
                "windows": min(eval_windows, int(stream.numel()) // SEQ_LEN),
                "ngram_overlap_with_training": round(overlap_share(stream, train_grams), 5),
                "files": [p.relative_to(root).as_posix() for p in files],
            }
        )
    manifest = {
        "tokenizer": "SmolLM2-135M",
        "seq_len": SEQ_LEN,
        "eval_windows": eval_windows,
        "ngram": NGRAM,
        "training_text": {name: c.package for name, c in CORPORA.items()},
        "sets": entries,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retention_corpora.json").write_text(json.dumps(manifest, indent=1) + "\n")
    lines = [
        "# Retention evaluation sets",
        "",
        f"Windows of {SEQ_LEN} SmolLM2 tokens, at most {eval_windows} per set, evenly spaced over the set's token "
        "stream (files in key order, EOS between files). The unseen corpora are evaluation-only: "
        "`elitekv_demo.corpora.parse_corpora` refuses them in a training mix, and no calibration set reads them.",
        "",
        f"Overlap: the share of a set's {NGRAM}-token n-grams that occur anywhere in the training text "
        f"({', '.join(f'{c.package}' for c in CORPORA.values())}, train splits).",
        "",
        "Command: `python benchmarks/retention.py manifest`. File lists: `retention_corpora.json`.",
        "",
        "| set | package | version | format | files | MB on disk | tokens | windows | 13-gram overlap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['name']} | {e['package']} | {e['version']} | {e['text_format']} | {e['n_files']} | "
            f"{e['bytes'] / 1e6:.2f} | {e['tokens']:,} | {e['windows']} | {e['ngram_overlap_with_training']:.2%} |"
        )
    (out_dir / "retention_corpora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return manifest
