"""Issue 3: QLoRA-style uptraining with the frozen linear layers in bitsandbytes 4-bit / 8-bit (CPU backend)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from elitekv_demo.testing import synthetic_windows
from elitekv_peft import EliteKVConfig
from elitekv_peft.quantization import dense_weight, quantize_frozen, quantized_modules, require_bitsandbytes
from elitekv_peft.training import lm_dataset, training_arguments, uptrain

from .tiny import VOCAB, convert, tiny_model

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency; install `.[dev]`")


def quantized_base(tmp_path, bits: str) -> torch.nn.Module:
    """The tiny Llama, saved and loaded back through transformers' BitsAndBytesConfig."""
    tiny_model("llama_gqa").save_pretrained(tmp_path / "base")
    if bits == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant)


def train_steps(model, tmp_path, steps: int = 30):
    windows = synthetic_windows(VOCAB, 64, 32, seed=0)
    args = training_arguments(
        str(tmp_path / "train"),
        max_steps=steps,
        batch_size=8,
        learning_rate=3e-3,
        logging_steps=5,
        warmup_ratio=0.0,
        disable_tqdm=True,
    )
    trainer = uptrain(model.train(), lm_dataset(windows), args)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def check_reload(model, tmp_path) -> None:
    """The saved artifact loads without bitsandbytes layers and computes what the trained model computes."""
    model.eval()
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not quantized_modules(reloaded)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=2e-2, rtol=0), (got - expected).abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_convert_a_quantized_base_and_uptrain(tmp_path, bits):
    base = quantized_base(tmp_path, bits)
    mlp_layers = [name for name in quantized_modules(base) if ".mlp." in name]
    model = convert(base, kv_ratio=0.5, trainable="attention_norms")
    # attention became dense EliteKV modules; the MLPs stayed quantized and frozen
    assert not [n for n in quantized_modules(model) if ".self_attn." in n]
    assert [n.removeprefix("base_model.model.") for n in quantized_modules(model)] == mlp_layers
    assert all(p.requires_grad for n, p in model.named_parameters() if ".self_attn." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mlp." in n)
    losses = train_steps(model, tmp_path)
    assert sum(losses[-2:]) / 2 < 0.95 * sum(losses[:2]) / 2, losses  # attention (+ norms) only
    check_reload(model, tmp_path)
    # the adapter also goes back onto a quantized base, e.g. to continue training
    again = PeftModel.from_pretrained(quantized_base(tmp_path / "again", bits), tmp_path / "out").eval()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=5e-3)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantize_frozen_after_conversion(tmp_path, bits):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, trainable="attention")
    mlp = model.base_model.model.model.layers[0].mlp.up_proj
    dense = mlp.weight.detach().clone()
    replaced = quantize_frozen(model, bits)
    assert replaced and all(".mlp." in name for name in replaced)
    quantized = model.base_model.model.model.layers[0].mlp.up_proj
    assert quantized.weight.dtype in (torch.uint8, torch.int8)
    # the quantization error is that of the format, not a broken layout
    error = (dense_weight(quantized) - dense).abs().mean() / dense.abs().mean()
    assert error < (0.15 if bits == "4bit" else 0.02), error
    losses = train_steps(model, tmp_path)
    assert sum(losses[-2:]) / 2 < 0.95 * sum(losses[:2]) / 2, losses  # attention (+ norms) only
    check_reload(model, tmp_path)


def test_training_everything_on_a_quantized_base_is_refused(tmp_path):
    base = quantized_base(tmp_path, "4bit")
    with pytest.raises(ValueError, match="attention_norms"):
        convert(base, kv_ratio=0.5, trainable="all")
    assert type(base.model.layers[0].self_attn).__name__ == "LlamaAttention"  # left untouched


def test_quantize_frozen_needs_frozen_layers():
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.5, trainable="all")
    with pytest.raises(ValueError, match="trainable='attention_norms'"):
        quantize_frozen(model, "4bit")
    with pytest.raises(ValueError, match="choose one of"):
        quantize_frozen(model, "3bit")


def test_missing_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"elitekv-peft\[quant\]"):
        require_bitsandbytes()
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.5, trainable="attention")
    with pytest.raises(ImportError, match=r"elitekv-peft\[quant\]"):
        quantize_frozen(model, "4bit")


def test_config_trainable_scope_is_checked_before_conversion():
    with pytest.raises(ValueError, match="choose one of"):
        EliteKVConfig(trainable="mlp")


@pytest.mark.parametrize(("method", "kv_ratio"), [("kv_latent", 0.5), ("lorc", 0.5), ("gqa", 0.5)])
def test_other_methods_convert_a_quantized_base(tmp_path, method, kv_ratio):
    base = quantized_base(tmp_path, "4bit")
    model = convert(base, method=method, kv_ratio=kv_ratio, trainable="attention_norms")
    assert not [n for n in quantized_modules(model) if ".self_attn." in n]
    assert [n for n in quantized_modules(model) if ".mlp." in n]
    assert all(p.is_floating_point() for n, p in model.named_parameters() if ".self_attn." in n)
    check_reload(model, tmp_path)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("shape", [(8, 16, 64), (1, 1, 64)])
def test_gradients_flow_through_frozen_quantized_layers(bits, shape):
    """Training attention below a quantized MLP needs the input gradient of the frozen 4/8-bit layer: it must equal
    the gradient through its dequantized weight (bitsandbytes warns about backward through `gemv_4bit`)."""
    from elitekv_peft.quantization import _quantized_copy

    torch.manual_seed(0)
    quantized = _quantized_copy(bnb, torch.nn.Linear(64, 128, bias=False), bits, None)
    weight = dense_weight(quantized)
    x = torch.randn(*shape, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 128)
    (quantized(x) * upstream).sum().backward()
    through_bnb = x.grad.clone()
    x.grad = None
    ((x @ weight.T) * upstream).sum().backward()
    assert through_bnb.abs().max() > 0
    assert torch.allclose(through_bnb, x.grad, atol=5e-2 if bits == "8bit" else 1e-4, rtol=0)
