"""`benchmarks/make_docs.py` (docs/benchmarks.md from the reports) and the user documents' links and size."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
make_docs = load_benchmark("make_docs")

QUALITY = """# Quality: toy perplexity

Model: tiny. Device: Test GPU 9000. Date: 2030-01-02.

Command: `python benchmarks/quality.py --toy`

| method | ppl |
|---|---|
| original | 1.50 |

![plot](quality.png) and [raw rows](quality.json), [a site](https://example.org) and [a section](#top)

## Ablations

- none
"""

DECODE = """Decode speed without a title

Device: CPU box. Date: 2030-02-03. Command: `python benchmarks/decode.py --toy`

Notes: nothing else.

## Rows

| a | b |
|---|---|
| 1 | 2 |
"""


@pytest.fixture()
def reports(tmp_path: Path) -> Path:
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "quality.md").write_text(QUALITY)
    (results / "decode_x.md").write_text(DECODE)
    (results / "quality.json").write_text("{}")  # not a report: ignored
    return results


def test_index_and_included_reports(reports: Path, tmp_path: Path):
    out = tmp_path / "docs" / "benchmarks.md"
    assert make_docs.main(["--results", str(reports), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("# Benchmark results\n")
    assert page.count("\n# ") == 0  # one top-level heading: the reports' own titles moved down a level
    index = [line for line in page.splitlines() if line.startswith("| [")]
    # file-name order; a report without a '# ' title is named by its file stem
    assert index == [
        "| [decode_x](#decode-x) | [`decode_x.md`](../bench/results/decode_x.md) | 2030-02-03 | CPU box |",
        "| [Quality: toy perplexity](#quality) | [`quality.md`](../bench/results/quality.md) | 2030-01-02 | "
        "Test GPU 9000 |",
    ]
    assert '<a id="quality"></a>' in page and '<a id="decode-x"></a>' in page
    assert "## Quality: toy perplexity (`quality.md`)" in page
    assert "### Ablations" in page and "### Rows" in page
    # the where/when/how lines are kept, and relative links now point into the results folder
    assert "Command: `python benchmarks/quality.py --toy`" in page
    assert "Device: CPU box. Date: 2030-02-03. Command: `python benchmarks/decode.py --toy`" in page
    assert "![plot](../bench/results/quality.png)" in page
    assert "[raw rows](../bench/results/quality.json)" in page
    assert "[a site](https://example.org)" in page and "[a section](#top)" in page
    assert "| original | 1.50 |" in page


def test_long_report_is_summarised_and_linked(reports: Path, tmp_path: Path):
    page = make_docs.render(reports, tmp_path / "docs" / "benchmarks.md", include_limit=100)
    section = page.split('<a id="quality"></a>')[1]
    assert "summarised here" in section and "[`quality.md`](../bench/results/quality.md)" in section
    assert "Device: Test GPU 9000. Date: 2030-01-02." in section  # the key paragraphs stay
    assert "Command: `python benchmarks/quality.py --toy`" in section
    assert "- Ablations" in section  # its sections are listed
    assert "| original | 1.50 |" not in section  # the rows are not copied
    assert "Notes: nothing else." not in page  # only the where/when/how paragraphs of a summarised report


def test_output_is_deterministic_and_check_mode(reports: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "docs" / "benchmarks.md"
    first = make_docs.render(reports, out)
    assert make_docs.render(reports, out) == first
    assert make_docs.main(["--results", str(reports), "--out", str(out), "--check"]) == 1  # not written yet
    make_docs.main(["--results", str(reports), "--out", str(out)])
    assert out.read_text() == first
    assert make_docs.main(["--results", str(reports), "--out", str(out), "--check"]) == 0
    (reports / "zz_new.md").write_text("# A new report\n\nDate: 2031-01-01.\n")
    assert make_docs.main(["--results", str(reports), "--out", str(out), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_empty_results_folder_is_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="--results"):
        make_docs.render(tmp_path, tmp_path / "out.md")


def test_committed_benchmarks_page_is_up_to_date():
    """docs/benchmarks.md is exactly what the committed generator writes from the committed reports."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "make_docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + " (run `python benchmarks/make_docs.py` and commit the page)"


def relative_links(path: Path) -> list[str]:
    """Targets of the markdown links and images in ``path`` that are not URLs or in-page anchors."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t)]


@pytest.mark.parametrize(
    "document", ["README.md", "CHANGELOG.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]
)
def test_relative_links_point_to_existing_files(document: str):
    path = ROOT / document
    links = relative_links(path)
    missing = [t for t in links if not (path.parent / t).exists()]
    assert not missing, f"{document} links to files that do not exist: {missing}"


def test_readme_links_are_checked():
    """The link check above sees the README's links (a parser that found none would pass vacuously)."""
    assert len(relative_links(ROOT / "README.md")) >= 5


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 12 * 1024, f"README.md is {size:,} bytes; keep it <= 12 KB and move details to docs/"


def test_readme_family_summary_is_folded_from_the_generated_table():
    """The README's family x method table is `family_table.summary` of docs/families.md's generated table."""
    family_table = load_benchmark("family_table")
    readme, doc = (ROOT / "README.md").read_text(), (ROOT / "docs" / "families.md").read_text()
    assert family_table.with_summary(readme, doc) == readme, "run: python benchmarks/family_table.py"


def test_family_summary_reports_the_worst_cell():
    family_table = load_benchmark("family_table")
    rows = [
        "| Llama, rope_type `default` | `elitekv` | yes | yes | not run |",
        "| Llama, rope_type `yarn` | `elitekv` | yes | FAILED | yes |",
        "| Llama, rope_type `yarn` | `lorc` | yes | yes | yes |",
        "| Qwen3 (q/k norms) | `gqa` | refused | - | - |",
    ]
    doc = "\n".join([family_table.BEGIN, "| family | method | a | b | c |", "|---|---|---|---|---|", *rows])
    lines = family_table.summary(doc + "\n" + family_table.END).splitlines()
    assert lines[3] == "| Llama | FAILED | yes | not run | not run |"
    assert lines[4] == "| Qwen3 | not run | not run | not run | refused |"
