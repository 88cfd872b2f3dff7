"""Which rotary chunks RoPElite keeps in SmolLM2-135M: writes benchmarks/results/chunk_choices.{json,png}.

Usage (CPU is fine, a few minutes)::

    python benchmarks/chunk_choices.py --kv-ratio 0.25 --calib-samples 4 --calib-seq-len 512
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    args = parser.parse_args()

    from peft import get_peft_model

    from elitekv_demo.job import load_default_data
    from elitekv_demo.real_model import load_smollm2
    from elitekv_peft import EliteKVConfig
    from elitekv_peft.inspection import plot_chunk_choices

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_smollm2(device=device)
    data = load_default_data(tokenizer, args.calib_seq_len, 1, args.calib_samples)
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, EliteKVConfig(kv_ratio=args.kv_ratio, calibration_data=data["calib"]))
    seconds = time.time() - start
    config = peft_model.peft_config["default"]
    report = peft_model.base_model.conversion_report
    out = ROOT / "benchmarks" / "results"
    result = {
        "model": "SmolLM2-135M-Instruct",
        "kv_ratio": args.kv_ratio,
        "rope_chunks": config.rope_chunks,
        "latent_dim": config.latent_dim,
        "calibration_tokens": int(data["calib"].numel()),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (2 cores)",
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/chunk_choices.py " + " ".join(sys.argv[1:]),
        "convert_seconds": round(seconds, 1),
        "chunk_indices": config.chunk_indices,
        "selection_error_per_layer": [sum(errs) / len(errs) for errs in report.selection_errors],
        "lowrank_relative_error_per_layer": report.lowrank_errors,
    }
    (out / "chunk_choices.json").write_text(json.dumps(result, indent=1))
    plot_chunk_choices(
        config.chunk_indices,
        model.config.head_dim,
        out / "chunk_choices.png",
        title=f"SmolLM2-135M, kv_ratio={args.kv_ratio}: rotary chunks kept (r={config.rope_chunks} of 32 per head)",
    )
    print(json.dumps({k: v for k, v in result.items() if k != "chunk_indices"}, indent=1))


if __name__ == "__main__":
    main()
