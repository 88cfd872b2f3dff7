"""Do absorbed decode steps give the same greedy text as the reconstruct path? SmolLM2-135M, GPU.

Writes ``--out`` (JSON): per prompt, how many of the 64 generated tokens agree between
``set_attention_path(model, "reconstruct")`` and ``--path`` (default ``"auto"``: absorbed one-token decode steps,
which run the fused Triton kernels on CUDA when triton is installed: the single-pass kernel for the default J-LRD
latent, the two-phase one for S-LRD; ``"absorbed_reference"``: the PyTorch reference on the latent). The output
counts the attention calls each kernel served (``kernel_calls``).

    python benchmarks/greedy_match.py --out benchmarks/results/greedy_match.json
    python benchmarks/greedy_match.py --dtype float32 --out benchmarks/results/greedy_match_kernel_fp32.json

On a CPU, ``TRITON_INTERPRET=1 python benchmarks/greedy_match.py --path absorbed`` runs the kernels in triton's
interpreter (slow: use few ``--prompts``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def count_kernel_calls(kernels) -> dict[str, int]:
    """Count the attention calls the dispatch sends to the Triton kernel from now on (``two_phase``): a live dict."""
    calls = {"two_phase": 0}
    if not kernels.triton_available():
        return calls
    from elitekv_peft.kernels import fused

    def counted(name: str, kernel):
        def call(*args, **kwargs):
            calls[name] += 1
            return kernel(*args, **kwargs)

        return call

    fused.latent_attention_triton = counted("two_phase", fused.latent_attention_triton)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--selection", default=None, help="EliteKVConfig.selection (default: the config's)")
    parser.add_argument(
        "--decomposition", default="joint", choices=["joint", "separate"], help="latent layout: J-LRD or S-LRD"
    )
    parser.add_argument(
        "--path",
        default="auto",
        choices=["auto", "absorbed", "absorbed_reference"],
        help="attention path compared with reconstruct (elitekv_peft.set_attention_path)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "greedy_match.json"))
    args = parser.parse_args()

    from peft import get_peft_model

    from elitekv_demo.job import load_default_data
    from elitekv_demo.real_model import load_smollm2
    from elitekv_peft import EliteKVConfig, kernels, set_attention_path

    calls = count_kernel_calls(kernels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_smollm2(device=device)
    data = load_default_data(tokenizer, 512, 8, 16)
    selection = {"selection": args.selection} if args.selection else {}
    config = EliteKVConfig(
        kv_ratio=args.kv_ratio, calibration_data=data["calib"], decomposition=args.decomposition, **selection
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, config)
    model = model.to(getattr(torch, args.dtype)).eval()
    prompts = [window[:64].unsqueeze(0).to(device) for window in data["eval"][: args.prompts]]
    rows = []
    for prompt in prompts:
        outputs = {}
        for path in ("reconstruct", args.path):
            set_attention_path(model, path)
            out = model.generate(input_ids=prompt, max_new_tokens=args.new_tokens, do_sample=False)
            outputs[path] = out[0, prompt.shape[1] :].tolist()
        same = [a == b for a, b in zip(outputs["reconstruct"], outputs[args.path], strict=True)]
        first_diff = same.index(False) if False in same else None
        rows.append({"identical": all(same), "first_difference_at": first_diff, "agreeing_tokens": sum(same)})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/greedy_match.py " + " ".join(sys.argv[1:]),
        "dtype": args.dtype,
        "path": args.path,
        "kernel_calls": calls,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "kv_ratio": args.kv_ratio,
        "selection": args.selection or "default",
        "decomposition": args.decomposition,
        "new_tokens": args.new_tokens,
        "prompts_identical": sum(r["identical"] for r in rows),
        "prompts": len(rows),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
