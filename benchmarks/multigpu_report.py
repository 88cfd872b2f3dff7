"""Turn the runs of ``benchmarks/multigpu_job.sh`` into ``benchmarks/results/multigpu.{json,md}``.

Each run is ``<name>.log`` (the ``accelerate launch`` output) and, if it finished, ``<name>.summary.json`` (written
by the example). The name says how it was launched: ``ddp``, ``fsdp`` (FSDP1) or ``fsdp2``; ``_trl`` for TRL's
SFTTrainer (else the HF Trainer); ``_tiny`` or ``_real`` (SmolLM2-135M on the Python docs); ``_ramload`` when
accelerate's CPU-RAM-efficient loading was on (its default under ``--use_fsdp``; the job's FSDP1 runs keep it).
A run without a summary is reported with the first exception line of its log.

    python benchmarks/multigpu_report.py benchmarks/results/multigpu_runs --device "2x NVIDIA H200" \\
        --date 2026-11-23 --command "PART=tiny|real bash benchmarks/multigpu_job.sh" --versions "torch 2.11.0, ..."
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LAUNCHERS = {"ddp": "DDP", "fsdp": "FSDP1", "fsdp2": "FSDP2"}
ERROR_LINE = re.compile(r"^\[rank0\]: (\w+(?:Error|Exception)): (.*)$")


def run_settings(name: str) -> dict:
    """Launcher, trainer, model and loading mode encoded in a run's file name (see the module docstring)."""
    parts = name.split("_")
    if parts[0] not in LAUNCHERS or not {"tiny", "real"} & set(parts):
        raise ValueError(f"{name!r}: expected <ddp|fsdp|fsdp2>[_trl]_<tiny|real>[_ramload]")
    return {
        "run": name,
        "launcher": LAUNCHERS[parts[0]],
        "trainer": "SFTTrainer" if "trl" in parts else "Trainer",
        "model": "tiny Llama" if "tiny" in parts else "SmolLM2-135M",
        "cpu_ram_efficient_loading": "ramload" in parts,
    }


def first_error(log: str) -> str | None:
    """The first ``[rank0]: SomeError: message`` line of a failed run's log."""
    for line in log.splitlines():
        match = ERROR_LINE.match(line)
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return None


def run_row(folder: Path, name: str) -> dict:
    row = run_settings(name)
    summary_path = folder / f"{name}.summary.json"
    if not summary_path.is_file():
        return {**row, "status": "failed", "error": first_error((folder / f"{name}.log").read_text())}
    summary = json.loads(summary_path.read_text())
    ppl = summary["perplexity"]
    uptrained = next(v for k, v in ppl.items() if k.startswith("uptrained"))
    losses = summary["logged_losses"]
    return {
        **row,
        "status": "ok",
        "processes": summary["processes"],
        "train_tokens": summary["train_tokens"],
        "steps": summary["steps"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "ppl_training_free": ppl["training_free"],
        "ppl_uptrained": uptrained,
        "ppl_reloaded": ppl.get("reloaded"),
        "reload_diff_pct": None if "reloaded" not in ppl else 100 * (ppl["reloaded"] / uptrained - 1),
        "seconds": summary["seconds"],
    }


def markdown(report: dict) -> str:
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    lines = [
        "# Multi-GPU uptraining (accelerate launch, 2 processes)",
        "",
        f"Device: {report['device']}. Date: {report['date']}. Versions: {report['versions']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "Each run converts the model to EliteKV at 25% cache, uptrains it on every process, saves it with the "
        "Trainer (`save_model`, which gathers FSDP shards), then loads the folder with `AutoModelForCausalLM` on "
        "the main process and evaluates it again on the same held-out windows (`reloaded`).",
        "",
        "| run | launcher | trainer | model | train tokens | steps | loss first → last | ppl training-free | "
        "ppl uptrained | ppl reloaded | reload diff | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        lines.append(
            f"| {r['run']} | {r['launcher']} | {r['trainer']} | {r['model']} | {r['train_tokens']:,} | {r['steps']} | "
            f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['ppl_training_free']:.2f} | "
            f"{r['ppl_uptrained']:.2f} | {r['ppl_reloaded']:.2f} | {r['reload_diff_pct']:+.3f}% | {r['seconds']} |"
        )
    if failed:
        lines += [
            "",
            "Runs that failed (each setting is now refused before training by `elitekv_peft.check_fsdp_launch`, "
            "with the fix in the message):",
            "",
            "| run | launcher | trainer | model | CPU-RAM-efficient loading | error |",
            "|---|---|---|---|---|---|",
        ]
        for r in failed:
            lines.append(
                f"| {r['run']} | {r['launcher']} | {r['trainer']} | {r['model']} | "
                f"{'on' if r['cpu_ram_efficient_loading'] else 'off'} | `{r['error']}` |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of <name>.log and <name>.summary.json files")
    parser.add_argument("--device", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--versions", required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multigpu.json"))
    args = parser.parse_args(argv)
    names = sorted(p.name.removesuffix(".log") for p in args.folder.glob("*.log"))
    report = {
        "device": args.device,
        "date": args.date,
        "command": args.command,
        "versions": args.versions,
        "rows": [run_row(args.folder, name) for name in names],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
