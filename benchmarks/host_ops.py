"""What the host-work benchmarks share (``decode_host_ops.py``, ``uptrain_host_ops.py``): counting the ``aten``
operator calls of a piece of work with ``torch.profiler``, ranking the operators a converted model adds, and the
JSON + Markdown report with its command, device and date."""

from __future__ import annotations

import datetime
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch


def aten_calls(work: Callable[[], Any]) -> Counter:
    """``aten`` operator calls of one ``work()``, by name (CPU profiler; the counts do not depend on the device)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    calls: Counter = Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            calls[event.key] += event.count
    return calls


def top_extra(calls: Mapping[str, float], base: Mapping[str, float], top: int, per: float = 1.0) -> list[dict]:
    """The ``top`` operators whose count differs most between ``calls`` and ``base``, divided by ``per``
    (``[{"op", "calls"}]``, largest difference first, ties by name)."""
    extra = {name: calls.get(name, 0) - base.get(name, 0) for name in set(calls) | set(base)}
    ranked = sorted(((n, e / per) for n, e in extra.items() if e), key=lambda item: (-abs(item[1]), item[0]))
    return [{"op": n, "calls": c} for n, c in ranked[:top]]


def top_cell(row: Mapping[str, Any]) -> str:
    """A row's ``top_extra_per_layer`` as one Markdown table cell."""
    return ", ".join(f"`{t['op']}` {t['calls']:+g}" for t in row.get("top_extra_per_layer", []))


def write_report(
    out: Path, name: str, title: str, model: str, argv: list[str] | None, rows: list[dict], table: list[str]
) -> dict[str, Any]:
    """Write ``out/<name>.json`` (model, device, date, command, torch version, ``rows``) and ``out/<name>.md``
    (``title``, that header, then the ``table`` lines), print the Markdown and return the report."""
    report = {
        "model": model,
        "device": "cpu (operator counts; they do not depend on the device)",
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    header = [f"Model: {model}. Device: {report['device']}. Date: {report['date']}.", f"Command: `{report['command']}`"]
    lines = [f"# {title}", "", header[0], "", header[1], "", *table]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
