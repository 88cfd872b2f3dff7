"""Bad input matrix (issue 6): each bad input raises a clear exception type with a message that names the fix.

One table, one row per bad input: what is done, the exception type, and a regex matched against the message (the
part that says what to do). Cases on saved artifacts work on a fresh copy of one tiny saved model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    StaticCache,
)

import elitekv_peft
from elitekv_peft import EliteKVConfig, set_attention_path
from elitekv_peft.compat import cache_kwargs
from elitekv_peft.inspection import inspect_artifact

from .tiny import VOCAB, calibration_ids, convert, tiny_model

FIX_REBUILD = "Save the model again"
WEIGHTS = "model-00001-of-00001.safetensors"  # the folder's only copy of the weights (elitekv_peft.artifact)


@dataclass
class Case:
    name: str
    run: Callable[[Context], object]
    error: type[BaseException]
    match: str


@dataclass
class Context:
    artifact: Path  # a saved tiny Qwen2 conversion (seed 3, kv_ratio 0.25); do not modify
    tmp: Path

    def copy(self) -> Path:
        """A fresh copy of the artifact to damage."""
        target = self.tmp / f"copy{len(list(self.tmp.iterdir()))}"
        shutil.copytree(self.artifact, target)
        return target


def peft(model, **kwargs):
    kwargs.setdefault("calibration_data", calibration_ids())
    return get_peft_model(model, EliteKVConfig(**kwargs))


def load(path: Path, base=None):
    return PeftModel.from_pretrained(base if base is not None else tiny_model("qwen2_gqa", seed=3), path)


def edit_adapter_config(ctx: Context, **changes) -> Path:
    path = ctx.copy()
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def truncated(ctx: Context) -> Path:
    path = ctx.copy()
    file = path / WEIGHTS
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return path


def bit_flipped(ctx: Context) -> Path:
    """One byte of tensor data changed: the header is intact, only the checksum can tell."""
    path = ctx.copy()
    file = path / WEIGHTS
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF
    file.write_bytes(bytes(data))
    return path


def missing_tensor(ctx: Context) -> Path:
    """A well-formed weights file without one latent projection (and no checksum, as other tools would write)."""
    path = edit_adapter_config(ctx, standalone_weights={WEIGHTS: None})
    file = path / WEIGHTS
    tensors = load_file(file)
    tensors = {k: v for k, v in tensors.items() if "layers.1.self_attn.kv_down_proj" not in k}
    save_file(tensors, file)
    return path


def mixed_dtype_model():
    model = tiny_model("llama_gqa")
    model.model.layers[1].self_attn.to(torch.bfloat16)
    return model


def quantized_model():
    model = tiny_model("llama_gqa")
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight.to(torch.int8), requires_grad=False)
    return model


def meta_model():
    with torch.device("meta"):
        return tiny_model("llama_gqa")


def generate_past_max_positions(ctx: Context):
    model = convert(tiny_model("llama_gqa", max_position_embeddings=64), kv_ratio=0.25)
    ids = torch.randint(3, VOCAB, (1, 60))
    return model.generate(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)


def static_cache(ctx: Context):  # a StaticCache already holding full keys and values (an empty one is adopted)
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    cache = StaticCache(config=model.base_model.model.config, max_cache_len=32)
    cache.layers[0].lazy_initialization(torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32))
    return model(torch.randint(3, VOCAB, (1, 8)), **cache_kwargs(cache), use_cache=True)


def not_an_artifact(ctx: Context):
    folder = ctx.tmp / "empty"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return inspect_artifact(folder)


CONFIG_FIX = "choose one of"
CASES = [
    # config types and ranges
    Case("kv_ratio_zero", lambda c: EliteKVConfig(kv_ratio=0.0), ValueError, r"must be in \(0, 1\]"),
    Case("kv_ratio_above_one", lambda c: EliteKVConfig(kv_ratio=1.5), ValueError, r"must be in \(0, 1\]"),
    Case("kv_ratio_string", lambda c: EliteKVConfig(kv_ratio="0.25"), TypeError, "must be a float"),
    Case("kv_ratio_bool", lambda c: EliteKVConfig(kv_ratio=True), TypeError, "must be a float"),
    Case(
        "no_ratio_no_sizes", lambda c: EliteKVConfig(kv_ratio=None), ValueError, "both `rope_chunks` and `latent_dim`"
    ),
    Case("rope_chunks_zero", lambda c: EliteKVConfig(rope_chunks=0), ValueError, "positive integer"),
    Case("latent_dim_negative", lambda c: EliteKVConfig(latent_dim=-3), ValueError, "positive integer"),
    Case("rope_chunks_float", lambda c: EliteKVConfig(rope_chunks=2.5), ValueError, "positive integer"),
    Case("selection_unknown", lambda c: EliteKVConfig(selection="best"), ValueError, CONFIG_FIX),
    Case("decomposition_unknown", lambda c: EliteKVConfig(decomposition="svd"), ValueError, CONFIG_FIX),
    Case("lowrank_init_unknown", lambda c: EliteKVConfig(lowrank_init="random"), ValueError, CONFIG_FIX),
    Case("trainable_unknown", lambda c: EliteKVConfig(trainable="mlp"), ValueError, CONFIG_FIX),
    Case("method_unknown", lambda c: EliteKVConfig(method="magic"), ValueError, CONFIG_FIX),
    Case("calibration_samples_zero", lambda c: EliteKVConfig(calibration_samples=0), ValueError, "positive integer"),
    Case("calibration_seq_len_string", lambda c: EliteKVConfig(calibration_seq_len="512"), ValueError, "positive"),
    Case("seed_string", lambda c: EliteKVConfig(seed="0"), TypeError, "must be an integer, e.g. seed=0"),
    Case("layerwise_string", lambda c: EliteKVConfig(calibration_layerwise="yes"), TypeError, "True, False or None"),
    Case("calibration_device_bad", lambda c: EliteKVConfig(calibration_device="gpu0"), ValueError, "use e.g. 'cpu'"),
    # settings impossible for this model
    Case("kv_ratio_too_small", lambda c: peft(tiny_model(), kv_ratio=0.01), ValueError, r"use kv_ratio >= 0\.0\d+"),
    Case(
        "rope_chunks_beyond_head",
        lambda c: peft(tiny_model(), kv_ratio=0.5, rope_chunks=17),
        ValueError,
        "choose 1..16",
    ),
    Case(
        "sizes_beyond_ratio",
        lambda c: peft(tiny_model(), kv_ratio=0.25, rope_chunks=4, latent_dim=100),
        ValueError,
        r"lower one of them, or raise kv_ratio to 0\.9063",
    ),
    # unsupported models
    Case(
        "gpt2_no_rope",
        lambda c: peft(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))),
        TypeError,
        "supports llama, mistral, qwen2.*Convert one of those",
    ),
    Case(
        "bloom_alibi",
        lambda c: peft(BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=VOCAB))),
        TypeError,
        "supports llama, mistral, qwen2.*Convert one of those",
    ),
    Case(
        "bert_encoder_only",
        lambda c: peft(
            BertModel(
                BertConfig(
                    num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB
                )
            )
        ),
        TypeError,
        "supports llama, mistral, qwen2.*Convert one of those",
    ),
    Case(
        "converted_twice",
        lambda c: peft(convert(tiny_model(), kv_ratio=0.25).base_model.model),
        ValueError,
        "convert the original model instead",
    ),
    Case(
        "second_adapter",
        lambda c: convert(tiny_model(), kv_ratio=0.25).add_adapter(
            "other", EliteKVConfig(kv_ratio=0.5, calibration_data=calibration_ids())
        ),
        ValueError,
        "Convert a fresh copy of the base model",
    ),
    Case("mixed_dtypes", lambda c: peft(mixed_dtype_model()), TypeError, r"model.to\(torch.bfloat16\)"),
    Case("quantized_weights", lambda c: peft(quantized_model()), TypeError, "Convert the unquantized model"),
    Case("meta_weights", lambda c: peft(meta_model()), ValueError, "calibration_device='cuda'"),
    # calibration data
    Case(
        "calibration_too_short",
        lambda c: peft(tiny_model(), calibration_data=torch.randint(3, VOCAB, (2, 4))),
        ValueError,
        "pass longer sequences",
    ),
    Case(
        "calibration_empty",
        lambda c: peft(tiny_model(), calibration_data=torch.empty(0, 0, dtype=torch.long)),
        ValueError,
        r"shape \[N, T\]",
    ),
    Case(
        "calibration_floats",
        lambda c: peft(tiny_model(), calibration_data=torch.rand(2, 32)),
        TypeError,
        "integer token ids",
    ),
    Case(
        "calibration_strings",
        lambda c: peft(tiny_model(), calibration_data=["some text", "more"]),
        TypeError,
        "tokenize them first",
    ),
    Case(
        "calibration_ragged",
        lambda c: peft(tiny_model(), calibration_data=[[5] * 16, [5] * 12]),
        TypeError,
        "equal-length lists",
    ),
    Case(
        "calibration_too_few_tokens",
        lambda c: peft(tiny_model(), calibration_data=torch.randint(3, VOCAB, (1, 16))),
        ValueError,
        "Pass more calibration text",
    ),
    Case(
        "calibration_ids_beyond_vocab",
        lambda c: peft(tiny_model(), calibration_data=torch.full((2, 32), VOCAB)),
        ValueError,
        "was it made with another tokenizer",
    ),
    Case(
        "calibration_negative_ids",
        lambda c: peft(tiny_model(), calibration_data=torch.full((2, 32), -1)),
        ValueError,
        "was it made with another tokenizer",
    ),
    Case(
        "sampled_calibration_too_short",
        lambda c: peft(tiny_model(), calibration_data=None, calibration_seq_len=4),
        ValueError,
        "use at least 8",
    ),
    # saved artifacts
    Case("adapter_truncated", lambda c: load(truncated(c)), ValueError, f"truncated or corrupt.*{FIX_REBUILD}"),
    Case("adapter_bit_flipped", lambda c: load(bit_flipped(c)), ValueError, f"checksum.*{FIX_REBUILD}"),
    Case("adapter_missing_tensor", lambda c: load(missing_tensor(c)), ValueError, f"lacks 1 .*{FIX_REBUILD}"),
    Case(
        "adapter_wrong_base_shape",
        lambda c: load(c.artifact, tiny_model("qwen2_gqa", layers=3)),
        ValueError,
        "Load it onto the base model it was made from",
    ),
    Case(
        "adapter_wrong_base_family",
        lambda c: load(c.artifact, tiny_model("llama_gqa")),
        ValueError,
        "Load it onto the base model it was made from",
    ),
    Case(
        "adapter_kv_ratio_edited",
        lambda c: load(edit_adapter_config(c, kv_ratio=0.5)),
        ValueError,
        "load the adapter with its own adapter_config.json",
    ),
    Case(
        "adapter_rope_chunks_edited",
        lambda c: load(edit_adapter_config(c, rope_chunks=4)),
        ValueError,
        "load the adapter with its own adapter_config.json",
    ),
    Case(
        "inspect_missing_folder",
        lambda c: inspect_artifact(c.tmp / "nope"),
        FileNotFoundError,
        "pass the folder written by",
    ),
    Case("inspect_not_an_artifact", not_an_artifact, ValueError, "Pass the folder that `save_pretrained` wrote"),
    # using a converted model
    Case("generate_past_max_positions", generate_past_max_positions, ValueError, "Shorten the prompt"),
    Case("static_cache", static_cache, TypeError, r"elitekv_peft.EliteKVCache\(\)"),
    Case(
        "attention_path_unknown",
        lambda c: set_attention_path(convert(tiny_model(), kv_ratio=0.25), "fast"),
        ValueError,
        "choose one of",
    ),
    Case(
        "record_evaluation_plain_model",
        lambda c: elitekv_peft.record_evaluation(tiny_model(), 9.0),
        TypeError,
        "pass the model returned by `get_peft_model",
    ),
    Case(
        "record_training_negative",
        lambda c: elitekv_peft.record_training(convert(tiny_model(), kv_ratio=0.25), -1),
        ValueError,
        "non-negative integer",
    ),
    Case(
        "push_plain_model",
        lambda c: elitekv_peft.push_to_hub(tiny_model(), "me/x"),
        TypeError,
        "pass the model returned by `get_peft_model",
    ),
]


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    artifact = tmp_path_factory.mktemp("artifact")
    convert(tiny_model("qwen2_gqa", seed=3), kv_ratio=0.25).save_pretrained(artifact)
    return artifact


def test_matrix_is_large_and_names_are_unique():
    assert len(CASES) >= 25
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, context, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(case.error, match=case.match):
            case.run(Context(context, tmp_path))


def test_the_undamaged_artifact_loads(context):
    """The artifact cases must be able to pass: the same loading works on the copy nobody damaged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(context)
    assert model.peft_config["default"].is_converted
