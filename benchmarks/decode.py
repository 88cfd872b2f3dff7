"""Decode speed and capacity: transformers' caches vs EliteKV (reconstruct / absorbed + Triton kernel), on a GPU.

Random weights (speed does not depend on their values; said in the output): a Llama-2-7B-shaped model and a
SmolLM2-135M-shaped one, bf16. For each context, batch and method the cache is filled directly with random tensors of
the right shapes (no prefill), then one-token decode steps are timed with CUDA events (median; each step appends one
token, as in `generate`). Methods:

* ``baseline_dynamic``: transformers, `DynamicCache` + SDPA, eager (what `generate` does by default);
* ``baseline_static``: transformers, `StaticCache` + SDPA, the step captured in a CUDA graph and replayed (the launch
  overhead removal that ``torch.compile(mode="reduce-overhead")`` brings, without Inductor's fusions);
* ``baseline_compiled`` (``--baselines``): `StaticCache` + ``torch.compile(model.forward)`` as transformers'
  `CompileConfig` does by default for static-cache decoding (Inductor, ``mode="reduce-overhead"``, i.e. with CUDA
  graphs; ``--compile-mode``/``--compile-backend`` change it); one compile per row, bounded by ``--compile-budget``
  seconds (past it the row is recorded with ``error: "not timed: ..."`` and the run goes on);
* ``elitekv`` / ``reconstruct``: the EliteKV model rebuilding K and V from the latent cache (`EliteKVCache`), eager;
* ``elitekv`` / ``absorbed_kernel``: weight absorption + the fused Triton kernel over `EliteKVStaticCache`, the step
  captured in a CUDA graph; ``--tune`` tries block configurations of the kernel (`elitekv_peft.kernels`) and keeps
  the fastest (the single-pass variant's rows stay in benchmarks/results/; the variant was dropped);
* ``elitekv`` / ``absorbed_compiled`` (``--paths``): the same step under the same ``torch.compile`` as
  ``baseline_compiled``;
* ``baseline_compiled_graph`` / ``absorbed_compiled_graph``: Inductor without its CUDA graphs (``mode="default"``,
  the same fusions), the compiled step then captured in a CUDA graph by hand, as ``baseline_static`` is: a replay
  skips the host work of ``reduce-overhead`` (Dynamo's guards, the CUDA-graph tree's checks), which each step pays
  when the GPU waits for every token. Both sides get the same treatment; the targets use the faster row of each.

Also measured: device-to-device copy bandwidth, the largest batch that fits at the longest context (trying batches,
catching out-of-memory), and the kernel's bandwidth on the cache bytes it reads (rotated chunks + latents, each once).
``--check`` first compares the kernel with the PyTorch reference on the GPU (bf16 and float32).

This file holds the options, their checks and the run loop; ``decode_steps.py`` the shapes, models, caches and
timed steps, ``decode_measure.py`` one row per method/path, the kernel's bandwidth, tuning and GPU check, and
``decode_report.py`` the ``report`` subcommand (merge, decode.md, plot).

Usage::

    python benchmarks/decode.py --check --tune --shapes llama2-7b-shape --out decode_7b.json
    python benchmarks/decode.py --shapes smollm2-135m-shape --out decode_smollm2.json
    python benchmarks/decode.py report decode_7b.json decode_smollm2.json --out benchmarks/results/decode.json

``benchmarks/decode_gpu_job.sh`` holds the commands of the next GPU run. A CPU smoke run of the code paths (tiny
shape, float32, no CUDA graphs, no memory search; ``TRITON_INTERPRET=1`` runs the kernel in triton's interpreter)::

    python benchmarks/decode.py --device cpu --shapes tiny-shape --contexts 64 --batches 2 --ratios 0.25 \
        --baselines baseline_dynamic,baseline_static,baseline_compiled \
        --paths reconstruct,absorbed_kernel,absorbed_compiled --compile-backend aot_eager --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode_steps  # noqa: E402
from decode_measure import (  # noqa: E402
    GPU_CHECK_CASES,  # noqa: F401 - read by tests/kernel_resources.py
    gpu_check,
    kernel_variant,
    largest_batch,
    measure,
    tune_kernel,
)
from decode_report import (  # noqa: E402
    merge,  # noqa: F401 - tests/test_benchmark_reports.py
    report_main,
    same_run_ratios,  # noqa: F401 - tests/test_benchmark_reports.py
    write_report,  # noqa: F401 - tests/test_benchmark_reports.py
)
from decode_steps import (  # noqa: E402 - SHAPES is also read by benchmarks/decode_kernel.py
    ABSORBED_PATHS,
    COMPILED_BASELINES,
    SHAPES,
    build_base,
    build_elitekv,
    copy_bandwidth,
    free,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Decode speed of transformers' caches vs EliteKV (see the module docstring); "
        "`python benchmarks/decode.py report RUN.json ... --out decode.json` merges runs into decode.md."
    )
    parser.add_argument("--shapes", default="llama2-7b-shape,smollm2-135m-shape", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--contexts", default="32768,8192,2048", help="the first is where the largest batch is found")
    parser.add_argument("--batches", default="1,4", help="plus, at the first context, the largest DynamicCache batch")
    parser.add_argument("--ratios", default="0.25,0.5,0.125")
    parser.add_argument(
        "--decomposition",
        choices=["joint", "separate"],
        default="joint",
        help="EliteKV rows' latent: joint (J-LRD, the default) or separate (S-LRD: keys and values in halves of "
        "it, so the two-phase kernel reads each cache byte once)",
    )
    parser.add_argument(
        "--baselines",
        default="baseline_dynamic,baseline_static",
        help="transformers rows ('' for none): baseline_dynamic (DynamicCache, eager), baseline_static (StaticCache, "
        "CUDA graph), baseline_compiled (StaticCache + torch.compile(model.forward), see --compile-*), "
        "baseline_compiled_graph (the same compile in Inductor's default mode, its step captured in a CUDA graph)",
    )
    parser.add_argument(
        "--paths",
        default="reconstruct,absorbed_kernel",
        help="EliteKV rows ('' for none): reconstruct (EliteKVCache, eager), absorbed_kernel (EliteKVStaticCache + "
        "kernel, CUDA graph), absorbed_compiled (EliteKVStaticCache + torch.compile of the step, see --compile-*), "
        "absorbed_compiled_graph (that compile in Inductor's default mode, its step captured in a CUDA graph)",
    )
    parser.add_argument("--steps", type=int, default=4, help="timed eager steps (median)")
    parser.add_argument("--graph-steps", type=int, default=12, help="timed CUDA-graph / compiled steps (median)")
    parser.add_argument("--check", action="store_true", help="compare the kernels with the reference on the GPU first")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="rows record where a step's GPU time goes (step_profile) and, compiled rows, the host's (host_profile)",
    )
    parser.add_argument("--tune", action="store_true", help="try the kernel's block configurations first")
    parser.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        help="torch.compile mode of compiled rows (Inductor; default as transformers' CompileConfig)",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU smoke run)"
    )
    parser.add_argument(
        "--compile-budget",
        type=float,
        default=300,
        help="seconds for compiling + warming up one compiled row; past it the row is recorded as not timed "
        "(its error says so) and the run goes on (0: no limit)",
    )
    parser.add_argument(
        "--search",
        choices=("all", "elitekv", "none"),
        default="all",
        help="largest-batch searches at the first context: all; elitekv (skip the baselines': the largest batch in "
        "--batches stands for the DynamicCache's, e.g. 3 for the 7B shape at 32k on an H100 80GB); none",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke run of the code paths")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    parser.add_argument("--log", default=None, help="also append every row to this JSON-lines file")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds; stop starting new rows after this")
    args = parser.parse_args()
    for name, given, known in (
        ("--shapes", args.shapes, SHAPES),
        ("--baselines", args.baselines, ("baseline_dynamic", "baseline_static", *COMPILED_BASELINES)),
        ("--paths", args.paths, ("reconstruct", *ABSORBED_PATHS)),
    ):
        unknown = [item for item in given.split(",") if item and item not in known]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {', '.join(known)}")
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cpu":  # a smoke run: float32, no graphs, no memory search, the PyTorch attention
        decode_steps.DEVICE, decode_steps.DTYPE = "cpu", torch.float32
    torch.manual_seed(0)
    started = time.time()
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    baselines = [m for m in args.baselines.split(",") if m]  # "" runs none
    paths = [p for p in args.paths.split(",") if p]
    result = {
        "device": torch.cuda.get_device_name() if decode_steps.DEVICE == "cuda" else "cpu (smoke run)",
        "date": dt.date.today().isoformat(),
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
        "notes": f"random weights (speed only); {str(decode_steps.DTYPE).removeprefix('torch.')}; "
        "caches filled directly with random tensors; median of steps; "
        "baseline_static = StaticCache + SDPA replayed as a CUDA graph (no torch.compile); baseline_compiled = "
        f"StaticCache + torch.compile(model.forward, backend={args.compile_backend}, mode={args.compile_mode}); "
        "absorbed_kernel = EliteKVStaticCache + fused Triton kernel replayed as a CUDA graph; absorbed_compiled = "
        "EliteKVStaticCache + the same torch.compile of the step; *_compiled_graph = the same compile in Inductor's "
        "default mode (no CUDA graphs of its own), the step captured in a CUDA graph by hand; "
        "reconstruct = EliteKVCache, eager; "
        "kernel_bandwidth_gbps = cache bytes of one layer (rotated chunks + latent, each once) / time of the kernel's "
        "launches for that layer (the two-phase variant moves more bytes than that: scores, and the latent twice)",
        "torch": torch.__version__,
        "kernel_variant": kernel_variant(),
        "copy_bandwidth_gbps": copy_bandwidth(),
        "rows": [],
    }

    def log(entry: dict) -> None:
        entry = {**entry, "elapsed_s": round(time.time() - started, 1)}  # where a run's time went
        print(json.dumps(entry), flush=True)
        if args.log:
            with open(args.log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def save() -> None:
        result["seconds"] = round(time.time() - started, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    def add(row: dict) -> None:
        result["rows"].append(row)
        log(row)
        save()

    def out_of_time() -> bool:
        if args.time_limit and time.time() - started > args.time_limit:
            result["stopped_early"] = f"time limit of {args.time_limit} s reached; later rows not run"
            return True
        return False

    def search(model, method: str, path: str | None, context: int) -> int | None:
        """Largest batch at ``context`` (None when --search skips it, and on CPU)."""
        wanted = args.search == "all" or (args.search == "elitekv" and method == "elitekv")
        return largest_batch(model, method, path, context) if wanted and decode_steps.DEVICE == "cuda" else None

    log({"copy_bandwidth_gbps": result["copy_bandwidth_gbps"]})
    if args.check and decode_steps.DEVICE == "cuda":
        try:
            result["gpu_check_relative_errors"] = gpu_check()
        except Exception as error:  # noqa: BLE001 - recorded; the benchmark goes on
            result["gpu_check_relative_errors"] = f"{type(error).__name__}: {str(error)[:2000]}"
        log({"gpu_check": result["gpu_check_relative_errors"]})
        save()
    longest = contexts[0]
    for shape in args.shapes.split(","):
        largest = {"baseline_dynamic": None}
        model = build_base(shape) if baselines or args.search == "all" else None
        for method in ("baseline_dynamic", *[m for m in baselines if m == "baseline_static"]):
            if model is None:
                break
            largest[method] = search(model, method, None, longest)
            log({"model": shape, "method": method, "largest_batch": largest[method], "context": longest})
        for method in COMPILED_BASELINES:
            largest[method] = largest.get("baseline_static")  # same cache, same memory
        b_dyn = largest["baseline_dynamic"] or max(batches)
        plan = {c: sorted({*batches, b_dyn}) if c == longest else batches for c in contexts}
        for context, context_batches in plan.items():
            for batch in context_batches:
                for method in baselines:
                    if out_of_time():
                        break
                    row = measure(model, shape, method, 1.0, None, batch, context, args)
                    if context == longest and batch == b_dyn:
                        row["max_batch_fits"] = largest.get(method)
                    add(row)
        model = None
        free()
        for ratio in ratios if paths else []:
            if out_of_time():
                break
            model = build_elitekv(shape, ratio, args.decomposition)
            if (
                args.tune
                and decode_steps.DEVICE == "cuda"
                and shape == args.shapes.split(",")[0]
                and ratio == ratios[0]
            ):
                result["kernel_tuning"] = tune_kernel(model, max(1, b_dyn), longest, log)
                result["kernel_variant"] = kernel_variant()
                save()
            b_ek = search(model, "elitekv", "absorbed_kernel", longest)
            log({"model": shape, "kv_ratio": ratio, "largest_batch": b_ek, "context": longest})
            for context, context_batches in plan.items():
                extra = [b_ek] if context == longest and b_ek and b_ek not in context_batches else []
                for batch in [*context_batches, *extra]:
                    for path in paths:
                        if batch in extra and path == "reconstruct":
                            continue  # the reconstruct path materialises full K/V: it cannot run at this batch
                        if out_of_time():
                            break
                        row = measure(model, shape, "elitekv", ratio, path, batch, context, args)
                        if context == longest and batch == b_dyn and path != "reconstruct":
                            row["max_batch_fits"] = b_ek
                        add(row)
            model = None
            free()
    save()
    log({k: v for k, v in result.items() if k != "rows"})


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        report_main()
    else:
        main()
