"""Issue 6: `elitekv inspect`, the persisted calibration errors, the model card and `push_to_hub` (no network)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel

import elitekv_demo.testing
import elitekv_peft
from elitekv_peft.cli import main
from elitekv_peft.inspection import cache_breakdown, read_artifact

from .tiny import convert, tiny_model

PNGS = {"chunk_choices.png", "cache_breakdown.png", "calibration_errors.png"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact")
    model = convert(tiny_model("llama_gqa", layers=3), kv_ratio=0.25)
    model.peft_config["default"].base_model_name_or_path = "org/tiny-llama"
    elitekv_peft.record_training(model, 16_384, dataset="synthetic")
    elitekv_peft.record_evaluation(model, 41.5, dataset="synthetic", split="eval", tokens=2048)
    elitekv_peft.record_evaluation(model, 40.25, dataset="synthetic", split="eval", tokens=2048)  # replaces
    report = model.base_model.conversion_report
    model.save_pretrained(path)
    return path, report


def test_calibration_errors_are_saved_with_the_adapter(saved):
    path, report = saved
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert adapter["report"]["selection_errors"] == report.selection_errors
    assert adapter["report"]["lowrank_errors"] == report.lowrank_errors
    assert len(adapter["report"]["selection_errors"]) == 3 and len(adapter["report"]["selection_errors"][0]) == 2
    assert all(0 < e < 1 for e in adapter["report"]["lowrank_errors"])
    standalone = json.loads((path / "config.json").read_text())
    assert standalone["elitekv"]["report"]["lowrank_errors"] == adapter["report"]["lowrank_errors"]


def test_cli_inspect_writes_the_pngs_next_to_the_artifact(saved, capsys):
    path, _ = saved
    assert main(["inspect", str(path)]) == 0
    for name in PNGS:
        assert (path / name).stat().st_size > 2000, name
    out = capsys.readouterr().out
    assert "3 layers, 2 KV heads of dim 32, r = 2" in out and "calibration_errors" in out


def test_cli_inspect_out_dir_and_standalone_folder(saved, tmp_path):
    path, _ = saved
    standalone = tmp_path / "standalone"
    standalone.mkdir()
    for name in ("config.json",):  # a standalone model folder without the adapter files
        (standalone / name).write_text((path / name).read_text())
    assert main(["inspect", str(standalone), "--out", str(tmp_path / "pictures")]) == 0
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == PNGS
    assert not any(p.suffix == ".png" for p in standalone.iterdir())


def test_cli_inspect_bad_folder_exits_with_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "does not exist; pass the folder written by `model.save_pretrained" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "other")])
    assert "holds no converted EliteKV model" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["adapter", "standalone"])
def test_cli_inspect_names_the_method_of_another_methods_folder(tmp_path, capsys, layout):
    folder = tmp_path / "lorc"
    folder.mkdir()
    if layout == "adapter":
        config = {"peft_type": "ELITEKV", "method": "lorc", "chunk_indices": None}
        (folder / "adapter_config.json").write_text(json.dumps(config))
    else:
        (folder / "config.json").write_text(json.dumps({"elitekv": {"method": "lorc"}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "converted with method='lorc'" in err and "elitekv eval" in err


def test_cache_breakdown_adds_up(saved):
    path, _ = saved
    info = read_artifact(path)
    parts = cache_breakdown(info.chunk_indices, info.latent_dims, info.num_kv_heads, info.head_dim, 4)
    for rotated, latent, original in zip(parts["rotated"], parts["latent"], parts["original"], strict=True):
        assert rotated == 2 * 2 * 2 * 4  # G=2 heads x 2r=4 values x 4 bytes
        assert (rotated + latent) / original == pytest.approx(0.25)


def test_model_card_holds_hub_metadata_and_recorded_results(saved):
    path, _ = saved
    card = ModelCard.load(path / "README.md")
    data = card.data
    assert data.base_model == "org/tiny-llama" and data.library_name == "transformers"
    assert {"elitekv", "peft"} <= set(data.tags)
    settings = data.to_dict()["elitekv"]
    assert settings["method"] == "elitekv" and settings["kv_ratio"] == 0.25 and settings["rope_chunks"] == 2
    assert settings["latent_dim"] == 24 and settings["training_tokens"] == 16_384
    assert len(data.eval_results) == 1  # the second record replaced the first
    result = data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("perplexity", 40.25, "eval")
    assert "| uptraining tokens | 16,384 (synthetic) |" in card.text and "| perplexity | 40.25 |" in card.text


def test_model_card_without_evaluation_says_so(tmp_path):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.5)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results is None and "No evaluation was recorded" in card.text
    assert "not recorded" in card.text


def test_report_survives_reloading_and_resaving(saved, tmp_path):
    path, _ = saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_model("llama_gqa", layers=3), path)
    loaded.save_pretrained(tmp_path)
    before = json.loads((path / "adapter_config.json").read_text())["report"]
    after = json.loads((tmp_path / "adapter_config.json").read_text())["report"]
    assert before == after and math.isfinite(after["evaluations"][0]["value"])


def test_push_to_hub_uploads_the_full_folder(monkeypatch):
    seen: dict[str, object] = {}

    class Repo:
        repo_id = "me/tiny-elitekv"

    def fake_create_repo(self, repo_id, **kwargs):
        seen["repo"] = repo_id
        return Repo()

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        seen["files"] = {p.name for p in folder.iterdir()}
        seen["card"] = (folder / "README.md").read_text()
        seen["repo_id"] = repo_id
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    tokenizer = elitekv_demo.testing.tiny_tokenizer()
    assert elitekv_peft.push_to_hub(model, "tiny-elitekv", tokenizer=tokenizer) == "commit"
    assert seen["repo"] == "tiny-elitekv" and seen["repo_id"] == "me/tiny-elitekv"
    files = seen["files"]
    assert {"config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"} <= files
    assert {"modeling_elitekv.py", "attention_elitekv.py", "cache.py"} <= files
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= files
    assert "- elitekv" in seen["card"] and "EliteKV cache" in seen["card"]


def pushed_repository(monkeypatch, cache: Path, model) -> str:
    """`push_to_hub` with the upload landing in ``cache``, laid out as huggingface_hub's cache holds a downloaded
    repository (so that loading it by id with ``cache_dir=cache, local_files_only=True`` reads what was uploaded)."""
    import shutil

    class Repo:
        repo_id = "me/pushed"

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    elitekv_peft.push_to_hub(model, "pushed", tokenizer=elitekv_demo.testing.tiny_tokenizer())
    return Repo.repo_id


def test_a_pushed_repository_loads_by_id_with_automodel_and_peft(monkeypatch, tmp_path):
    """From the Hub, `AutoModelForCausalLM.from_pretrained(repo_id)` loads the standalone EliteKV model (transformers
    would otherwise load the adapter config's base and rebuild the adapter over it), with the package and with
    ``trust_remote_code`` without it; `PeftModel.from_pretrained(base, repo_id)` too."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    repo_id = pushed_repository(monkeypatch, tmp_path, model)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # PEFT does not pass local_files_only
    hub = {"cache_dir": str(tmp_path), "local_files_only": True}
    loaded, info = AutoModelForCausalLM.from_pretrained(repo_id, output_loading_info=True, **hub)
    assert not info["missing_keys"]
    adapter = PeftModel.from_pretrained(tiny_model("llama_gqa"), repo_id, **hub)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)
        assert torch.allclose(adapter(ids).logits, expected, atol=1e-5)
    code = (
        "import sys, torch; sys.modules['elitekv_peft'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({repo_id!r}, trust_remote_code=True, cache_dir={str(tmp_path)!r}, "
        "local_files_only=True)\n"
        f"print(type(m).__name__, m(torch.tensor({ids.tolist()})).logits.sum().item())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    name, total = result.stdout.split()[-2:]
    assert name == "EliteKVLlamaForCausalLM" and abs(float(total) - expected.sum().item()) < 1e-2


def test_generated_tokens_unchanged_by_recording(saved):
    """Recording results only touches metadata: the model computes the same."""
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        elitekv_peft.record_evaluation(model, 3.0)
        assert torch.equal(before, model(ids).logits)
