"""Host work of one plain ``generate()`` decode step: PyTorch operator calls, original vs converted, per path.

Where a decode step is bound by the host (a small model in eager mode: ``generate_speed.md``), its time follows the
number of operator calls Python queues, not the bytes the cache holds. This script counts them with
``torch.profiler`` on the CPU (the counts do not depend on the device; the kernels' own launches are not ``aten``
calls and are not counted): ``aten`` calls of ``generate(max_new_tokens=12)`` minus those of
``generate(max_new_tokens=2)``, over the 10 extra steps, for the original model and the converted one on each
attention path. ``extra per layer`` is the difference to the original divided by the number of layers.

    python benchmarks/decode_host_ops.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from host_ops import aten_calls as count_calls  # noqa: E402
from host_ops import top_cell, top_extra, write_report  # noqa: E402

SHORT, LONG = 2, 12


def aten_calls(model: Any, prompt: torch.Tensor, new_tokens: int) -> Counter:
    """``aten`` operator calls of one greedy ``generate`` with exactly ``new_tokens`` new tokens, by name."""
    kwargs = {"input_ids": prompt, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        return count_calls(lambda: model.generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs))


def per_step(model: Any, prompt: torch.Tensor) -> Counter:
    """``aten`` calls per decode step (prefill and the first token cancel out)."""
    aten_calls(model, prompt, SHORT)  # warm-up
    short, long = aten_calls(model, prompt, SHORT), aten_calls(model, prompt, LONG)
    steps = LONG - SHORT
    return Counter({name: (long[name] - short[name]) / steps for name in long if long[name] != short[name]})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--paths", default="reconstruct,absorbed_reference")
    parser.add_argument("--top", type=int, default=12, help="operators listed per path")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from peft import get_peft_model

    from elitekv_demo.testing import tiny_model
    from elitekv_peft import EliteKVConfig, set_attention_path

    torch.manual_seed(0)
    original = tiny_model().eval()
    config = original.config
    calib = torch.randint(3, config.vocab_size, (4, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = get_peft_model(
            copy.deepcopy(original), EliteKVConfig(kv_ratio=args.kv_ratio, calibration_data=calib)
        ).eval()
    prompt = torch.randint(3, config.vocab_size, (2, 40))
    layers = config.num_hidden_layers
    base = per_step(original, prompt)
    rows = [{"model": "original", "path": "-", "calls_per_step": sum(base.values()), "extra_per_layer": 0.0}]
    for path in args.paths.split(","):
        set_attention_path(converted, path)
        calls = per_step(converted, prompt)
        rows.append(
            {
                "model": f"elitekv {args.kv_ratio:g}",
                "path": path,
                "calls_per_step": sum(calls.values()),
                "extra_per_layer": (sum(calls.values()) - sum(base.values())) / layers,
                "top_extra_per_layer": top_extra(calls, base, args.top, per=layers),
            }
        )
    table = [
        f"`aten` operator calls per decode step (greedy `generate`, batch 2, {LONG} against {SHORT} new tokens).",
        "",
        "| model | path | calls per step | extra calls per layer vs original | most added (calls per layer) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = f"{row['calls_per_step']:g} | {row['extra_per_layer']:+g} | {top_cell(row)}"
        table.append(f"| {row['model']} | {row['path']} | {cells} |")
    title = "Host work of a plain `generate()` decode step"
    return write_report(args.out, "decode_host_ops", title, f"tiny random Llama ({layers} layers)", argv, rows, table)


if __name__ == "__main__":
    main()
