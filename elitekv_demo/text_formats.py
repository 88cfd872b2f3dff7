"""Plain text from the markup of Debian's documentation: HTML pages, man pages (roff), info manuals, fortune files.

Pure Python (no ``groff``, ``info`` or ``fortune`` program), so the machine that stages a corpus and the GPU
machine that reads it extract the very same text. :func:`read_text` reads a corpus file in its ``text_format``:
``"plain"`` as is, ``"html"`` for the PostgreSQL manual, ``"roff"``, ``"info"``, ``"fortune"`` for the unseen
evaluation corpora. Bump :data:`FORMAT_VERSIONS` when an extractor's output changes: it is part of the token cache
key (:mod:`elitekv_demo.tokens`).
"""

from __future__ import annotations

import gzip
import os
import re
from html.parser import HTMLParser
from pathlib import Path

FORMAT_VERSIONS = {"html": 1, "roff": 1, "info": 1, "fortune": 1}
"""Version of each extractor's output (part of the token cache key)."""

_SPECIAL = {
    "bu": "\u2022", "em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
    "oq": "\u2018", "cq": "\u2019", "ha": "^", "ti": "~", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
    "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "->": "\u2192",
    "<-": "\u2190", "sd": "\u2033", "fm": "\u2032", "dg": "\u2020", "dd": "\u2021", "pc": "\u00b7", "bv": "|",
    "ba": "|", "rs": "\\", "sl": "/", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "lB": "[", "rB": "]",
    "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9", "Fo": "\u00ab", "Fc": "\u00bb", "de": "\u00b0",
    "ss": "\u00df", "ct": "\u00a2", "Po": "\u00a3", "Eu": "\u20ac", "Ye": "\u00a5", "sc": "\u00a7", "ps": "\u00b6",
    "at": "@", "sh": "#", "Do": "$", "ga": "`", "aa": "\u00b4", "lh": "\u261c", "rh": "\u261e", "tno": "~",
}  # fmt: skip
_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "dg": "\u2020"}

_ESCAPE = re.compile(
    r"\\(?:"
    r"\((?P<c2>..)|\[(?P<cn>[^\]]*)\]"  # special characters \(xx \[name]
    r"|\*(?:\((?P<s2>..)|\[(?P<sn>[^\]]*)\]|(?P<s1>.))"  # strings \*(xx \*[name] \*x
    r"|[fFgmM](?:\(..|\[[^\]]*\]|.)"  # fonts, colours
    r"|n[+-]?(?:\(..|\[[^\]]*\]|.)"  # number registers
    r"|s(?:[+-]?\d\d?|\[[^\]]*\]|\([+-]?\d\d)"  # point sizes
    r"|[hvwoDlLxXbZRNkzA]'[^']*'"  # motions, widths and other delimited escapes
    r"|(?P<any>.))",
    re.DOTALL,
)
_SIMPLE = {"-": "-", "e": "\\", "\\": "\\", "'": "'", "`": "`", " ": " ", "~": " ", "0": " ", ".": ".", "%": ""}


def _escape(match: re.Match[str]) -> str:
    for group in ("c2", "cn"):
        name = match.group(group)
        if name is not None:
            if name.startswith("u") and len(name) >= 5 and all(c in "0123456789ABCDEFabcdef" for c in name[1:]):
                return chr(int(name[1:], 16))
            return _SPECIAL.get(name, "")
    for group in ("s2", "sn", "s1"):
        name = match.group(group)
        if name is not None:
            return _STRINGS.get(name, "")
    char = match.group("any")
    if char is None:  # a font, register, size or motion escape: no text
        return ""
    return _SIMPLE.get(char, "" if char in "&|^c:)/,!{}pr\n" else char)


def roff_inline(text: str) -> str:
    """Resolve the escapes of one roff text line: ``\\fB``, ``\\(em``, ``\\[bu]``, ``\\-`` ... -> plain text."""
    return _ESCAPE.sub(_escape, text)


def _arguments(rest: str) -> list[str]:
    """Split a request's arguments: blanks separate, double quotes group (``""`` inside is a quote)."""
    args, i, n = [], 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            i += 1
            word = []
            while i < n:
                if rest[i] == '"':
                    if i + 1 < n and rest[i + 1] == '"':
                        word.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                word.append(rest[i])
                i += 1
            args.append("".join(word))
        else:
            j = i
            while j < n and rest[j] not in " \t":
                j += 1
            args.append(rest[i:j])
            i = j
    return args


_BREAK_MACROS = frozenset({"PP", "P", "LP", "sp", "HP", "SH", "SS", "TP", "TQ", "IP", "br", "RS", "RE", "in", "ti",
                           "INDENT", "UNINDENT", "bp", "SY", "YS", "TH"})  # fmt: skip
_FONT_MACROS = frozenset({"B", "I", "SM", "SB"})
_ALTERNATING = frozenset({"BR", "BI", "IB", "IR", "RB", "RI"})


class _RoffWriter:
    """Collects paragraphs: filled text is joined into one line per paragraph, no-fill text kept line by line."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.words: list[str] = []
        self.fill = True

    def text(self, line: str) -> None:
        if self.fill:
            if line.strip():
                self.words.append(line.strip())
            else:
                self.paragraph()
        else:
            self.flush()
            self.blocks.append(line.rstrip())

    def flush(self) -> None:
        if self.words:
            self.blocks.append(" ".join(self.words))
            self.words = []

    def paragraph(self) -> None:
        self.flush()
        if self.blocks and self.blocks[-1] != "":
            self.blocks.append("")

    def result(self) -> str:
        self.flush()
        return _tidy("\n".join(self.blocks))


def roff_to_text(source: str) -> str:
    """Render a man page written in roff (the ``man`` macros, with ``tbl`` tables) to plain text.

    Headings, paragraphs and list items become paragraphs (filled text joined into one line each), ``.nf``/``.EX``
    blocks keep their lines, table rows keep their cells (tab-separated), font changes are dropped and special
    characters become Unicode. Comments, macro definitions, ``.ig`` blocks and conditionals are skipped; a page
    that only includes another (``.so``) renders to the empty string.

    Returns:
        The text, ending with one newline (or empty).
    """
    out = _RoffWriter()
    skip_until: str | None = None  # ".." ends .de/.ig blocks
    table = 0  # 0: outside, 1: reading the table's format lines, 2: its rows
    pending_tag = False
    for raw in source.replace("\r\n", "\n").split("\n"):
        if skip_until is not None:
            if raw.strip() == skip_until:
                skip_until = None
            continue
        line = re.sub(r'(?<!\\)\\".*$', "", raw)  # inline comment \"
        if raw.lstrip().startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if table == 1:
            if line.rstrip().endswith("."):
                table = 2
            continue
        is_request = line[:1] in (".", "'")
        if table == 2:  # a table row: its cells on one line; requests inside the table are skipped
            if is_request:
                if line[1:].strip().startswith("TE"):
                    table = 0
                    out.paragraph()
                continue
            row = roff_inline(line).replace("T{", "").replace("T}", "").replace("\t", "  ").strip()
            if row and row not in ("_", "="):
                out.flush()
                out.blocks.append(row)
            continue
        if not is_request:
            out.text(roff_inline(line))
            if pending_tag:
                out.flush()
                pending_tag = False
            continue
        body = line[1:].lstrip()
        name, _, rest = body.partition(" ")
        name = name.split("\t")[0]
        if name in ("de", "de1", "ig", "am"):
            skip_until = ".." if name != "ig" or not rest.strip() else "." + rest.strip()
            continue
        if name == "TS":
            out.paragraph()
            table = 1
            continue
        if name in ("nf", "EX"):
            out.flush()
            out.fill = False
            continue
        if name in ("fi", "EE"):
            out.fill = True
            continue
        args = [roff_inline(a) for a in _arguments(rest)]
        if name in _BREAK_MACROS:
            out.flush() if name in ("br", "TQ", "in", "ti") else out.paragraph()
            if name in ("SH", "SS") and args:
                out.text(" ".join(args))
                out.paragraph()
            elif name == "TH" and args:
                out.text(f"{args[0]}({args[1]})" if len(args) > 1 else args[0])
                out.paragraph()
            elif name in ("IP", "SY") and args:
                out.words.append(args[0])
            pending_tag = name in ("TP", "TQ")
            continue
        if name in _FONT_MACROS:
            text = " ".join(args)
        elif name == "OP":
            text = "[" + " ".join(args) + "]"
        elif name in _ALTERNATING:
            text = "".join(args)
        elif name in ("UE", "ME"):
            text = "".join(args)
        else:  # other requests (.UR, .ft, .ad, .PD, .if, .so, ...) produce no text
            continue
        out.text(text)
        if pending_tag:
            out.flush()
            pending_tag = False
    return out.result()


def info_to_text(source: str) -> str:
    """The text of an info manual (``makeinfo`` output): node separators, ``File: ... Node: ...`` header lines,
    the directory entry, index cookies and the trailing tag table dropped; menus and the text kept as written."""
    source = source.split("\x1f\nTag Table:", 1)[0]
    source = re.sub(r"START-INFO-DIR-ENTRY.*?END-INFO-DIR-ENTRY\n?", "", source, flags=re.DOTALL)
    source = source.replace("\x00\x08[index\x00\x08]", "").replace("\x00", "").replace("\x08", "")
    lines = []
    for line in source.split("\n"):
        if line.startswith(("\x1f", "File: ", "INFO-DIR-SECTION", "Indirect:", "Local Variables:")):
            continue
        lines.append(line.replace("\x7f", "").rstrip())
    return _tidy("\n".join(lines))


def fortune_to_text(source: str) -> str:
    """The text of a fortune file: the ``%`` lines between entries become blank lines, overstrikes
    (``c BACKSPACE c``, bold and underline on old terminals) are removed."""
    while "\x08" in source:  # "_\bx" and "x\bx" pairs, also runs such as "____\b\b\b\bword"
        shorter = re.sub(r"[^\x08\n]\x08", "", source)
        if shorter == source:
            source = source.replace("\x08", "")
            break
        source = shorter
    lines = ["" if line.strip() == "%" else line.rstrip() for line in source.split("\n")]
    return _tidy("\n".join(lines))


def _tidy(text: str) -> str:
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n" if text.strip() else ""


EXTRACTORS = {"roff": roff_to_text, "info": info_to_text, "fortune": fortune_to_text}
"""``text_format`` -> extractor, for :func:`read_text`."""


_SKIP_TAGS = frozenset({"head", "script", "style", "title"})
_SKIP_CLASSES = frozenset({"navheader", "navfooter"})
_PARAGRAPH_TAGS = frozenset(
    {"p", "div", "pre", "table", "ul", "ol", "dl", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr"}
)
_LINE_TAGS = frozenset({"li", "dt", "dd", "tr", "br", "caption"})
_CELL_TAGS = frozenset({"td", "th"})


class _TextExtractor(HTMLParser):
    """Collects the visible text of an (X)HTML page; see :func:`html_to_text`."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None  # tag of the outermost element being skipped
        self.skip_depth = 0  # open elements named skip_tag inside it, itself included
        self.pre_depth = 0
        self.newlines = 1  # newlines at the end of the text so far (the start counts as a line start)

    def _skips(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        classes = set((dict(attrs).get("class") or "").split())
        return tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            self.skip_depth += tag == self.skip_tag
            return
        if self._skips(tag, attrs):
            self.skip_tag, self.skip_depth = tag, 1
            return
        self._boundary(tag)
        self.pre_depth += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        self._boundary(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is None and not self._skips(tag, attrs):
            self._boundary(tag)

    def handle_data(self, data: str) -> None:
        if self.skip_tag is not None:
            return
        if not self.pre_depth:
            data = re.sub(r"\s+", " ", data)
            if self.newlines:  # at the start of a line
                data = data.lstrip()
        self._append(data)

    def _append(self, text: str) -> None:
        if not text:
            return
        self.parts.append(text)
        stripped = text.rstrip("\n")
        self.newlines = len(text) - len(stripped) + (self.newlines if not stripped else 0)

    def _boundary(self, tag: str) -> None:
        want = 2 if tag in _PARAGRAPH_TAGS else 1 if tag in _LINE_TAGS else 0
        if self.parts and self.newlines < want:
            self._append("\n" * (want - self.newlines))
        elif tag in _CELL_TAGS and not self.newlines and not self.parts[-1].endswith(" "):
            self._append(" ")


def html_to_text(page: str) -> str:
    """Extract the readable text of an HTML page with the standard library's parser.

    ``<head>``, ``<script>``, ``<style>`` and the DocBook navigation bars (``class="navheader"`` /
    ``"navfooter"``) are dropped; paragraphs, headings, lists, tables and ``<pre>`` blocks become
    separate paragraphs (``<pre>`` keeps its whitespace, other text has runs of whitespace collapsed),
    list items and table rows separate lines, table cells are separated by spaces; entities are decoded.

    Returns:
        The text, lines stripped of trailing spaces, at most one blank line in a row, ending with one
        newline (empty string for a page without text).
    """
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text else ""


TEXT_FORMATS = ("plain", "html", "roff", "info", "fortune")


def read_text(path: str | os.PathLike[str], text_format: str = "plain") -> str:
    """The text of a corpus file: UTF-8 (undecodable bytes replaced; ``.gz`` files decompressed), through
    :func:`html_to_text` for HTML and :data:`EXTRACTORS` for roff, info and fortune."""
    path = Path(path)
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    raw = data.decode("utf-8", errors="replace")
    if text_format == "plain":
        return raw
    if text_format == "html":
        return html_to_text(raw)
    if text_format in EXTRACTORS:
        return EXTRACTORS[text_format](raw)
    raise ValueError(f"text_format={text_format!r}: choose one of {TEXT_FORMATS}")
