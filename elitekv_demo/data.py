"""Real and synthetic token data for calibration, uptraining and evaluation.

Real text comes from Debian documentation packages, each a *corpus* (:data:`CORPORA`):

* ``"pydocs"``: the reStructuredText sources of the Python 3.11 documentation, installed by
  ``python3.11-doc`` under ``/usr/share/doc/python3.11/html/_sources/`` (497 ``.txt`` files, about
  12 MB, about 2.8 million SmolLM2 tokens).  Its ``"eval"`` split is *the* evaluation set of the
  library (every committed perplexity), and its ``"calib"`` split the calibration data.
* ``"linuxdoc"``: the reStructuredText sources of the Linux 6.1 kernel documentation, installed by
  ``linux-doc-6.1`` under ``/usr/share/doc/linux-doc-6.1/html/_sources/`` (3,184 ``.rst.txt``
  files, 24 MB).  Extra training text, with its own held-out files.
* ``"pgdocs"``: the PostgreSQL 15 manual, installed by ``postgresql-doc-15`` as DocBook HTML under
  ``/usr/share/doc/postgresql-doc-15/html/`` (1,167 ``.html`` files, 18 MB; ``bookindex.html``, the
  index of terms, is left out).  The text is extracted with the standard library
  (:func:`html_to_text`).  Extra training text, with its own held-out files.

Each folder can be overridden with an environment variable (``ELITEKV_PYDOCS_DIR``,
``ELITEKV_LINUXDOC_DIR``, ``ELITEKV_PGDOCS_DIR``; used on the GPU machine, where the text is
unpacked by hand).  Extra corpora only add training text (and their own evaluation sets): the
default evaluation and calibration sets stay the Python docs', so numbers stay comparable.

The split is fixed and by file, so evaluation text is never trained on:

* every file gets a key, its path relative to the corpus root in POSIX form
  (e.g. ``"library/os.rst.txt"``);
* ``u = int(sha1("elitekv-split-v1:" + key)[:8 bytes]) / 2**64`` is a number in ``[0, 1)`` that
  depends on nothing but the key;
* ``u < 0.10`` puts the file in ``"eval"``, every other file is in ``"train"``;
* ``0.10 <= u < 0.20`` also puts a train file in ``"calib"`` (a subset of ``"train"``, used for
  RoPE-dimension selection and low-rank initialisation).

The extra corpora use the same keys (relative to their own root) and the same hash, with
``u < 0.05`` for ``"eval"`` (their eval sets only need a few hundred thousand tokens) and no
``"calib"`` split.

*Unseen* corpora (:data:`UNSEEN_CORPORA`) measure how much of the original model's general ability survives
conversion: text of other kinds, from Debian packages that nothing here ever trains or calibrates on
(:func:`parse_corpora` refuses them in a training mix), read whole (every file is in ``"eval"``):

* ``"manpages"``: the Linux man-pages project's pages (``manpages``: sections 1, 4-8 in roff, rendered to text
  by :func:`elitekv_demo.text_formats.roff_to_text`);
* ``"gnustandards"``: the GNU Coding Standards and the GNU maintainers' manual as info files
  (``gnu-standards``, :func:`~elitekv_demo.text_formats.info_to_text`);
* ``"fortunes"``: short English prose, quotations and verse (``fortunes``, less its ASCII-art file;
  :func:`~elitekv_demo.text_formats.fortune_to_text`).

Their files are the package's own (``dpkg-query -L``) when read from the Debian folders, which other packages
share; a folder given by the environment variable (the GPU machine's unpacked copy) is read whole.

Debian's ``debian-reference-en`` is reserved and must never be added to any set built here.

Tokenised streams are cached on disk (``$ELITEKV_CACHE`` or ``~/.cache/elitekv_peft``), keyed by
the tokenizer's fingerprint and vocabulary size, the files' contents (and the text extractor, for
HTML) and the split name, since tokenising tens of megabytes on two cores takes a while.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch

from elitekv_peft.training import lm_dataset  # noqa: F401  (re-exported: the demo's windows -> Dataset)

PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
"""Where Debian's ``python3.11-doc`` puts the documentation sources."""

PYDOCS_ENV = "ELITEKV_PYDOCS_DIR"
"""Environment variable that overrides :data:`PYDOCS_ROOT`."""

CACHE_ENV = "ELITEKV_CACHE"
"""Environment variable that overrides the cache folder ``~/.cache/elitekv_peft``."""

EVAL_FRACTION = 0.10
"""Share of files (by hash, not by size) in the ``"eval"`` split."""

CALIB_FRACTION = 0.10
"""Share of all files (taken from ``"train"``) that also form the ``"calib"`` split."""

_SPLIT_SALT = "elitekv-split-v1:"
_TOKEN_CACHE_VERSION = 1


def cache_root() -> Path:
    """Return the folder for cached models and token streams (not created here).

    ``$ELITEKV_CACHE`` if set, else ``~/.cache/elitekv_peft``.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "elitekv_peft"


@dataclass(frozen=True)
class Corpus:
    """A documentation package used as text: where it is, how to read it and how it is split.

    Attributes:
        name: short name used in options (``"pydocs"``, ``"linuxdoc"``, ``"pgdocs"``).
        package: the Debian package that installs it.
        default_root: the folder the package installs the files into.
        env: environment variable that overrides ``default_root``.
        suffix: the files of the corpus are those under the root whose name ends with it.
        text_format: ``"plain"`` (read as is) or ``"html"`` (text extracted by :func:`html_to_text`).
        eval_fraction: share of files (by hash) in its ``"eval"`` split.
        calib_fraction: share of files (taken from ``"train"``) also in its ``"calib"`` split.
        exclude: relative paths (POSIX) left out of the corpus.
        skip_suffixes: files whose name ends with one of these are left out.
        package_files: read from ``default_root``, only the files the package installed (``dpkg-query -L``).
        kind: ``"train"`` (may be trained on) or ``"unseen"`` (evaluation only, never trained on).
    """

    name: str
    package: str
    default_root: Path
    env: str
    suffix: str
    text_format: str
    eval_fraction: float
    calib_fraction: float
    exclude: tuple[str, ...] = ()
    skip_suffixes: tuple[str, ...] = ()
    package_files: bool = False
    kind: str = "train"

    def root(self) -> Path:
        """``$<env>`` if set, else ``default_root`` (not resolved, not checked)."""
        value = os.environ.get(self.env)
        return Path(value).expanduser() if value else self.default_root

    def install_hint(self, root: Path) -> str:
        return (
            f"the {self.name} corpus is not at {root}: install it with `apt-get install -y {self.package}` "
            f"(or `bash scripts/setup.sh`), or point {self.env} at a folder holding it"
        )


LINUXDOC_ROOT = Path("/usr/share/doc/linux-doc-6.1/html/_sources")
"""Where Debian's ``linux-doc-6.1`` puts the kernel documentation's reStructuredText sources."""

PGDOCS_ROOT = Path("/usr/share/doc/postgresql-doc-15/html")
"""Where Debian's ``postgresql-doc-15`` puts the PostgreSQL manual (HTML)."""

CORPORA: dict[str, Corpus] = {
    "pydocs": Corpus(
        "pydocs", "python3.11-doc", PYDOCS_ROOT, PYDOCS_ENV, ".txt", "plain", EVAL_FRACTION, CALIB_FRACTION
    ),
    "linuxdoc": Corpus("linuxdoc", "linux-doc-6.1", LINUXDOC_ROOT, "ELITEKV_LINUXDOC_DIR", ".txt", "plain", 0.05, 0.0),
    "pgdocs": Corpus(
        "pgdocs",
        "postgresql-doc-15",
        PGDOCS_ROOT,
        "ELITEKV_PGDOCS_DIR",
        ".html",
        "html",
        0.05,
        0.0,
        exclude=("bookindex.html",),
    ),
}
"""The corpora by name.  ``"pydocs"`` is the default (its eval and calib splits are the library's)."""

DEFAULT_CORPUS = "pydocs"

UNSEEN_CORPORA: dict[str, Corpus] = {
    "manpages": Corpus(
        "manpages", "manpages", Path("/usr/share/man"), "ELITEKV_MANPAGES_DIR", ".gz", "roff", 1.0, 0.0,
        package_files=True, kind="unseen",
    ),
    "gnustandards": Corpus(
        "gnustandards", "gnu-standards", Path("/usr/share/info"), "ELITEKV_GNUSTANDARDS_DIR", ".info.gz", "info",
        1.0, 0.0, package_files=True, kind="unseen",
    ),
    "fortunes": Corpus(
        "fortunes", "fortunes", Path("/usr/share/games/fortunes"), "ELITEKV_FORTUNES_DIR", "", "fortune", 1.0, 0.0,
        exclude=("ascii-art",), skip_suffixes=(".dat", ".u8"), package_files=True, kind="unseen",
    ),
}  # fmt: skip
"""Evaluation-only corpora of other kinds than the training text (see the module docstring), by name."""

RESERVED_PACKAGES = ("debian-reference",)
"""Text that must never be read into any set (Debian's ``debian-reference-en`` is reserved)."""


def get_corpus(name: str) -> Corpus:
    """The :class:`Corpus` called ``name`` (training or unseen); ``ValueError`` naming the known ones otherwise."""
    corpus = CORPORA.get(name) or UNSEEN_CORPORA.get(name)
    if corpus is None:
        raise ValueError(f"unknown corpus {name!r}: choose from {', '.join([*CORPORA, *UNSEEN_CORPORA])}")
    return corpus


def parse_corpora(value: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a training mix: ``"pydocs,linuxdoc"`` or ``("pydocs", "linuxdoc")`` -> a tuple of names.

    Raises:
        ValueError: empty, unknown or repeated names.
    """
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no corpus given: choose one or more of {', '.join(CORPORA)} (e.g. 'pydocs,linuxdoc')")
    for n in names:
        if get_corpus(n).kind == "unseen":
            raise ValueError(
                f"{n!r} is an unseen evaluation corpus (it measures retention and is never trained on): "
                f"train on {', '.join(CORPORA)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"corpus named twice in {names}")
    return tuple(names)


def default_pydocs_root() -> Path:
    """Return ``$ELITEKV_PYDOCS_DIR`` if set, else :data:`PYDOCS_ROOT`."""
    return CORPORA["pydocs"].root()


def _check_not_reserved(path: Path) -> None:
    for part in path.parts:
        if any(part.startswith(reserved) for reserved in RESERVED_PACKAGES):
            raise ValueError(f"{path} is reserved text ({part}): it must not be used for training or evaluation")


def corpus_files(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """List a corpus's files, sorted by their POSIX path relative to the root.

    Args:
        name: a key of :data:`CORPORA`.
        root: the corpus folder; default ``CORPORA[name].root()`` (environment variable or the
            Debian location).

    Returns:
        Absolute paths of the files under ``root`` whose name ends with the corpus's suffix, less
        its excluded paths.

    Raises:
        FileNotFoundError: the folder is missing or holds no such file (the message names the
            ``apt-get install`` command and the environment variable).
        ValueError: unknown corpus, or a folder of reserved text (``debian-reference``).
    """
    corpus = get_corpus(name)
    root_path = Path(root) if root is not None else corpus.root()
    if not root_path.is_dir():
        raise FileNotFoundError(corpus.install_hint(root_path))
    from_package = corpus.package_files and root_path.resolve() == corpus.default_root.resolve()
    root_path = root_path.resolve()
    _check_not_reserved(root_path)
    candidates = package_file_list(corpus.package, root_path) if from_package else root_path.rglob("*" + corpus.suffix)
    keyed = [(p.relative_to(root_path).as_posix(), p) for p in candidates if p.name.endswith(corpus.suffix)]
    files = [
        p
        for key, p in sorted(keyed)
        if key not in corpus.exclude
        and not p.name.endswith(corpus.skip_suffixes)
        and p.is_file()
        and not p.is_symlink()
    ]
    if not files:
        raise FileNotFoundError(corpus.install_hint(root_path))
    return files


def package_file_list(package: str, root: Path) -> list[Path]:
    """The regular files Debian's ``package`` installed under ``root`` (``dpkg-query -L``); empty when it is not
    installed or there is no dpkg."""
    try:
        done = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False)
    except OSError:
        return []
    if done.returncode != 0:
        return []
    paths = [Path(line) for line in done.stdout.splitlines() if line.startswith("/")]
    return [p for p in paths if p.is_relative_to(root)]


def corpus_splits(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, list[Path]]:
    """The fixed by-file split of a corpus: :func:`split_files` with its root and fractions.

    Returns:
        ``{"train": [...], "eval": [...], "calib": [...]}`` (``"calib"`` is empty for the extra corpora).
    """
    corpus = get_corpus(name)
    root_path = (Path(root) if root is not None else corpus.root()).resolve()
    files = corpus_files(name, root_path)
    return split_files(files, root_path, eval_fraction=corpus.eval_fraction, calib_fraction=corpus.calib_fraction)


def pydocs_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """List the ``.txt`` files of the Python documentation sources, sorted by relative path.

    Args:
        root: the ``_sources`` folder; default :func:`default_pydocs_root`.

    Returns:
        Absolute paths, sorted by their POSIX path relative to ``root`` (497 files for Debian 12's
        ``python3.11-doc``).

    Raises:
        FileNotFoundError: the folder is missing or holds no ``.txt`` file.
    """
    return corpus_files("pydocs", root)


def _split_root(files: Sequence[Path], root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root).resolve()
    default = default_pydocs_root()
    if default.is_dir():
        default = default.resolve()
        if all(p.is_relative_to(default) for p in files):
            return default
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def split_key(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """Return the key a file is split by: its POSIX path relative to ``root``."""
    return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()


def split_unit(key: str) -> float:
    """Map a split key to a number in ``[0, 1)`` by SHA-1 (stable across runs and machines)."""
    digest = hashlib.sha1((_SPLIT_SALT + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(
    files: Iterable[str | os.PathLike[str]],
    root: str | os.PathLike[str] | None = None,
    *,
    eval_fraction: float = EVAL_FRACTION,
    calib_fraction: float = CALIB_FRACTION,
) -> dict[str, list[Path]]:
    """Split files into ``"train"``, ``"eval"`` and ``"calib"`` by a hash of their relative path.

    A file with ``u = split_unit(key)`` is in ``"eval"`` if ``u < eval_fraction``, otherwise in
    ``"train"``; a train file with ``u < eval_fraction + calib_fraction`` is also in ``"calib"``.
    The assignment of a file never depends on which other files are passed, as long as ``root`` is
    the same.

    Args:
        files: the corpus files (e.g. :func:`pydocs_files`).
        root: the folder keys are relative to.  Default: the pydocs root if every file lies under
            it, else the deepest folder holding them all (pass ``root`` for other corpora, so that
            a subset of files keeps its assignment).
        eval_fraction: expected share of files in ``"eval"``.
        calib_fraction: expected share of all files that are also in ``"calib"``.

    Returns:
        ``{"train": [...], "eval": [...], "calib": [...]}``, each list in input order;
        ``"calib"`` is a subset of ``"train"``, ``"train"`` and ``"eval"`` are disjoint.
    """
    if not 0.0 <= eval_fraction <= 1.0 or not 0.0 <= calib_fraction <= 1.0 - eval_fraction:
        raise ValueError(f"bad fractions: eval {eval_fraction}, calib {calib_fraction}")
    paths = [Path(f).resolve() for f in files]
    out: dict[str, list[Path]] = {"train": [], "eval": [], "calib": []}
    if not paths:
        return out
    base = _split_root(paths, root)
    for p in paths:
        u = split_unit(split_key(p, base))
        if u < eval_fraction:
            out["eval"].append(p)
        else:
            out["train"].append(p)
            if u < eval_fraction + calib_fraction:
                out["calib"].append(p)
    return out


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-1 of the tokenizer's full serialisation (fast tokenizers) or of its vocabulary."""
    h = hashlib.sha1()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{tok}\n".encode())
    return h.hexdigest()


_HTML_TEXT_VERSION = 1
"""Bumped whenever :func:`html_to_text` changes its output (part of the token cache key)."""

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
    :func:`html_to_text` for HTML and :data:`elitekv_demo.text_formats.EXTRACTORS` for roff, info and fortune."""
    from .text_formats import EXTRACTORS

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


def _format_version(text_format: str) -> str:
    """The cache-key tag of an extractor's output (``"html1"``, ``"roff1"``, ...)."""
    from .text_formats import FORMAT_VERSIONS

    return f"{text_format}{_HTML_TEXT_VERSION if text_format == 'html' else FORMAT_VERSIONS[text_format]}"


def _separator_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate files with")
    return int(eos)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def token_stream(
    tokenizer: Any,
    files: Sequence[str | os.PathLike[str]],
    *,
    split: str | None = None,
    cache: bool = True,
    batch_files: int = 64,
    text_format: str = "plain",
) -> torch.Tensor:
    """Tokenise the files' texts into one stream, each file followed by the EOS token.

    No BOS or other special tokens are added.  The result is cached on disk under
    ``cache_root()/tokens/`` keyed by the tokenizer (fingerprint and vocabulary size), the separator
    id, the files' contents and, for HTML, the extractor's version; ``split`` only names the cache file.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        files: text files, read as UTF-8 (undecodable bytes replaced), in the given order.
        split: a name for the cache file (e.g. ``"eval"``).
        cache: read and write the on-disk cache.
        batch_files: files given to the tokenizer per call.
        text_format: ``"plain"`` or ``"html"`` (see :func:`read_text`).

    Returns:
        int64 tensor ``[T]`` with ``T`` = total tokens of all files + ``len(files)`` separators.
    """
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format={text_format!r}: choose one of {TEXT_FORMATS}")
    paths = [Path(f) for f in files]
    sep = _separator_id(tokenizer)
    vocab = len(tokenizer)
    key = hashlib.sha1()
    key.update(f"v{_TOKEN_CACHE_VERSION}|{_tokenizer_fingerprint(tokenizer)}|{vocab}|{sep}".encode())
    if text_format != "plain":  # plain keys are those of earlier versions: their caches stay valid
        key.update(f"|{_format_version(text_format)}".encode())
    for p in paths:
        key.update(hashlib.sha1(p.read_bytes()).digest())
    digest = key.hexdigest()[:16]
    name = f"{split or 'files'}-n{len(paths)}-v{vocab}-{digest}.pt"
    cache_file = cache_root() / "tokens" / name
    if cache and cache_file.is_file():
        return torch.load(cache_file, weights_only=True)["tokens"].long()

    pieces: list[torch.Tensor] = []
    sep_t = torch.tensor([sep], dtype=torch.int32)
    for start in range(0, len(paths), batch_files):
        texts = [read_text(p, text_format) for p in paths[start : start + batch_files]]
        enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in enc["input_ids"]:
            pieces.append(torch.tensor(ids, dtype=torch.int32))
            pieces.append(sep_t)
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    if cache:
        _atomic_torch_save({"tokens": stream, "files": len(paths), "vocab": vocab}, cache_file)
    return stream.long()


def windows_from_stream(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream ``[T]`` into non-overlapping windows ``[N, seq_len]``.

    The last ``T % seq_len`` tokens are dropped.  With ``max_windows`` smaller than the number of
    windows ``W = T // seq_len``, windows ``round(linspace(0, W - 1, max_windows))`` are kept, so a
    small evaluation set still spans the whole stream (all files) rather than its first files.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = stream.numel() // seq_len
    win = stream[: n * seq_len].reshape(n, seq_len).long()
    if max_windows is not None and max_windows < n:
        if max_windows <= 0:
            return win[:0]
        idx = torch.linspace(0, n - 1, max_windows, dtype=torch.float64).round().long()
        win = win[idx]
    return win.contiguous()


def token_windows(
    tokenizer: Any,
    files: Sequence[str | os.PathLike[str]],
    seq_len: int,
    max_windows: int | None = None,
    *,
    split: str | None = None,
    cache: bool = True,
    text_format: str = "plain",
) -> torch.Tensor:
    """Tokenise files (EOS between them) and cut the stream into non-overlapping windows.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        files: text files in the order they are concatenated.
        seq_len: tokens per window.
        max_windows: keep at most this many windows, evenly spaced over the stream.
        split: name used in the cache file (e.g. ``"train"``).
        cache: use the on-disk token cache (see :func:`token_stream`).
        text_format: ``"plain"`` or ``"html"`` (see :func:`read_text`).

    Returns:
        LongTensor ``[N, seq_len]``; ``N = min(max_windows, T // seq_len)``.
    """
    stream = token_stream(tokenizer, files, split=split, cache=cache, text_format=text_format)
    return windows_from_stream(stream, seq_len, max_windows)


def corpus_windows(
    tokenizer: Any,
    name: str,
    split: str,
    seq_len: int,
    max_windows: int | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """Windows of one split (``"train"``, ``"eval"`` or ``"calib"``) of one corpus.

    The cache file is named by the split for ``"pydocs"`` (as before corpora existed) and
    ``"<name>-<split>"`` for the others.

    Returns:
        LongTensor ``[N, seq_len]`` (see :func:`token_windows`).
    """
    corpus = get_corpus(name)
    splits = corpus_splits(name, root)
    if split not in splits:
        raise ValueError(f"split={split!r}: choose one of {', '.join(splits)}")
    return token_windows(
        tokenizer,
        splits[split],
        seq_len,
        max_windows,
        split=split if name == DEFAULT_CORPUS else f"{name}-{split}",
        cache=cache,
        text_format=corpus.text_format,
    )


def load_corpus_data(
    tokenizer: Any,
    seq_len: int,
    eval_windows: int | None = None,
    calib_samples: int | None = None,
    *,
    train_corpora: str | Sequence[str] = (DEFAULT_CORPUS,),
    roots: Mapping[str, str | os.PathLike[str]] | None = None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Token windows for calibration, uptraining on a mix of corpora, and evaluation.

    The evaluation and calibration sets are always the Python docs' (``"pydocs"``), whatever the
    mix, so that every perplexity stays comparable; the mix only decides the training text.

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        seq_len: tokens per window.
        eval_windows: at most this many evaluation windows per corpus (evenly spaced).
        calib_samples: at most this many calibration windows.
        train_corpora: the corpora whose ``"train"`` splits are trained on (names of
            :data:`CORPORA`, or a comma list such as ``"pydocs,linuxdoc"``).
        roots: folders per corpus name, overriding the environment variables and Debian paths.
        cache: use the on-disk token cache.

    Returns:
        ``"train"`` ``[N, seq_len]``: the train windows of the corpora, in the order given (each
        corpus cut into windows on its own; the Trainer shuffles them);
        ``"train/<name>"``: each corpus's rows of ``"train"`` (views, no copy);
        ``"eval"`` and ``"calib"``: the Python docs' held-out and calibration windows;
        ``"eval/<name>"``: each corpus's own held-out windows (``"eval/pydocs"`` is ``"eval"``).

    Raises:
        ValueError: an unknown or repeated corpus name.
        FileNotFoundError: a corpus that is not installed (the message names the fix).
    """
    names = parse_corpora(train_corpora)
    roots = dict(roots or {})
    data = {
        "eval": corpus_windows(
            tokenizer, DEFAULT_CORPUS, "eval", seq_len, eval_windows, root=roots.get(DEFAULT_CORPUS), cache=cache
        ),
        "calib": corpus_windows(
            tokenizer, DEFAULT_CORPUS, "calib", seq_len, calib_samples, root=roots.get(DEFAULT_CORPUS), cache=cache
        ),
    }
    parts = [corpus_windows(tokenizer, n, "train", seq_len, root=roots.get(n), cache=cache) for n in names]
    data["train"] = torch.cat(parts) if len(parts) > 1 else parts[0]
    start = 0
    for name, part in zip(names, parts, strict=True):
        data[f"train/{name}"] = data["train"][start : start + len(part)]
        start += len(part)
        if name == DEFAULT_CORPUS:
            data[f"eval/{name}"] = data["eval"]
        else:
            data[f"eval/{name}"] = corpus_windows(
                tokenizer, name, "eval", seq_len, eval_windows, root=roots.get(name), cache=cache
            )
    return data


def unseen_windows(
    tokenizer: Any,
    seq_len: int,
    max_windows: int | None = None,
    *,
    names: Sequence[str] | None = None,
    roots: Mapping[str, str | os.PathLike[str]] | None = None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Evaluation windows of the unseen corpora: ``{name: LongTensor [N, seq_len]}``, ``N <= max_windows`` windows
    evenly spaced over the whole corpus (all its files, in key order, EOS between files).

    Args:
        names: which of :data:`UNSEEN_CORPORA` (default all).
        roots: folders per name, overriding the environment variables and the Debian folders.

    Raises:
        ValueError: a name that is not an unseen corpus.
        FileNotFoundError: a corpus that is not installed (the message names the fix).
    """
    names = list(UNSEEN_CORPORA) if names is None else list(names)
    for n in names:
        if n not in UNSEEN_CORPORA:
            raise ValueError(f"{n!r} is not an unseen corpus: choose from {', '.join(UNSEEN_CORPORA)}")
    roots = dict(roots or {})
    return {
        n: corpus_windows(tokenizer, n, "eval", seq_len, max_windows, root=roots.get(n), cache=cache) for n in names
    }


def retention_eval_sets(
    tokenizer: Any,
    seq_len: int,
    max_windows: int | None = None,
    *,
    names: Sequence[str] | None = None,
    roots: Mapping[str, str | os.PathLike[str]] | None = None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """The retention evaluation sets: ``"indomain"`` (the Python docs' held-out files, as every other table of the
    library) then each unseen corpus (:func:`unseen_windows`); each a LongTensor ``[N, seq_len]``."""
    roots = dict(roots or {})
    indomain = corpus_windows(
        tokenizer, DEFAULT_CORPUS, "eval", seq_len, max_windows, root=roots.get(DEFAULT_CORPUS), cache=cache
    )
    return {
        "indomain": indomain,
        **unseen_windows(tokenizer, seq_len, max_windows, names=names, roots=roots, cache=cache),
    }


def mix_tokens(data: Mapping[str, torch.Tensor], split: str = "train") -> dict[str, int]:
    """Tokens per corpus of a :func:`load_corpus_data` result: ``{name: rows * seq_len}`` for ``split``."""
    prefix = f"{split}/"
    return {key[len(prefix) :]: int(value.numel()) for key, value in data.items() if key.startswith(prefix)}


def synthetic_windows(vocab_size: int, n: int, seq_len: int, seed: int = 0, *, branching: int = 4) -> torch.Tensor:
    """Sample token sequences from a small random Markov chain (learnable, unlike uniform noise).

    Each token ``v`` has ``branching`` random successors ``succ[v]`` (repeats allowed) with random
    probabilities
    ``p[v]`` (a sharp Dirichlet-like draw), so the entropy rate is at most ``log(branching)``
    nats per token, far below ``log(vocab_size)``: a tiny model's loss can go down quickly.
    The chain itself and the samples are both fixed by ``seed``.

    Args:
        vocab_size: tokens are in ``[0, vocab_size)``.
        n: number of sequences.
        seq_len: tokens per sequence.
        seed: seed of a private ``torch.Generator`` (the global RNG is untouched).
        branching: successors per token (at least 1).

    Returns:
        LongTensor ``[n, seq_len]``.
    """
    if vocab_size < 2 or n < 0 or seq_len < 1 or branching < 1:
        raise ValueError(f"bad arguments: vocab_size={vocab_size} n={n} seq_len={seq_len} branching={branching}")
    g = torch.Generator().manual_seed(seed)
    k = min(branching, vocab_size)
    succ = torch.randint(0, vocab_size, (vocab_size, k), generator=g)  # [V, k] successors
    weights = torch.rand(vocab_size, k, generator=g) ** 3 + 1e-3  # [V, k], uneven
    probs = weights / weights.sum(dim=1, keepdim=True)
    out = torch.empty(n, seq_len, dtype=torch.long)
    if n == 0:
        return out
    cur = torch.randint(0, vocab_size, (n,), generator=g)
    out[:, 0] = cur
    for t in range(1, seq_len):
        choice = torch.multinomial(probs[cur], 1, generator=g).squeeze(1)  # [n]
        cur = succ[cur, choice]
        out[:, t] = cur
    return out
