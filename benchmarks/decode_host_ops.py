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
import datetime
import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHORT, LONG = 2, 12


def aten_calls(model: Any, prompt: torch.Tensor, new_tokens: int) -> Counter:
    """``aten`` operator calls of one greedy ``generate`` with exactly ``new_tokens`` new tokens, by name."""
    from torch.profiler import ProfilerActivity, profile

    kwargs = {"input_ids": prompt, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    calls: Counter = Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            calls[event.key] += event.count
    return calls


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
        extra = {name: calls[name] - base.get(name, 0) for name in set(calls) | set(base)}
        ranked = sorted(((n, e / layers) for n, e in extra.items() if e), key=lambda item: (-abs(item[1]), item[0]))
        top = ranked[: args.top]
        rows.append(
            {
                "model": f"elitekv {args.kv_ratio:g}",
                "path": path,
                "calls_per_step": sum(calls.values()),
                "extra_per_layer": (sum(calls.values()) - sum(base.values())) / layers,
                "top_extra_per_layer": [{"op": n, "calls": c} for n, c in top],
            }
        )
    report = {
        "model": f"tiny random Llama ({layers} layers)",
        "device": "cpu (operator counts; they do not depend on the device)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/decode_host_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_host_ops.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Host work of a plain `generate()` decode step",
        "",
        f"Model: {report['model']}. Device: {report['device']}. Date: {report['date']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"`aten` operator calls per decode step (greedy `generate`, batch 2, {LONG} against {SHORT} new tokens).",
        "",
        "| model | path | calls per step | extra calls per layer vs original | most added (calls per layer) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        top = ", ".join(f"`{t['op']}` {t['calls']:+g}" for t in row.get("top_extra_per_layer", []))
        lines.append(
            f"| {row['model']} | {row['path']} | {row['calls_per_step']:g} | {row['extra_per_layer']:+g} | {top} |"
        )
    (args.out / "decode_host_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
