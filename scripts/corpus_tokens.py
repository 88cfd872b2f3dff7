"""Report files, bytes and SmolLM2 tokens per corpus and split (fills the token cache as a side effect).

    python scripts/corpus_tokens.py [--corpora pydocs,linuxdoc,pgdocs] [--json out.json]

A corpus that is not installed is reported as missing (with the install command) rather than failing.
Tokens include one EOS per file (the separator of :func:`elitekv_peft.data.token_stream`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elitekv_peft.data import CORPORA, corpus_splits, get_corpus, parse_corpora, token_stream  # noqa: E402


def smollm2_tokenizer():
    """The SmolLM2 tokenizer from the dequantised cache (built from the GGUF on first use)."""
    from transformers import AutoTokenizer

    from elitekv_peft.real_model import build_smollm2_cache, smollm2_cache_dir

    folder = smollm2_cache_dir()
    if not (folder / "tokenizer.json").is_file():
        build_smollm2_cache(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--json", default=None, help="also write the table as JSON")
    args = ap.parse_args()
    tokenizer = smollm2_tokenizer()
    rows = []
    print("| corpus | package | split | files | MB | tokens |\n|---|---|---|---|---|---|")
    for name in parse_corpora(args.corpora):
        corpus = get_corpus(name)
        try:
            splits = corpus_splits(name)
        except FileNotFoundError as error:
            print(f"| {name} | {corpus.package} | missing: {error} | | | |")
            continue
        for split, files in splits.items():
            if not files:
                continue
            start = time.time()
            cache_name = split if name == "pydocs" else f"{name}-{split}"
            tokens = token_stream(tokenizer, files, split=cache_name, text_format=corpus.text_format).numel()
            size = sum(p.stat().st_size for p in files)
            row = {"corpus": name, "package": corpus.package, "split": split, "files": len(files)}
            row.update(bytes=size, tokens=tokens, seconds=round(time.time() - start, 1))
            rows.append(row)
            print(f"| {name} | {corpus.package} | {split} | {len(files)} | {size / 1e6:.1f} | {tokens:,} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
