"""Reports of the retention benchmark: merging rows of several runs, ``retention.md`` and ``retention.png``.

Used by ``benchmarks/retention.py`` (see its docstring for the fields of a row).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)"


def row_key(row: dict[str, Any]) -> tuple[str, float, str, str]:
    return row["method"], float(row["kv_ratio"]), row["recipe"], row.get("tag", "")


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several (later rows replace earlier ones of the same method, kv_ratio, recipe and tag)."""
    rows: dict[tuple[str, float, str, str], dict[str, Any]] = {}
    commands: list[str] = []
    devices: list[str] = []
    corpora: list[str] = []
    for result in results:
        for row in result.get("rows", []):
            rows[row_key(row)] = row
        for value, seen in ((result.get("command"), commands), (result.get("device"), devices)):
            for part in (value or "").split(" ; "):
                if part and part not in seen:
                    seen.append(part)
        corpora += [c for c in result.get("unseen_corpora", []) if c not in corpora]
    ordered = sorted(rows.values(), key=lambda r: (r["method"] != "original", -r["kv_ratio"], r["method"], r["recipe"]))
    return {
        "model": next((r["model"] for r in reversed(results) if r.get("model")), MODEL_NAME),
        "device": " ; ".join(devices),
        "date": max((r.get("date") or "" for r in results), default=""),
        "command": " ; ".join(commands),
        "unseen_corpora": corpora,
        "rows": ordered,
    }


def original_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The original model as is (recipe ``none``), the untagged one if there are several; None if absent."""
    found = [r for r in rows if r["method"] == "original" and r["recipe"] == "none"]
    return min(found, key=lambda r: bool(r.get("tag"))) if found else None


def load_result(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def _pct(value: float, base: float) -> str:
    return f"{value / base - 1:+.1%}" if base and math.isfinite(value) else "n/a"


def report_lines(result: dict[str, Any]) -> list[str]:
    """The Markdown of ``retention.md``: one table of perplexity (with % vs the original as is), one of agreement."""
    sets = ["indomain", *result["unseen_corpora"]]
    original = original_row(result["rows"])
    lines = [
        "# Retention: the original model's ability on text never trained on",
        "",
        f"Model: {result['model']}. Device: {result['device']}. Date: {result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "`indomain`: the Python docs' held-out files; the others are never trained or calibrated on "
        "(`benchmarks/results/retention_corpora.md`). gpu_minutes: conversion + uptraining wall clock.",
        "",
        "Perplexity (change vs the original as is):",
        "",
        "| method | kv_ratio | recipe | train tokens | gpu min | " + " | ".join(sets) + " |",
        "|---|---|---|---|---|" + "---|" * len(sets),
    ]

    for r in result["rows"]:
        cells = []
        for s in sets:
            value = r["ppl"].get(s, float("nan"))
            base = original["ppl"].get(s) if original else None
            cells.append(f"{value:.2f}" + (f" ({_pct(value, base)})" if base and r is not original else ""))
        lines.append(
            f"| {r['method']} | {r['kv_ratio']:.3g} | {_label(r)} | {r['train_tokens']:,} | {r['gpu_minutes']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Top-1 next-token agreement with the original:", ""]
    lines += ["| method | kv_ratio | recipe | " + " | ".join(sets) + " |", "|---|---|---|" + "---|" * len(sets)]
    for r in result["rows"]:
        cells = [f"{r['top1_agreement'].get(s, float('nan')):.1%}" for s in sets]
        lines.append(f"| {r['method']} | {r['kv_ratio']:.3g} | {_label(r)} | " + " | ".join(cells) + " |")
    if original:
        lines += ["", "Goals of issue 18 (EliteKV rows; at most 20 GPU minutes of conversion + uptraining):", ""]
        lines += target_lines(result, original)
    notes = [f"* {r['method']} {r['kv_ratio']:.3g} {_label(r)}: {r['note']}" for r in result["rows"] if r.get("note")]
    if notes:
        lines += ["", "Notes on rows:", "", *notes]
    return lines


def _label(r: dict[str, Any]) -> str:
    return f"{r['recipe']}" + (f" ({r['tag']})" if r.get("tag") else "")


def target_lines(result: dict[str, Any], original: dict[str, Any]) -> list[str]:
    """One line per EliteKV row at 25%, 12.5% or 50% against issue 18's goals.

    25%: perplexity within +10% of the original's on every unseen set, top-1 agreement >= 90% there, in-domain
    within +5%. 12.5%: lower perplexity than GQA at 33% (same recipe and tag) on every unseen set. 50%: within +3%
    on every set. Each line also says whether the row kept to the 20-minute budget."""
    unseen = result["unseen_corpora"]
    rows = result["rows"]
    lines = []
    for r in rows:
        if r["method"] != "elitekv" or r["kv_ratio"] not in (0.25, 0.125, 0.5):
            continue
        rel = {s: r["ppl"].get(s, math.nan) / original["ppl"].get(s, math.nan) for s in ["indomain", *unseen]}
        worst = max(unseen, key=lambda s: rel.get(s, 0.0)) if unseen else "indomain"
        budget = "within 20 min" if r["gpu_minutes"] <= 20 else "OVER 20 min"
        head = f"* EliteKV {r['kv_ratio']:.3g} {_label(r)} ({r['train_tokens']:,} tokens, {r['gpu_minutes']:.1f} min,"
        head += f" {budget}):"
        if r["kv_ratio"] == 0.25:
            agreement = min(r["top1_agreement"].get(s, 0.0) for s in unseen) if unseen else 1.0
            ok = all(rel[s] <= 1.10 for s in unseen) and agreement >= 0.90 and rel["indomain"] <= 1.05
            lines.append(
                f"{head} worst unseen {worst} {rel[worst] - 1:+.1%} (goal <= +10%), lowest unseen agreement "
                f"{agreement:.1%} (goal >= 90%), indomain {rel['indomain'] - 1:+.1%} (goal <= +5%): "
                + ("met" if ok else "NOT met")
            )
        elif r["kv_ratio"] == 0.5:
            top = max(rel, key=lambda s: rel[s])
            lines.append(
                f"{head} worst set {top} {rel[top] - 1:+.1%} (goal <= +3%): "
                + ("met" if rel[top] <= 1.03 else "NOT met")
            )
        else:
            gqa = next(
                (
                    g
                    for g in rows
                    if g["method"] == "gqa" and g["recipe"] == r["recipe"] and g.get("tag") == r.get("tag")
                ),
                None,
            )
            if gqa is None:
                lines.append(f"{head} no GQA row of the same recipe to compare with")
                continue
            ok = all(r["ppl"].get(s, math.inf) < gqa["ppl"].get(s, -math.inf) for s in unseen)
            pairs = [(s, r["ppl"].get(s, math.nan), gqa["ppl"].get(s, math.nan)) for s in unseen]
            shown = ", ".join(f"{s} {ours:.2f} vs {theirs:.2f}" for s, ours, theirs in pairs)
            lines.append(
                f"{head} against GQA {gqa['kv_ratio']:.3g} {_label(gqa)}: {shown}: " + ("met" if ok else "NOT met")
            )
    return lines or ["* no EliteKV row at 25%, 12.5% or 50% yet"]


def write_report(result: dict[str, Any], out_dir: Path, plot: bool = True) -> None:
    """``retention.json``, ``retention.md`` and (with ``plot``) ``retention.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retention.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "retention.md").write_text("\n".join(report_lines(result)) + "\n")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # e.g. the GPU image: `retention.py report` makes the plot here afterwards
            print("[retention] matplotlib is not installed: retention.png not written", flush=True)
            return
        plot_result(result, out_dir / "retention.png")


def plot_result(result: dict[str, Any], path: Path) -> None:
    """Two dot panels, one line per row and one marker per evaluation set: perplexity relative to the original (log
    scale, the goal's +10% marked) and top-1 agreement (90% marked). Rows in the table's order, first on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = ["indomain", *result["unseen_corpora"]]
    rows = result["rows"]
    original = original_row(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.3 * len(rows)), sharey=True)
    ys = list(range(len(rows)))[::-1]
    markers = "osD^vP*X"
    for k, name in enumerate(sets):
        style = {"marker": markers[k % len(markers)], "linestyle": "none", "label": name, "alpha": 0.85}
        if original:
            rel = [r["ppl"].get(name, math.nan) / original["ppl"].get(name, math.nan) for r in rows]
            axes[0].plot(rel, ys, **style)
        axes[1].plot([r["top1_agreement"].get(name, math.nan) for r in rows], ys, **style)
    axes[0].axvline(1.1, color="red", linestyle="--", linewidth=0.8, label="goal: original +10%")
    axes[0].set_xlabel("perplexity / original's (log)")
    axes[0].set_xscale("log")
    axes[1].axvline(0.9, color="red", linestyle="--", linewidth=0.8, label="goal: 90% agreement")
    axes[1].set_xlabel("top-1 agreement with the original")
    axes[1].set_xlim(0, 1.02)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([f"{r['method']} {r['kv_ratio']:.3g} {_label(r)}" for r in rows], fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Retention of {result['model'].split(' ')[0]} on held-out and never-trained-on text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
