"""Report the pydocs split sizes and SmolLM2-135M's perplexity on the eval split.

Usage::

    python scripts/eval_smollm2_pydocs.py [--windows 24] [--seq-len 512] [--device cpu] [--dtype float32]

Prints files, bytes and tokens per split, the timings of each step, and the perplexity on
``--windows`` evenly spaced eval windows of ``--seq-len`` tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from elitekv_demo.corpora import pydocs_files, split_files
from elitekv_demo.real_model import load_smollm2
from elitekv_demo.tokens import token_stream, windows_from_stream
from elitekv_peft.evaluation import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()

    report: dict[str, object] = {}
    t0 = time.perf_counter()
    model, tok = load_smollm2(dtype=getattr(torch, args.dtype), device=args.device)
    report["load_s"] = round(time.perf_counter() - t0, 2)
    report["attn_implementation"] = model.config._attn_implementation
    report["eos_token_id"] = tok.eos_token_id

    files = pydocs_files()
    splits = split_files(files)
    report["files"] = len(files)
    for name, fs in splits.items():
        t0 = time.perf_counter()
        stream = token_stream(tok, fs, split=name)
        report[name] = {
            "files": len(fs),
            "bytes": sum(p.stat().st_size for p in fs),
            "tokens": int(stream.numel()),
            "tokenize_s": round(time.perf_counter() - t0, 2),
        }
        if name == "eval":
            eval_stream = stream

    win = windows_from_stream(eval_stream, args.seq_len, args.windows)
    t0 = time.perf_counter()
    ppl = perplexity(model, win, batch_size=args.batch_size, device=args.device)
    report["eval_windows"] = list(win.shape)
    report["ppl"] = round(ppl, 4)
    report["ppl_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
