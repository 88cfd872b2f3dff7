"""Where uptraining time goes: tokens/s of the LM loss and of distillation on the same converted model, and a profile.

Uptraining is what the 20-GPU-minute budget of issue 18 buys, so its speed decides how many tokens a recipe sees.
This script converts the real SmolLM2-135M (EliteKV, ``--kv-ratio``; calibration on random token ids: speed does not
depend on the text) and trains it a few steps with the library's own trainer (`elitekv_peft.training.uptrain`), once
per ``--variants`` entry (loss, ``torch.compile`` or not, windows a step), timing the steps after a warm-up, then
profiles a few distillation steps and lists the kernels that took the most device time. Timings are reported as
ratios against the first variant, run in the same process.

    python benchmarks/uptrain_speed.py --out benchmarks/results           # on a GPU (SmolLM2 staged)
    python benchmarks/uptrain_speed.py --tiny --device cpu --steps 3 --batch-size 2 --seq-len 64 --out /tmp/speed
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class StepClock(TrainerCallback):
    """Wall-clock time of every optimizer step (device synchronised), and an optional profiler stepped along."""

    def __init__(self, profiler: Any = None) -> None:
        self.times: list[float] = []
        self.profiler = profiler
        self._last = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._sync()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._sync()
        self.times.append(time.perf_counter() - self._last)
        if self.profiler is not None:
            self.profiler.step()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def parse_variant(text: str, batch_size: int) -> dict[str, Any]:
    """``"distill+compile+bs64"`` -> ``{"loss": "distill", "compile": True, "batch_size": 64}``."""
    loss, *options = text.split("+")
    if loss not in ("lm", "distill"):
        raise ValueError(f"variant {text!r}: start with lm or distill")
    variant = {"name": text, "loss": loss, "compile": False, "batch_size": batch_size}
    for option in options:
        if option == "compile":
            variant["compile"] = True
        elif option.startswith("bs") and option[2:].isdigit():
            variant["batch_size"] = int(option[2:])
        else:
            raise ValueError(f"variant {text!r}: options are +compile and +bsN")
    return variant


def train_steps(
    model: Any,
    teacher: Any,
    windows: torch.Tensor,
    args: argparse.Namespace,
    profiler: Any = None,
    batch_size: int | None = None,
    compile_model: bool = False,
):
    from transformers import default_data_collator

    from elitekv_peft.training import EliteKVTrainer, lm_dataset, training_arguments

    clock = StepClock(profiler)
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as tmp:
        targs = training_arguments(
            tmp,
            max_steps=args.steps,
            batch_size=batch_size or args.batch_size,
            logging_steps=10**6,
            disable_tqdm=True,
            torch_compile=compile_model,
        )
        trainer = EliteKVTrainer(
            model=model,
            args=targs,
            train_dataset=lm_dataset(windows),
            data_collator=default_data_collator,
            teacher=teacher,
            callbacks=[clock],
        )
        trainer.train()
    return clock.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--variants",
        default="lm,distill,distill+compile",
        help="comma list of LOSS[+compile][+bsN] (the first is the baseline of the ratios); +compile: torch.compile "
        "of the student and the teacher (TrainingArguments.torch_compile), +bsN: N windows a step",
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke runs)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import copy

    from peft import get_peft_model

    from elitekv_peft import EliteKVConfig

    torch.manual_seed(0)
    if args.tiny:
        from elitekv_demo.testing import tiny_model

        base, name = tiny_model().to(args.device), "tiny random Llama"
    else:
        from elitekv_demo.real_model import load_smollm2

        base, name = load_smollm2(device=args.device)[0], "SmolLM2-135M-Instruct"
    variants = [parse_variant(v.strip(), args.batch_size) for v in args.variants.split(",") if v.strip()]
    vocab = base.config.vocab_size
    largest = max(v["batch_size"] for v in variants)
    windows = torch.randint(3, vocab, (largest * args.steps, args.seq_len))
    calib = torch.randint(3, vocab, (max(4, 2 * base.config.hidden_size // args.seq_len + 1), args.seq_len))
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    results: dict[str, Any] = {}
    for v in variants:
        model = get_peft_model(copy.deepcopy(base), EliteKVConfig(kv_ratio=args.kv_ratio, calibration_data=calib))
        model.train()
        student_teacher = copy.deepcopy(teacher) if v["loss"] == "distill" else None  # compiled copies stay apart
        times = train_steps(model, student_teacher, windows, args, None, v["batch_size"], v["compile"])
        step = median(times[args.warmup :] or times)
        tokens = v["batch_size"] * args.seq_len
        results[v["name"]] = {"median_step_s": step, "tokens_per_s": tokens / step, "batch_size": v["batch_size"]}
        print(f"[speed] {v['name']}: {results[v['name']]}", flush=True)
        del model, student_teacher

    top: list[dict[str, Any]] = []
    if args.profile_steps > 0:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        model = get_peft_model(copy.deepcopy(base), EliteKVConfig(kv_ratio=args.kv_ratio, calibration_data=calib))
        model.train()
        sched = schedule(wait=1, warmup=1, active=args.profile_steps)
        with profile(activities=activities, schedule=sched) as prof:
            profiled = argparse.Namespace(**{**vars(args), "steps": args.profile_steps + 2})
            train_steps(model, teacher, windows, profiled, prof)
        key = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1.0
        for event in events[:20]:
            top.append({"name": event.key[:120], "share": getattr(event, key) / total, "calls": event.count})

    baseline = results[variants[0]["name"]]
    report = {
        "model": name,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "baseline": variants[0]["name"],
        "variants": {
            k: {**v, "tokens_per_s_vs_baseline": v["tokens_per_s"] / baseline["tokens_per_s"]}
            for k, v in results.items()
        },
        "distill_profile_top": top,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "uptrain_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Uptraining speed: LM loss, distillation, compiled, batch sizes",
        "",
        f"Model: {report['model']}, EliteKV {args.kv_ratio:g}. Device: {report['device']}. Date: {report['date']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Tokens a second against `{report['baseline']}` in the same run (steps after {args.warmup} warm-up steps; "
        "`+compile`: `TrainingArguments(torch_compile=True)`, the teacher compiled too; `+bsN`: N windows of "
        f"{args.seq_len} tokens a step).",
        "",
        "| variant | windows a step | tokens/s vs baseline |",
        "|---|---|---|",
    ]
    for name, row in report["variants"].items():
        lines.append(f"| {name} | {row['batch_size']} | {row['tokens_per_s_vs_baseline']:.2f}x |")
    if top:
        lines += ["", "Distillation steps, kernels by share of device time:", "", "| kernel | share | calls |"]
        lines.append("|---|---|---|")
        lines += [f"| `{t['name']}` | {t['share']:.1%} | {t['calls']} |" for t in top]
    (args.out / "uptrain_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
