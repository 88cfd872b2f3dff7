"""Report files, bytes and SmolLM2 tokens per corpus and split (fills the token cache as a side effect).

    python scripts/corpus_tokens.py [--corpora pydocs,linuxdoc,pgdocs] [--json out.json] [--md out.md]

The committed ``benchmarks/results/corpora.{json,md}`` come from
``python scripts/corpus_tokens.py --json benchmarks/results/corpora.json --md benchmarks/results/corpora.md``.

A corpus that is not installed is reported as missing (with the install command) rather than failing.
Tokens include one EOS per file (the separator of :func:`elitekv_demo.tokens.token_stream`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elitekv_demo.corpora import CORPORA, corpus_splits, get_corpus, parse_corpora  # noqa: E402
from elitekv_demo.tokens import token_stream  # noqa: E402


def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the dequantised cache (built from the GGUF on first use)."""
    from transformers import AutoTokenizer

    from elitekv_demo.real_model import build_smollm2_cache, smollm2_cache_dir

    folder = smollm2_cache_dir()
    if not (folder / "tokenizer.json").is_file():
        build_smollm2_cache(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def package_version(package: str) -> str:
    """The installed Debian version of ``package`` (``"?"`` without dpkg or when not installed)."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except OSError:
        return "?"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    ap.add_argument("--md", default=None, help="also write the table as Markdown")
    args = ap.parse_args()
    tokenizer = smollm2_tokenizer()
    rows = []
    lines = ["| corpus | package | split | files | MB | tokens |", "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for name in parse_corpora(args.corpora):
        corpus = get_corpus(name)
        try:
            splits = corpus_splits(name)
        except FileNotFoundError as error:
            lines.append(f"| {name} | {corpus.package} | missing: {error} | | | |")
            print(lines[-1])
            continue
        for split, files in splits.items():
            if not files:
                continue
            start = time.time()
            cache_name = split if name == "pydocs" else f"{name}-{split}"
            tokens = token_stream(tokenizer, files, split=cache_name, text_format=corpus.text_format).numel()
            size = sum(p.stat().st_size for p in files)
            row = {"corpus": name, "package": corpus.package, "version": package_version(corpus.package)}
            row.update(split=split, files=len(files))
            row.update(bytes=size, tokens=tokens, seconds=round(time.time() - start, 1))
            rows.append(row)
            lines.append(f"| {name} | {corpus.package} | {split} | {len(files)} | {size / 1e6:.1f} | {tokens:,} |")
            print(lines[-1], flush=True)
    train = sum(r["tokens"] for r in rows if r["split"] == "train")
    lines += ["", f"All train splits together: {train:,} tokens."]
    print(lines[-1])
    if args.json:
        Path(args.json).write_text(json.dumps({"tokenizer": "SmolLM2-135M", "rows": rows}, indent=1) + "\n")
    if args.md:
        head = [
            "# Text corpora: files, bytes and SmolLM2-135M tokens per split",
            "",
            "Tokens of each split's stream: every file's tokens plus one EOS per file (before cutting into windows).",
            "Packages (Debian 12): " + ", ".join(sorted({f"{r['package']} {r['version']}" for r in rows})) + ".",
            '"calib" is a subset of "train". Evaluation and calibration always use the pydocs splits.',
            "",
            f"Command: `python scripts/corpus_tokens.py --json {args.json} --md {args.md}`",
            "",
        ]
        Path(args.md).write_text("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
