"""Host work of one uptraining step: PyTorch operator calls of forward + backward, original vs converted, per layer.

A small model trained at a few thousand tokens a step can be bound by the host: the time goes to queuing operator
calls one Python call at a time, not to the GPU's arithmetic. This script counts the ``aten`` calls of one LM-loss
training step (forward and backward, no optimizer) with ``torch.profiler`` on the CPU (the counts do not depend on
the device or the sizes, only on the layers' structure) for tiny random Llamas of 1 and 3 layers, original and
converted, so that the per-layer count and the rest (embeddings, head, loss) come apart.
``benchmarks/uptrain_speed.py --variants ...+compile`` measures on a GPU what compiling them away buys.

    python benchmarks/uptrain_host_ops.py --out benchmarks/results
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

from host_ops import aten_calls, top_cell, top_extra, write_report  # noqa: E402


def step_calls(model: torch.nn.Module, input_ids: torch.Tensor) -> Counter:
    """``aten`` calls of one LM-loss forward + backward of ``model`` on ``input_ids``, by name (after a warm-up)."""
    model.train()

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()

    step()
    return aten_calls(step)


def per_layer(build: Any, input_ids: torch.Tensor) -> tuple[Counter, int]:
    """(calls per layer by name, calls outside the layers) from models of 1 and 3 layers built by ``build(n)``."""
    one, three = step_calls(build(1), input_ids), step_calls(build(3), input_ids)
    layer = Counter({name: (three[name] - one[name]) / 2 for name in three if three[name] != one[name]})
    return layer, int(sum(one.values()) - sum(layer.values()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from peft import get_peft_model

    from elitekv_demo.testing import tiny_model
    from elitekv_peft import EliteKVConfig

    input_ids = torch.randint(3, 100, (2, 64))
    calib = torch.randint(3, 100, (4, 64))

    def original(layers: int) -> torch.nn.Module:
        return tiny_model(num_hidden_layers=layers)

    def converted(layers: int) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = EliteKVConfig(kv_ratio=args.kv_ratio, calibration_data=calib)
            return get_peft_model(copy.deepcopy(original(layers)), config)

    base_layer, base_rest = per_layer(original, input_ids)
    conv_layer, conv_rest = per_layer(converted, input_ids)
    rows = [
        {"model": "original", "calls_per_layer": sum(base_layer.values()), "calls_outside_layers": base_rest},
        {
            "model": f"elitekv {args.kv_ratio:g}",
            "calls_per_layer": sum(conv_layer.values()),
            "calls_outside_layers": conv_rest,
            "top_extra_per_layer": top_extra(conv_layer, base_layer, args.top),
        },
    ]
    ratio = rows[1]["calls_per_layer"] / rows[0]["calls_per_layer"]
    table = [
        "`aten` operator calls of one LM-loss training step (forward and backward, batch 2 x 64 tokens), per decoder",
        f"layer and outside the layers. A converted layer queues {ratio:.2f}x the original's calls.",
        "",
        "| model | calls per layer | calls outside the layers | most added (calls per layer) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        cells = f"{row['calls_per_layer']:g} | {row['calls_outside_layers']:g} | {top_cell(row)}"
        table.append(f"| {row['model']} | {cells} |")
    title = "Host work of an uptraining step"
    return write_report(args.out, "uptrain_host_ops", title, "tiny random Llama (1 and 3 layers)", argv, rows, table)


if __name__ == "__main__":
    main()
