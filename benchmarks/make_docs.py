"""Generate ``docs/benchmarks.md`` from the benchmark reports in ``benchmarks/results/*.md``.

The page starts with an index (one row per report: its title, file, date and device), then one section per report in
file-name order. A report up to ``--include-limit`` characters is included whole (its headings one level down, its
relative links rewritten to point into the results folder); a longer one is summarised by its device / date /
command paragraphs and its section headings, with a link to the full file. The output depends only on the reports'
text, so it is the same on every run; ``tests/test_make_docs.py`` checks that the committed page is what this
script writes.

    python benchmarks/make_docs.py                 # rewrite docs/benchmarks.md
    python benchmarks/make_docs.py --check         # exit 1 if docs/benchmarks.md is out of date
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
INCLUDE_LIMIT = 16_000  # characters: longer reports are summarised and linked
KEY_PARAGRAPH = re.compile(r"\b(Device|Date|Command|Model|Versions|Sources?):")
DEVICE = re.compile(r"\bDevice: (.+?)\.(?=\s|$)")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


@dataclass(frozen=True)
class Report:
    """One ``*.md`` report: its file name, title, header paragraphs and body lines (title line removed)."""

    name: str
    title: str
    header: list[str]  # paragraphs between the title and the first table or heading
    body: list[str]  # every line after the title

    @property
    def anchor(self) -> str:
        """The id of the report's section: the file stem, lower case, other characters as ``-``."""
        return re.sub(r"[^a-z0-9-]", "-", Path(self.name).stem.lower())

    @property
    def key_paragraphs(self) -> list[str]:
        """Header paragraphs that say where, when and how it was measured (``Device:``, ``Date:``, ``Command:``...)."""
        return [p for p in self.header if KEY_PARAGRAPH.search(p)]

    @property
    def date(self) -> str:
        found = DATE.search(" ".join([self.title, *self.key_paragraphs]))
        return found.group(0) if found else "–"

    @property
    def device(self) -> str:
        found = DEVICE.search(" ".join(self.key_paragraphs))
        return found.group(1).replace("|", "/") if found else "–"


def read_report(path: Path) -> Report:
    """Parse ``path``: its first ``# `` line is the title (else the file stem); the header ends at a table/heading."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title, body = path.stem, lines
    for index, line in enumerate(lines):
        if line.strip():
            if line.startswith("# "):
                title, body = line[2:].strip(), lines[index + 1 :]
            break
    header: list[str] = []
    paragraph: list[str] = []
    for line in body:
        if line.startswith("|") or line.startswith("#"):
            break
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            header.append(" ".join(paragraph))
            paragraph = []
    if paragraph:
        header.append(" ".join(paragraph))
    return Report(name=path.name, title=title, header=header, body=body)


def rewrite_links(line: str, prefix: str) -> str:
    """Point relative links and images of a report line at the results folder (``prefix`` + target)."""

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target):
            return match.group(0)
        return f"{match.group(1)}{prefix}{target}{match.group(3)}"

    return LINK.sub(fix, line)


def demote(line: str) -> str:
    """One heading level down (``## x`` -> ``### x``); other lines unchanged."""
    return "#" + line if re.match(r"^#{1,5} ", line) else line


def report_section(report: Report, prefix: str, include_limit: int) -> list[str]:
    """The markdown lines of one report's section in the generated page."""
    link = f"{prefix}{report.name}"
    out = [f'<a id="{report.anchor}"></a>', "", f"## {report.title} (`{report.name}`)", ""]
    text_size = sum(len(line) + 1 for line in report.body)
    if text_size <= include_limit:
        out += [f"Source: [`{report.name}`]({link}), included whole.", ""]
        body = list(report.body)
        while body and not body[0].strip():
            body.pop(0)
        while body and not body[-1].strip():
            body.pop()
        out += [demote(rewrite_links(line, prefix)) for line in body]
        return out + [""]
    out += [
        f"Source: [`{report.name}`]({link}) ({text_size:,} characters; summarised here, read the file for every row).",
        "",
    ]
    for paragraph in report.key_paragraphs:
        out += [rewrite_links(paragraph, prefix), ""]
    headings = [line.lstrip("#").strip() for line in report.body if re.match(r"^#{2,6} ", line)]
    if headings:
        out += ["Sections of the full report:", ""] + [f"- {heading}" for heading in headings] + [""]
    return out


def render(results_dir: Path, out_path: Path, include_limit: int = INCLUDE_LIMIT) -> str:
    """The whole generated page for the reports in ``results_dir``, with links relative to ``out_path``'s folder."""
    paths = sorted(results_dir.glob("*.md"), key=lambda p: p.name)
    if not paths:
        raise FileNotFoundError(f"no *.md reports in {results_dir}; pass --results with the folder that holds them.")
    prefix = Path(os.path.relpath(results_dir.resolve(), out_path.resolve().parent)).as_posix().rstrip("/") + "/"
    reports = [read_report(p) for p in paths]
    lines = [
        "# Benchmark results",
        "",
        f"<!-- Generated by `python benchmarks/make_docs.py` from `{prefix}*.md`; do not edit by hand. -->",
        "",
        f"Every report under [`{prefix}`]({prefix}), in file-name order. Reports up to {include_limit:,} characters "
        "are included whole; longer ones are summarised (where, when and how they were measured) and linked. "
        "The JSON files next to each report hold the raw rows.",
        "",
        "| report | file | date | device |",
        "|---|---|---|---|",
    ]
    for report in reports:
        title = report.title.replace("|", "/")
        lines.append(
            f"| [{title}](#{report.anchor}) | [`{report.name}`]({prefix}{report.name}) | {report.date} | "
            f"{report.device} |"
        )
    lines.append("")
    for report in reports:
        lines += report_section(report, prefix, include_limit)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of the *.md reports")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="page to write (default docs/benchmarks.md)")
    parser.add_argument(
        "--include-limit",
        type=int,
        default=INCLUDE_LIMIT,
        help=f"longest report included whole, in characters (default {INCLUDE_LIMIT:,})",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    page = render(args.results, args.out, args.include_limit)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != page:
            print(f"{args.out} is out of date: run `python benchmarks/make_docs.py`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out} ({len(page):,} characters, {page.count('<a id=')} reports)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
