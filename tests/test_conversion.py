"""Issue 2, item 2 (exactness at ratio 1.0) and the conversion's parts."""

from __future__ import annotations

import pytest
import torch

from elitekv_peft.factorization import factorize, relative_output_error
from elitekv_peft.modeling.attention_elitekv import head_dim_permutation

from .tiny import VOCAB, convert, tiny_model


@pytest.mark.parametrize("family", ["llama_mha", "llama_gqa", "qwen2_gqa", "mistral_gqa"])
@pytest.mark.parametrize("lowrank_init", ["activation", "weight"])
def test_full_ratio_all_chunks_is_exact(family, lowrank_init):
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = tiny_model(family)(ids).logits
    model = convert(tiny_model(family), kv_ratio=1.0, rope_chunks=16, lowrank_init=lowrank_init, selection="high")
    with torch.no_grad():
        converted = model(ids).logits
    assert (converted - reference).abs().max().item() < 1e-4


def test_compression_changes_the_output():
    """The exactness test above must be able to fail: a compressed model is not the original."""
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = tiny_model("llama_gqa")(ids).logits
        converted = convert(tiny_model("llama_gqa"), kv_ratio=0.25)(ids).logits
    assert (converted - reference).abs().max().item() > 1e-3


def test_separate_and_joint_agree_at_full_rank():
    """At full latent rank both decompositions reproduce the same partial-RoPE model exactly."""
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(6))
    # r = 8 of 16 chunks: K_nope is 4*16 = 64 wide, V is 128 wide; both have rank <= hidden = 64
    common = dict(kv_ratio=None, rope_chunks=8, latent_dim=128, selection="high")
    joint = convert(tiny_model("llama_mha"), decomposition="joint", **common)
    separate = convert(tiny_model("llama_mha"), decomposition="separate", **common)
    with torch.no_grad():
        a, b = joint(ids).logits, separate(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert separate.base_model.model.config.elitekv["key_latent_dims"] == [64, 64]
    cut = convert(
        tiny_model("llama_mha"), decomposition="separate", kv_ratio=None, rope_chunks=8, latent_dim=32, selection="high"
    )
    with torch.no_grad():
        assert (cut(ids).logits - a).abs().max().item() > 1e-3


def test_head_dim_permutation_layout():
    perm = head_dim_permutation([3, 1], 8)
    assert perm.tolist() == [1, 3, 5, 7, 0, 2, 4, 6]


def test_activation_aware_svd_beats_weight_svd_on_outputs():
    torch.manual_seed(0)
    # anisotropic inputs: a few directions carry most of the energy
    x = torch.randn(2000, 32) * torch.logspace(0, -2, 32)
    matrix = torch.randn(32, 48)
    gram = (x.T @ x).double()
    errors = {}
    for init in ("weight", "activation"):
        down, up = factorize(matrix, 8, gram, init)
        errors[init] = relative_output_error(matrix, down, up, gram)
    assert errors["activation"] < errors["weight"]
    down, up = factorize(matrix, 32, gram, "activation")
    assert relative_output_error(matrix, down, up, gram) < 1e-6
    down, up = factorize(matrix, 40, gram, "weight")  # rank above min(d_in, d_out): zero padding, exact
    assert down.shape == (32, 40) and up.shape == (40, 48)
    assert relative_output_error(matrix, down, up, gram) < 1e-6


def test_conversion_is_deterministic():
    a = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    b = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.peft_config["default"].chunk_indices == b.peft_config["default"].chunk_indices


def test_chunk_choice_heatmap(tmp_path):
    from elitekv_peft.inspection import chunk_matrix, plot_chunk_choices

    chunks = [[[0, 3], [1, 2]], [[5, 7], [0, 1]]]
    matrix = chunk_matrix(chunks, head_dim=16)
    assert matrix.shape == (2, 16)
    assert matrix[0].nonzero().flatten().tolist() == [0, 3, 9, 10]
    assert matrix[1, 8 + 1].item() == 2  # layer 1, head 1, chunk 1 -> index + 1
    path = plot_chunk_choices(chunks, 16, tmp_path / "chunks.png")
    assert path.is_file() and path.stat().st_size > 1000
