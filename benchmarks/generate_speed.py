"""What a user sees with plain ``model.generate()``: decode tokens/s and peak memory, converted vs original.

The real SmolLM2-135M is converted training-free (EliteKV, ``--kv-ratio``, calibration on random token ids: speed does
not depend on the weights' quality), saved with ``save_pretrained`` and loaded back with
``AutoModelForCausalLM.from_pretrained``, as a user serves it. Both models then run plain ``generate()`` (greedy,
default cache: the latent cache for the converted one) on random prompts for every context x batch. Per row:

* decode tokens/s: ``batch * (N - 1) / (t(N) - t(1))``, where ``t(n)`` is the wall time of ``generate`` with exactly
  ``n`` new tokens (prompt = context - N tokens), so the prefill cancels out;
* peak memory of the N-token call (``torch.cuda.max_memory_allocated``);
* both as ratios against the original measured in the same process (timings only as ratios).

The converted model runs once per ``--paths`` entry (``auto``: what ``generate()`` does with no switch set, the fused
kernel on CUDA; ``reconstruct``: keys and values rebuilt from the latent every step). ``--cache static`` gives both
models a pre-allocated cache of the context's length instead (``cache_implementation="static"``: transformers'
``StaticCache``, which the converted model turns into its latent ``EliteKVStaticCache`` layers), with which
transformers compiles the decode step on CUDA: each new shape compiles first (the warm-up call), so keep to few
contexts and batches per call.

    python benchmarks/generate_speed.py --out benchmarks/results                     # on a GPU, SmolLM2 staged
    python benchmarks/generate_speed.py --tiny --device cpu --contexts 64 --batches 1,2 --new-tokens 6 --out /tmp/g
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
CACHES = {
    "dynamic": "the default cache",
    "static": 'a pre-allocated cache (`cache_implementation="static"`; latent static layers in the converted model)',
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_arguments(kind: str, max_cache_len: int) -> dict[str, Any]:
    """``generate`` keyword arguments for the cache ``kind``: none (``dynamic``: the default cache) or a
    pre-allocated one of ``max_cache_len`` tokens (``static``; the same length in every call, so that the compiled
    step is reused). The same arguments for both models: the converted one turns transformers' static cache into its
    latent one by itself."""
    if kind == "dynamic":
        return {}
    return {"cache_implementation": "static", "max_cache_len": max_cache_len}


def timed_generate(
    model: Any, prompt: torch.Tensor, new_tokens: int, cache: str = "dynamic", max_cache_len: int | None = None
) -> tuple[float, float | None]:
    """Seconds for one ``generate`` call with exactly ``new_tokens`` new tokens, and its peak memory in GiB (CUDA)."""
    device = str(prompt.device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **cache_arguments(cache, max_cache_len or prompt.shape[1] + new_tokens),
        )
    synchronize(device)
    seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, asked for {new_tokens}")
    return seconds, (torch.cuda.max_memory_allocated() / GiB if cuda else None)


def measure(model: Any, context: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Decode tokens/s and peak memory of plain ``generate`` at one context x batch (median of ``--repeats``)."""
    generator = torch.Generator().manual_seed(context * 1000 + batch)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (batch, context - args.new_tokens), generator=generator).to(args.device)
    try:
        # warm-up: kernels compiled and autotuned, allocator filled
        timed_generate(model, prompt, 2, args.cache, context)
        firsts, fulls, peak = [], [], None
        for _ in range(args.repeats):
            firsts.append(timed_generate(model, prompt, 1, args.cache, context)[0])
            seconds, peak = timed_generate(model, prompt, args.new_tokens, args.cache, context)
            fulls.append(seconds)
    except torch.OutOfMemoryError:
        return {"context": context, "batch": batch, "error": "out of memory"}
    decode = statistics.median(fulls) - statistics.median(firsts)  # the decode steps: whole call less prefill
    if decode <= 0:  # a noisy host (CPU runs): no number rather than a wrong one
        error = "timing noise exceeds the decode time: raise --new-tokens or --repeats"
        return {"context": context, "batch": batch, "error": error}
    return {
        "context": context,
        "batch": batch,
        "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode,
        "ms_per_step": 1000 * decode / (args.new_tokens - 1),
        "peak_gib": peak,
    }


def load_models(args: argparse.Namespace, folder: Path) -> tuple[Any, Any, str]:
    """The original model and its converted copy, saved to ``folder`` and loaded back with AutoModelForCausalLM."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import elitekv_peft  # noqa: F401  (registers the EliteKV model classes with the Auto classes)
    from elitekv_peft import EliteKVConfig

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from elitekv_demo.testing import tiny_model

        base, name = tiny_model(), "tiny random Llama"
    else:
        from elitekv_demo.real_model import load_smollm2

        base, name = load_smollm2(device=args.device)[0], "SmolLM2-135M-Instruct"
    base = base.to(args.device).eval()
    original = copy.deepcopy(base)  # the conversion replaces the attention of `base` in place
    calib = torch.randint(3, base.config.vocab_size, (16, min(512, base.config.max_position_embeddings)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = get_peft_model(base, EliteKVConfig(kv_ratio=args.kv_ratio, calibration_data=calib))
        converted.save_pretrained(folder)
    del converted, base
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    return original.to(dtype=dtype), reloaded, name


def rows_for(label: str, model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            row = {"model": label, **measure(model, context, batch, args)}
            print(f"[generate] {json.dumps(row)}", flush=True)
            rows.append(row)
    return rows


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each converted row's tokens/s and peak memory against the original's at the same context x batch."""
    original = {(r["context"], r["batch"]): r for r in rows if r["model"] == "original"}
    for row in rows:
        base = original.get((row["context"], row["batch"]))
        if row["model"] == "original" or base is None or "error" in row or "error" in base:
            continue
        row["speed_vs_original"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        if row["peak_gib"] is not None:
            row["peak_vs_original"] = row["peak_gib"] / base["peak_gib"]
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Plain `generate()`: converted model vs the original",
        "",
        f"Model: {report['model']}, EliteKV {report['kv_ratio']:g} (training-free conversion, saved and loaded back "
        f"with `AutoModelForCausalLM`), {report['dtype']}. Device: {report['device']}. Date: {report['date']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Greedy `generate()` with {CACHES[report.get('cache', 'dynamic')]}, random prompts of context - "
        f"{report['new_tokens']} tokens; "
        "decode tokens/s from the difference between generating N and 1 tokens (prefill excluded); peak memory of "
        "the N-token call. Ratios against the original in the same process.",
        "",
        "| model | context | batch | decode tokens/s | ms/step | x original | peak GiB | peak vs original |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['context']} | {row['batch']} | {row['error']} | | | | |")
            continue
        speed = f"{row['speed_vs_original']:.2f}x" if "speed_vs_original" in row else "1.00x"
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        peak_ratio = f"{row['peak_vs_original']:.2f}x" if "peak_vs_original" in row else "-"
        lines.append(
            f"| {row['model']} | {row['context']} | {row['batch']} | {row['decode_tokens_per_s']:.1f} | "
            f"{row['ms_per_step']:.2f} | {speed} | {peak} | {peak_ratio} |"
        )
    return "\n".join(lines) + "\n"


def integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--contexts", type=integers, default=[2048, 8192], help="prompt + new tokens")
    parser.add_argument("--batches", type=integers, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", default="auto,reconstruct", help="attention paths of the converted model")
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="see the module docstring")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke runs)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is t(N) - t(1))")

    from elitekv_peft import set_attention_path

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        original, converted, name = load_models(args, Path(folder))
        converted_class = type(converted).__name__
        rows = rows_for("original", original, args)
        del original
        for path in args.paths.split(","):
            set_attention_path(converted, path)
            rows += rows_for(f"elitekv {args.kv_ratio:g} ({path})", converted, args)
    cuda = args.device.startswith("cuda")
    report = {
        "model": name,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/generate_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "kv_ratio": args.kv_ratio,
        "converted_class": converted_class,
        "dtype": args.dtype,
        "cache": args.cache,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": with_ratios(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "generate_speed" if args.cache == "dynamic" else f"generate_speed_{args.cache}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
