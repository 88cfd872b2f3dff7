"""The user's text for ``elitekv convert`` / ``elitekv eval``: local files or folders, or a `datasets` name.

``DATA`` is one or more ``.txt`` / ``.jsonl`` (``.json``) / ``.parquet`` files or folders of them (searched
recursively), or the name of a dataset that `datasets.load_dataset` knows (``"org/name"``, with ``--data-config``
and ``--data-split``). Everything is read with `datasets.load_dataset` (``text`` / ``json`` / ``parquet``
builders), tokenised with `datasets.Dataset.map` and cut into windows with TRL's `trl.pack_dataset`.

Held-out text for evaluation is never trained on:

* several files: the split is by file. A file goes to evaluation when ``sha1(salt + its path relative to the
  files' common folder)`` maps below ``eval_fraction`` (at least one file, and at least one file stays for
  training), so a file keeps its side whatever other files of the same common folder are passed (another common
  folder changes the keys: `elitekv eval --held-out` refuses data other than what `convert` recorded);
* one file or a dataset name: the split is by document (a line of ``.jsonl``, a row of ``.parquet``, a blank-line
  separated paragraph of a single ``.txt``), with `datasets.Dataset.train_test_split` and a fixed seed.

Calibration windows are a seeded sample of the training windows unless calibration text is given.

`resolve_data` only looks at the file system (standard library), so the command line can check ``DATA`` before
anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    import torch

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""File suffix -> the `datasets` builder that reads it."""

EVAL_FRACTION = 0.1
"""Expected share of files (or documents) held out for evaluation."""

_SPLIT_SALT = "elitekv-user-split-v1:"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SUFFIXES = "/".join(BUILDERS)


class DataError(ValueError):
    """``DATA`` cannot be used; the message names the fix."""


@dataclass(frozen=True)
class DataSource:
    """Where the text comes from: local ``files`` (sorted, resolved) or a `datasets` ``hub_name``."""

    files: tuple[Path, ...] = ()
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"

    @property
    def label(self) -> str:
        """Short description for logs, the summary and the model card."""
        if self.hub_name is not None:
            return f"{self.hub_name}" + (f" ({self.hub_config})" if self.hub_config else "") + f" [{self.hub_split}]"
        if len(self.files) == 1:
            return self.files[0].name
        return f"{len(self.files)} files under {common_folder(self.files)}"


def common_folder(files: Sequence[Path]) -> Path:
    """The deepest folder holding all ``files``."""
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def resolve_data(values: Sequence[str], *, hub_config: str | None = None, hub_split: str = "train") -> DataSource:
    """Turn ``--data`` values into a `DataSource` (standard library only; raises `DataError` naming the fix).

    A value that exists on disk is a file or a folder; one that does not and looks like a path (it has a
    supported suffix, starts with ``.``, ``/`` or ``~``, or there are several values) is reported missing; any
    other is taken as a `datasets` name.
    """
    if not values:
        raise DataError("--data is required: give .txt/.jsonl/.parquet files or folders, or a datasets name")
    files: list[Path] = []
    for value in values:
        path = Path(value).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
            if not found:
                raise DataError(f"--data {value}: the folder holds no {_SUFFIXES} files; put text files in it")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in BUILDERS:
                raise DataError(
                    f"--data {value}: {path.suffix or 'a file without suffix'} is not supported; give {_SUFFIXES} "
                    "files (one document per line of .jsonl, with the text in --text-field)"
                )
            files.append(path)
        elif len(values) > 1 or path.suffix.lower() in BUILDERS or value.startswith((".", "/", "~")):
            raise DataError(f"--data {value}: no such file or folder; check the path")
        elif _HUB_NAME.match(value):
            return DataSource(hub_name=value, hub_config=hub_config, hub_split=hub_split)
        else:
            raise DataError(f"--data {value}: not a file, a folder or a datasets name such as 'org/name'")
    unique = sorted({p.resolve() for p in files})
    return DataSource(files=tuple(unique))


def check_text_field(source: DataSource, text_field: str) -> None:
    """Read each local file once, before anything heavy: raise `DataError` naming the file, the line (or row) and
    the fix for text that is not UTF-8, a line that is not a JSON object, a record whose ``text_field`` is missing or
    not a string (which `datasets` would crash on or drop silently), or files that are all empty (an empty file
    among others holds nothing to lose and is skipped)."""
    empty = []
    for path in source.files:
        if path.suffix.lower() == ".parquet":
            _check_parquet(path, text_field)
        elif not _check_lines(path, None if path.suffix.lower() == ".txt" else text_field):
            empty.append(path)
    if empty and len(empty) == len(source.files):
        raise DataError(f"{', '.join(map(str, empty))} is empty: remove the empty file or put text in it")


def _check_lines(path: Path, field: str | None) -> bool:
    """UTF-8; with ``field`` (JSON lines) each non-blank line an object with a string ``field``. Returns whether
    the file holds anything (a JSON document that `datasets` must read counts)."""
    records = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if number == 1 else "")
            except UnicodeDecodeError as error:
                kind = "UTF-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "not UTF-8"
                raise DataError(
                    f"{path}, line {number}: {kind} text ({error.reason} at byte {error.start} of the line): re-encode "
                    f"the file as UTF-8 (e.g. `iconv -f {kind.replace('not UTF-8', 'LATIN1')} -t UTF-8 FILE > NEW`)"
                ) from None
            if field is not None and line.strip():
                if records == 0 and path.suffix.lower() == ".json":
                    try:
                        json.loads(line)
                    except ValueError:  # a JSON document, not JSON lines: `datasets` reads it (errors: load_documents)
                        return True
                _check_record(path, number, line, field)
                records += 1
    return records > 0 if field is not None else path.stat().st_size > 0


def _check_record(path: Path, number: int, line: str, field: str) -> None:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise DataError(f"{path}, line {number}: not valid JSON ({error}): fix the line (one JSON object)") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: each line must be a JSON object with a text field, got {line[:60]!r}")
    if field not in record:
        raise DataError(
            f"{path}, line {number} has no field {field!r} (it has {', '.join(map(repr, record)) or 'none'}): pass "
            "--text-field NAME, or fix the line"
        )
    if not isinstance(record[field], str):
        found = "null" if record[field] is None else f"{type(record[field]).__name__} {json.dumps(record[field])[:40]}"
        raise DataError(
            f"{path}, line {number}: field {field!r} is {found}, not a string: put the text there as a JSON string "
            "or drop the line, or pass --text-field NAME"
        )


def _check_parquet(path: Path, field: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fields = pq.read_schema(path).names
    if field not in fields:
        found = ", ".join(map(repr, fields))
        raise DataError(f"{path} has no field {field!r} (it has {found}): pass --text-field NAME")
    column = pq.read_table(path, columns=[field]).column(field)
    if column.type not in (pa.string(), pa.large_string()):
        raise DataError(f"{path}: column {field!r} holds {column.type}, not text: pass --text-field NAME (of text)")
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise DataError(
            f"{path}, row {row} (from 0): {field!r} is null ({column.null_count} rows are): fill or drop those rows"
        )


def split_unit(key: str) -> float:
    """A number in ``[0, 1)`` from a file key by SHA-1, the same on every run and machine."""
    digest = hashlib.sha1((_SPLIT_SALT + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(files: Sequence[Path], eval_fraction: float = EVAL_FRACTION) -> tuple[list[Path], list[Path]]:
    """``(train, eval)`` files of two or more: by the hash of each path relative to their common folder.

    At least one file is held out and at least one is trained on (the lowest / highest hash decide then)."""
    if len(files) < 2:
        raise ValueError("split_files needs two files or more (one file is split by document)")
    root = common_folder(files)
    units = {p: split_unit(p.relative_to(root).as_posix()) for p in files}
    held = [p for p in files if units[p] < eval_fraction]
    if not held:
        held = [min(files, key=units.__getitem__)]
    if len(held) == len(files):
        held.remove(max(files, key=units.__getitem__))
    return [p for p in files if p not in held], held


def load_documents(
    files: Sequence[Path] = (), *, source: DataSource | None = None, text_field: str = "text", by_file: bool = True
) -> datasets.Dataset:
    """One ``text`` column, one row per document, from local ``files`` or from ``source.hub_name``.

    ``.txt`` files give one document per file (``by_file``) or per blank-line separated paragraph; ``.jsonl``
    and ``.parquet`` one per row. Empty documents are dropped. Raises `DataError` naming the fix."""
    import datasets

    if source is not None and source.hub_name is not None:
        try:
            table = datasets.load_dataset(source.hub_name, source.hub_config, split=source.hub_split)
        except Exception as error:  # offline, unknown name, gated, bad config or split: all end here
            raise DataError(
                f"could not load the dataset {source.hub_name!r} with `datasets` ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); without a reachable Hub, pass local "
                f"{_SUFFIXES} files instead"
            ) from error
        parts = [_text_column(table, text_field, source.hub_name)]
    else:
        parts = []
        for builder in dict.fromkeys(BUILDERS[p.suffix.lower()] for p in files):
            group = [str(p) for p in files if BUILDERS[p.suffix.lower()] == builder]
            extra = {"sample_by": "document" if by_file else "paragraph"} if builder == "text" else {}
            try:
                table = datasets.load_dataset(builder, data_files=group, split="train", **extra)
            except Exception as error:  # DatasetGenerationError (a JSON document, a file changed since the check)
                cause = error.__cause__ or error
                reason = (str(cause).splitlines() or [""])[0]
                raise DataError(
                    f"could not read {', '.join(group)} ({type(cause).__name__}: {reason}): "
                    "give UTF-8 text files, .jsonl with one JSON object a line, or fix or remove that file"
                ) from error
            parts.append(_text_column(table, text_field if builder != "text" else "text", group[0]))
    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True, desc="documents")


def _text_column(table: datasets.Dataset, field: str, where: str) -> datasets.Dataset:
    if field not in table.column_names:
        raise DataError(f"{where} has no field {field!r} (it has {table.column_names}): pass --text-field NAME")
    if getattr(table.features[field], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{where}: {field!r} holds {table.features[field]}, not text: pass --text-field NAME")
    table = table.select_columns([field])
    return table.rename_column(field, "text") if field != "text" else table


def tokenize_windows(docs: datasets.Dataset, tokenizer: Any, seq_len: int, name: str) -> datasets.Dataset:
    """Windows of ``seq_len`` tokens (column ``input_ids``), documents joined by the EOS token.

    Tokenised with `datasets.Dataset.map` (no special tokens added, EOS after each document) and packed with
    `trl.pack_dataset` (``"wrapped"``) in one batch, so the windows cut the joined stream of all documents and only
    its last, short window is dropped."""
    from trl import pack_dataset

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents; give a model whose tokenizer has one")

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"input_ids": [row + [eos] for row in ids]}

    tokens = docs.map(encode, batched=True, remove_columns=docs.column_names, desc=f"tokenising {name}")
    packing = {"batch_size": None, "desc": f"packing {name}"}
    packed = pack_dataset(tokens, seq_len, strategy="wrapped", map_kwargs=packing)
    return packed.filter(lambda batch: [len(r) == seq_len for r in batch["input_ids"]], batched=True, desc=name)


def spaced(windows: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """At most ``limit`` rows, evenly spaced (a small evaluation set still spans all the held-out text)."""
    n = len(windows)
    if limit is None or limit >= n:
        return windows
    if limit <= 1:
        return windows.select(range(min(n, max(limit, 0))))
    return windows.select([round(i * (n - 1) / (limit - 1)) for i in range(limit)])


def as_tensor(windows: datasets.Dataset) -> torch.Tensor:
    """``input_ids`` of the windows as a LongTensor ``[N, seq_len]``."""
    import torch

    return torch.tensor(windows["input_ids"], dtype=torch.long).reshape(len(windows), -1)


def load_user_data(
    source: DataSource,
    tokenizer: Any,
    seq_len: int,
    *,
    eval_windows: int | None,
    calib_samples: int,
    text_field: str = "text",
    eval_source: DataSource | None = None,
    calib_source: DataSource | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, evaluation and calibration windows of ``seq_len`` tokens from the user's text.

    Returns:
        ``"train"``: a `datasets.Dataset` of windows with ``input_ids`` and ``labels`` (for the Trainer);
        ``"eval"`` ``[N_eval, seq_len]`` and ``"calib"`` ``[N_calib, seq_len]`` LongTensors;
        ``"info"``: how the text was split (files or documents per side, train tokens).

    Raises:
        DataError: too little text for one window on a side, or a missing text field (the message names the fix).
    """
    train_docs, eval_docs, info = split_documents(source, text_field, eval_source, seed)
    train = tokenize_windows(train_docs, tokenizer, seq_len, "train")
    held_out = tokenize_windows(eval_docs, tokenizer, seq_len, "held-out")
    for name, windows in (("training", train), ("held-out", held_out)):
        if len(windows) == 0:
            raise DataError(
                f"the {name} text of --data {source.label} is shorter than one window of {seq_len} tokens; give more "
                "text or a smaller --seq-len"
            )
    if calib_source is not None:
        calib_windows = tokenize_windows(_documents(calib_source, text_field), tokenizer, seq_len, "calibration")
        if len(calib_windows) == 0:
            raise DataError(f"--calib-data {calib_source.label} is shorter than one window of {seq_len} tokens")
    else:
        calib_windows = train.shuffle(seed=seed)
    calib = as_tensor(calib_windows.select(range(min(calib_samples, len(calib_windows)))))
    evaluation = as_tensor(spaced(held_out, eval_windows))
    train = train.map(lambda batch: {"labels": batch["input_ids"]}, batched=True, desc="labels")
    info.update(train_tokens=len(train) * seq_len, eval_tokens=int(evaluation.numel()), calib_tokens=int(calib.numel()))
    return {"train": train.with_format("torch"), "eval": evaluation, "calib": calib, "info": info}


def split_documents(
    source: DataSource, text_field: str = "text", eval_source: DataSource | None = None, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset, dict[str, Any]]:
    """``(train, held_out, info)`` documents of ``source``: by file for several files, else by document (seeded);
    all of ``source`` for training when ``eval_source`` is given."""
    info: dict[str, Any] = {"data": source.label}
    if eval_source is not None:
        train_docs = _documents(source, text_field)
        eval_docs = _documents(eval_source, text_field)
        info["split"] = f"held-out text: {eval_source.label}"
    elif len(source.files) > 1:
        train_files, eval_files = split_files(list(source.files))
        train_docs = load_documents(train_files, text_field=text_field)
        eval_docs = load_documents(eval_files, text_field=text_field)
        info["split"] = f"by file: {len(train_files)} train, {len(eval_files)} held out"
        info["eval_files"] = [str(p) for p in eval_files]
    else:
        docs = _documents(source, text_field)
        if len(docs) < 2:
            raise DataError(
                f"--data {source.label} holds {len(docs)} document(s); a held-out split needs two or more (several "
                "files, several lines of .jsonl, or blank-line separated paragraphs), or pass --eval-data"
            )
        parts = docs.train_test_split(test_size=max(1, math.floor(EVAL_FRACTION * len(docs))), seed=seed)
        train_docs, eval_docs = parts["train"], parts["test"]
        info["split"] = f"by document: {len(train_docs)} train, {len(eval_docs)} held out"
    return train_docs, eval_docs, info


def held_out_windows(
    source: DataSource, tokenizer: Any, seq_len: int, max_windows: int | None, text_field: str = "text", seed: int = 0
) -> torch.Tensor:
    """The evaluation windows ``[N, seq_len]`` that `load_user_data` makes for ``source`` (same split and seed)."""
    _, eval_docs, _ = split_documents(source, text_field, seed=seed)
    windows = tokenize_windows(eval_docs, tokenizer, seq_len, "held-out")
    if len(windows) == 0:
        message = f"the held-out text of --data {source.label} is shorter than one window of {seq_len} tokens"
        raise DataError(f"{message}; give a smaller --seq-len (the conversion's is in its summary.json) or more text")
    return as_tensor(spaced(windows, max_windows))


def evaluation_windows(
    source: DataSource, tokenizer: Any, seq_len: int, max_windows: int | None, text_field: str = "text"
) -> torch.Tensor:
    """Windows ``[N, seq_len]`` of all of ``source`` (``elitekv eval``), at most ``max_windows``, evenly spaced."""
    windows = tokenize_windows(_documents(source, text_field), tokenizer, seq_len, "evaluation")
    if len(windows) == 0:
        raise DataError(
            f"--data {source.label} is shorter than one window of {seq_len} tokens; give a smaller --seq-len"
        )
    return as_tensor(spaced(windows, max_windows))


def _documents(source: DataSource, text_field: str) -> datasets.Dataset:
    if source.hub_name is not None:
        return load_documents(source=source, text_field=text_field)
    return load_documents(list(source.files), text_field=text_field, by_file=len(source.files) > 1)
