"""Peak memory of converting a 7B-shaped model layer by layer (issue 6).

Builds a random Llama-2-7B-shaped model in bfloat16 *on the CPU* (``--layers`` fewer than 32 for smoke checks),
converts it with ``EliteKVConfig(calibration_device=<device>)`` (layer-by-layer calibration: one decoder layer on
the GPU at a time) and reports the peak GPU memory (``torch.cuda.max_memory_allocated``) and the peak CPU memory of
the process (``ru_maxrss``), to ``benchmarks/results/conversion_memory.{json,md}``.

    python benchmarks/conversion_memory.py                                     # GPU: full 32 layers
    python benchmarks/conversion_memory.py --device cpu --layers 1 --samples 2 --seq-len 64   # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from elitekv_peft import EliteKVConfig

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    ),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}


def build(shape: str, layers: int) -> LlamaForCausalLM:
    """A random model of ``shape`` with ``layers`` layers, bfloat16, on the CPU (initialised cheaply)."""
    config = LlamaConfig(
        **SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # real inv_freq (meta init above)
    return model.eval()


def peak_cpu_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    started = time.time()
    model = build(args.shape, args.layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cpu_after_build = peak_cpu_bytes()
    tokens = torch.randint(
        3, model.config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    config = EliteKVConfig(
        kv_ratio=args.kv_ratio,
        calibration_data=tokens,
        calibration_device=args.device,
        calibration_layerwise=True,
        calibration_batch_size=args.batch_size,
    )
    convert_started = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = get_peft_model(model, config)
    seconds = time.time() - convert_started
    result = {
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "shape": args.shape,
        "layers": args.layers,
        "dtype": "bfloat16",
        "kv_ratio": args.kv_ratio,
        "calibration_tokens": args.samples * args.seq_len,
        "model_bytes": model_bytes,
        "one_layer_bytes": sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "peak_cpu_bytes": peak_cpu_bytes(),
        "cpu_bytes_after_build": cpu_after_build,
        "convert_seconds": round(seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "converted_layers": len(converted.peft_config["default"].chunk_indices),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conversion_memory.json").write_text(json.dumps(result, indent=2))
    gib = 1024**3
    peak_gpu = "-" if result["peak_gpu_bytes"] is None else f"{result['peak_gpu_bytes'] / gib:.2f}"
    lines = [
        f"# Layer-by-layer conversion memory ({result['date']}, {result['device']})",
        "",
        f"Random {args.shape}-shaped Llama, {args.layers} layers, bfloat16, kept on the CPU; EliteKV kv_ratio "
        f"{args.kv_ratio}, {result['calibration_tokens']:,} calibration tokens, calibration and SVD on "
        f"`{args.device}` one layer at a time.",
        "",
        f"Command: `{result['command']}`.",
        "",
        "| model (GiB) | one layer (GiB) | peak GPU (GiB) | peak CPU RSS (GiB) | conversion (s) |",
        "|---|---|---|---|---|",
        f"| {model_bytes / gib:.2f} | {result['one_layer_bytes'] / gib:.3f} | {peak_gpu} | "
        f"{result['peak_cpu_bytes'] / gib:.2f} | {result['convert_seconds']} |",
        "",
    ]
    (out / "conversion_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
