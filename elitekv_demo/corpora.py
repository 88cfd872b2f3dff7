"""The Debian documentation corpora: where their files are, which files each holds and the fixed by-file split.

Real text comes from Debian documentation packages, each a *corpus* (:data:`CORPORA`):

* ``"pydocs"``: the reStructuredText sources of the Python 3.11 documentation, installed by
  ``python3.11-doc`` under ``/usr/share/doc/python3.11/html/_sources/`` (497 ``.txt`` files, about
  12 MB).  Its ``"eval"`` split is *the* evaluation set of the
  library (every committed perplexity), and its ``"calib"`` split the calibration data.
* ``"linuxdoc"``: the reStructuredText sources of the Linux 6.1 kernel documentation, installed by
  ``linux-doc-6.1`` under ``/usr/share/doc/linux-doc-6.1/html/_sources/`` (3,184 ``.rst.txt``
  files, 24 MB).  Extra training text, with its own held-out files.
* ``"pgdocs"``: the PostgreSQL 15 manual, installed by ``postgresql-doc-15`` as DocBook HTML under
  ``/usr/share/doc/postgresql-doc-15/html/`` (1,167 ``.html`` files, 18 MB; ``bookindex.html``, the
  index of terms, is left out).  The text is extracted with the standard library
  (:func:`~elitekv_demo.text_formats.html_to_text`).  Extra training text, with its own held-out files.

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

Text extraction is :mod:`elitekv_demo.text_formats`; tokenisation and windows are :mod:`elitekv_demo.tokens`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
        text_format: how :func:`elitekv_demo.text_formats.read_text` reads a file: ``"plain"`` (as is), ``"html"``,
            ``"roff"``, ``"info"`` or ``"fortune"``.
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
        if n in UNSEEN_CORPORA:
            raise ValueError(
                f"{n!r} is an unseen evaluation corpus (it measures retention and is never trained on): "
                f"train on {', '.join(CORPORA)}"
            )
        if n not in CORPORA:
            raise ValueError(f"unknown training corpus {n!r}: choose from {', '.join(CORPORA)}")
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
