"""Bad input to ``elitekv`` fails early with exit status 2 and a message naming the fix, and nothing is lost.

Records a ``.jsonl`` / ``.parquet`` file cannot use, text that is not UTF-8, outputs that cannot be written, the
held-out split of a converted folder, devices this machine lacks, uptraining flags with ``--loss none``, windows
of one token, an empty prompt, and a model folder without weights. The tiny model and text are those of
`tests.test_cli`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from elitekv_peft.cli import main
from elitekv_peft.user_data import check_text_field, resolve_data
from tests.test_cli import documents, save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny model folder of `tests.test_cli` and a .jsonl file of 60 documents (``text`` field)."""
    root = tmp_path_factory.mktemp("cli-inputs")
    texts = documents(60)
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return {"root": root, "model": save_tiny_model(root / "tiny-llama", texts), "jsonl": jsonl, "texts": texts}


def exits_2(argv: list[str], capsys, within: float = 60.0) -> str:
    """Run ``elitekv ARGV`` in-process; it must exit with status 2, quickly and without a traceback: the message."""
    started = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert time.perf_counter() - started < within
    return err


def write_parquet(path: Path, column: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), path)
    return path


def jsonl_lines(texts: list[str], bad: dict[int, str]) -> bytes:
    """JSON lines of ``texts`` with the 1-based lines in ``bad`` replaced."""
    lines = [bad.get(i + 1, json.dumps({"text": t})) for i, t in enumerate(texts[:10])]
    return ("\n".join(lines) + "\n").encode()


BAD_RECORDS = {
    "missing field on line 3": (
        "d.jsonl",
        {3: json.dumps({"body": "x"})},
        "line 3 has no field 'text' (it has 'body')",
    ),
    "null text": ("d.jsonl", {2: json.dumps({"text": None})}, "line 2: field 'text' is null, not a string"),
    "int text": ("d.jsonl", {4: json.dumps({"text": 12345})}, "line 4: field 'text' is int 12345, not a string"),
    "token ids": ("d.jsonl", {1: json.dumps({"text": [1, 2, 3]})}, "line 1: field 'text' is list [1, 2, 3]"),
    "invalid JSON": ("d.jsonl", {5: '{"text": "unterminated'}, "line 5: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_every_jsonl_record_is_checked(tiny, tmp_path, capsys, case):
    """A record past the first that `datasets` would drop silently or crash on: the file, the line and the fix."""
    name, bad, message = BAD_RECORDS[case]
    path = tmp_path / name
    path.write_bytes(jsonl_lines(tiny["texts"], bad))
    err = exits_2(["eval", str(tiny["model"]), "--data", str(path), "--device", "cpu"], capsys)
    assert f"{path}, " in err and message in err, err
    assert "--text-field NAME" in err or "fix the line" in err


def test_text_that_is_not_utf8_or_empty_names_the_file_and_the_fix(tiny, tmp_path, capsys):
    text = "\n\n".join(tiny["texts"])
    cases = {
        "latin1.txt": (text + "\n\ncaf\xe9 r\xe9sum\xe9\n").encode("latin-1"),
        "utf16.txt": text.encode("utf-16"),
        "empty.txt": b"",
    }
    expected = {"latin1.txt": "not UTF-8", "utf16.txt": "UTF-16 text", "empty.txt": "is empty: remove the empty file"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        err = exits_2(["eval", str(tiny["model"]), "--data", str(tmp_path / name), "--device", "cpu"], capsys)
        assert str(tmp_path / name) in err and expected[name] in err, err
        assert "re-encode the file as UTF-8" in err or name == "empty.txt"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    (folder / "b.txt").write_text("")
    check_text_field(resolve_data([str(folder)]), "text")  # an empty file among others holds nothing: skipped


def test_parquet_text_that_is_not_text_or_null(tiny, tmp_path, capsys):
    numbers = write_parquet(tmp_path / "n.parquet", list(range(20)))
    err = exits_2(["eval", str(tiny["model"]), "--data", str(numbers), "--device", "cpu"], capsys)
    assert "column 'text' holds int64, not text: pass --text-field NAME" in err, err
    nulls = write_parquet(tmp_path / "z.parquet", [tiny["texts"][0], None, tiny["texts"][2]])
    err = exits_2(["eval", str(tiny["model"]), "--data", str(nulls), "--device", "cpu"], capsys)
    assert f"{nulls}, row 1 (from 0): 'text' is null" in err, err


def test_outputs_that_cannot_be_written_are_refused_up_front(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    convert = ["convert", str(tiny["model"]), "--data", str(tiny["jsonl"]), "--device", "cpu"]
    err = exits_2([*convert, "--output-dir", str(afile / "sub" / "deeper")], capsys, within=5)
    assert f"{afile} is a file, not a folder" in err, err
    evaluate = ["eval", str(tiny["model"]), "--data", str(tiny["jsonl"]), "--device", "cpu", "--json"]
    err = exits_2([*evaluate, str(tmp_path)], capsys, within=5)
    assert f"--json {tmp_path} is a folder; give a file name" in err, err
    err = exits_2([*evaluate, str(tmp_path / "nodir" / "x.json")], capsys, within=5)
    assert "does not exist; create it" in err, err
    err = exits_2(["inspect", str(tiny["model"]), "--out", str(afile)], capsys, within=5)
    assert f"--out {afile} is a file; give a folder" in err, err
    assert afile.read_text() == "mine"


def fake_conversion(tiny, folder: Path, seed: int, data: str, split: str = "by document: 54 train, 6 held out") -> Path:
    """The tiny model with the summary.json `convert` writes (the parts `eval --held-out` reads)."""
    shutil.copytree(tiny["model"], folder)
    summary = {"settings": {"seed": seed, "kv_ratio": 1.0}, "data": {"data": data, "split": split}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_held_out_uses_the_seed_and_data_convert_recorded(tiny, tmp_path, capsys):
    """``--held-out`` on a folder converted with ``--seed 1`` splits with seed 1 (as the original with ``--seed 1``);
    another seed, other data, or a conversion evaluated on --eval-data is refused."""
    converted = fake_conversion(tiny, tmp_path / "seed1", 1, "docs.jsonl")
    args = ["--data", str(tiny["jsonl"]), "--held-out", "--seq-len", "64", "--device", "cpu", "--json"]
    results = {}
    for name, model, extra in (("recorded", converted, []), ("seed 1", tiny["model"], ["--seed", "1"])):
        assert main(["eval", str(model), *args, str(tmp_path / f"{name}.json"), *extra]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["recorded"]["seed"] == 1 and results["recorded"]["perplexity"] == results["seed 1"]["perplexity"]
    err = exits_2(["eval", str(converted), *args, str(tmp_path / "x.json"), "--seed", "0"], capsys)
    assert "--seed 0:" in err and "converted with --seed 1" in err and "pass --seed 1" in err, err
    other = fake_conversion(tiny, tmp_path / "other", 0, "other.jsonl")
    err = exits_2(["eval", str(other), *args, str(tmp_path / "x.json")], capsys)
    assert "was converted on other.jsonl, not docs.jsonl" in err and "drop --held-out" in err, err
    separate = fake_conversion(tiny, tmp_path / "separate", 0, "docs.jsonl", "held-out text: eval.txt")
    err = exits_2(["eval", str(separate), *args, str(tmp_path / "x.json")], capsys)
    assert "evaluated on separate text" in err, err


def test_devices_this_machine_lacks_are_refused_up_front(tiny, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["eval", str(tiny["model"]), "--data", str(tiny["jsonl"]), "--device"]
    err = exits_2([*argv, "cuda"], capsys, within=20)
    assert "--device cuda:" in err and "use --device cpu, or install a CUDA build of torch" in err, err
    err = exits_2([*argv, "gpu"], capsys, within=20)
    assert "--device gpu: not a device name; give cpu, cuda or cuda:N" in err, err


LOSS_NONE = [
    (["--train-tokens", "4096"], "--train-tokens: uptraining flags, and --loss none trains nothing"),
    (["--lr", "1e-3", "--batch-size", "2"], "--batch-size, --lr: uptraining flags"),
    (["--grad-accum", "2", "--latent-lr-ratio", "2"], "--grad-accum, --latent-lr-ratio: uptraining flags"),
]


@pytest.mark.parametrize(("extra", "message"), LOSS_NONE, ids=[" ".join(e) for e, _ in LOSS_NONE])
def test_uptraining_flags_with_loss_none_are_refused(tiny, tmp_path, capsys, extra, message):
    argv = ["convert", str(tiny["model"]), "--data", str(tiny["jsonl"]), "--output-dir", str(tmp_path / "o")]
    err = exits_2([*argv, "--loss", "none", *extra], capsys, within=5)
    assert message in err and "choose --loss distill or --loss lm" in err, err
    assert not (tmp_path / "o").exists()


def test_one_token_windows_and_empty_prompts_are_refused_up_front(tiny, capsys):
    err = exits_2(["eval", str(tiny["model"]), "--data", str(tiny["jsonl"]), "--seq-len", "1"], capsys, within=5)
    assert "--seq-len 1: a window needs at least 2 tokens" in err, err
    err = exits_2(["generate", str(tiny["model"]), "", "--no-chat-template", "--device", "cpu"], capsys, within=5)
    assert "PROMPT is empty" in err, err


def test_seq_len_beyond_the_models_positions_is_refused_up_front(tiny, tmp_path, capsys):
    limit = json.loads((tiny["model"] / "config.json").read_text())["max_position_embeddings"]
    longer = ["--seq-len", str(limit + 1)]
    expected = f"--seq-len {limit + 1} is longer than the model's max_position_embeddings {limit}"
    err = exits_2(["eval", str(tiny["model"]), "--data", str(tiny["jsonl"]), *longer], capsys, within=10)
    assert expected in err, err
    convert = ["convert", str(tiny["model"]), "--data", str(tiny["jsonl"]), "--output-dir", str(tmp_path / "out")]
    err = exits_2([*convert, "--loss", "none", *longer], capsys, within=10)
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_model_folder_without_weights_names_what_is_missing(tiny, tmp_path, capsys):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny["model"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    argv = ["convert", str(folder), "--data", str(tiny["jsonl"]), "--output-dir", str(tmp_path / "o"), "--device"]
    err = exits_2([*argv, "cpu"], capsys, within=20)
    assert "holds config.json but no weights (model*.safetensors or pytorch_model*.bin)" in err, err
