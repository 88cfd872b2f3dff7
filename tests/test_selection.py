"""RoPElite chunk selection: the greedy search against brute force, and the heuristics."""

from __future__ import annotations

import itertools

import pytest
import torch

from elitekv_peft.rope_selection import apply_rope, elite_chunks, elite_order, fixed_chunks, norm_chunks, rotate_half


def rotary_tables(T: int, D: int, base: float = 10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def partial_scores(q, k, cos, sin, chunks_per_group):
    """Scores [N, H, T, T] with only the given chunks rotated (per key/value head), computed directly."""
    N, H, T, D = q.shape
    G = k.shape[1]
    half = D // 2
    out = torch.empty(N, H, T, T)
    for h in range(H):
        g = h // (H // G)
        rotated = torch.zeros(D, dtype=torch.bool)
        for c in chunks_per_group[g]:
            rotated[c] = rotated[c + half] = True
        qh = torch.where(rotated, q[:, h] * cos + rotate_half(q[:, h]) * sin, q[:, h])
        kh = torch.where(rotated, k[:, g] * cos + rotate_half(k[:, g]) * sin, k[:, g])
        out[:, h] = qh @ kh.transpose(-1, -2)
    return out


def full_and_partial(q, k, cos, sin, chunks_per_group):
    """Full-RoPE scores and the selection's [N, H, T, T], and the causal mask [T, T]."""
    H, T, G = q.shape[1], q.shape[2], k.shape[1]
    full = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).repeat_interleave(H // G, 1).transpose(-1, -2)
    return full, partial_scores(q, k, cos, sin, chunks_per_group), torch.tril(torch.ones(T, T, dtype=torch.bool))


def selection_error(q, k, cos, sin, chunks_per_group):
    """Mean |scores(selection) - scores(full RoPE)| per key/value head over causal pairs: [G]."""
    N, H, G = q.shape[0], q.shape[1], k.shape[1]
    full, part, causal = full_and_partial(q, k, cos, sin, chunks_per_group)
    diff = (part - full).abs() * causal
    return diff.sum(dim=(0, 2, 3)).view(G, H // G).sum(1) / (N * (H // G) * causal.sum())


def attention_distance(q, k, cos, sin, chunks_per_group):
    """Mean total-variation distance of each query's causal attention row from full RoPE's, per key/value head: [G]."""
    N, H, T, D = q.shape
    G = k.shape[1]
    full, part, causal = full_and_partial(q, k, cos, sin, chunks_per_group)
    rows = [torch.softmax((x / D**0.5).masked_fill(~causal, float("-inf")), dim=-1) for x in (full, part)]
    tv = 0.5 * (rows[1] - rows[0]).abs().sum(-1)  # [N, H, T]
    return tv.sum(dim=(0, 2)).view(G, H // G).sum(1) / (N * (H // G) * T)


@pytest.fixture
def qk():
    torch.manual_seed(0)
    N, H, G, T, D = 2, 4, 2, 24, 16
    q = torch.randn(N, H, T, D) * torch.linspace(2, 0.2, D)  # uneven energy over dims
    k = torch.randn(N, G, T, D) * torch.linspace(0.2, 2, D)
    cos, sin = rotary_tables(T, D)
    return q, k, cos, sin


def test_first_round_equals_brute_force(qk):
    q, k, cos, sin = qk
    chunks, errors = elite_chunks(q, k, cos, sin, r=1)
    G, C = k.shape[1], q.shape[-1] // 2
    for g in range(G):
        errs = [selection_error(q, k, cos, sin, [[c]] * G)[g].item() for c in range(C)]
        assert chunks[g, 0].item() == min(range(C), key=errs.__getitem__)
        assert errors[g, 0].item() == pytest.approx(min(errs), rel=1e-4)


def test_greedy_rounds_follow_their_definition(qk):
    q, k, cos, sin = qk
    r = 3
    chunks, errors = elite_chunks(q, k, cos, sin, r=r, max_block_elements=5000)  # forces several row blocks
    G, C = k.shape[1], q.shape[-1] // 2
    for g in range(G):
        chosen: list[int] = []
        for _ in range(r):
            candidates = [c for c in range(C) if c not in chosen]
            errs = {c: selection_error(q, k, cos, sin, [chosen + [c]] * G)[g].item() for c in candidates}
            chosen.append(min(errs, key=errs.get))
        assert sorted(chosen) == chunks[g].tolist()
    assert (errors[:, 1:] <= errors[:, :-1] + 1e-6).all()


def test_elite_beats_heuristics_and_is_exact_with_all_chunks(qk):
    q, k, cos, sin = qk
    G, D = k.shape[1], q.shape[-1]
    r = 2
    elite, _ = elite_chunks(q, k, cos, sin, r=r)
    elite_err = selection_error(q, k, cos, sin, elite.tolist()).sum()
    for strategy in ("high", "low", "uniform"):
        other = fixed_chunks(strategy, G, D, r)
        assert elite_err <= selection_error(q, k, cos, sin, other.tolist()).sum() + 1e-6
    other = norm_chunks(q, k, r)
    assert elite_err <= selection_error(q, k, cos, sin, other.tolist()).sum() + 1e-6
    all_chunks, errors = elite_chunks(q, k, cos, sin, r=D // 2)
    assert errors[:, -1].max().item() < 1e-4


def test_fixed_strategies():
    assert fixed_chunks("high", 2, 16, 3).tolist() == [[0, 1, 2]] * 2
    assert fixed_chunks("low", 1, 16, 3).tolist() == [[5, 6, 7]]
    uniform = fixed_chunks("uniform", 1, 64, 4)[0].tolist()
    assert uniform == [0, 10, 21, 31]
    for r in range(1, 9):
        assert len(set(fixed_chunks("uniform", 1, 16, r)[0].tolist())) == r


def test_norm_picks_the_largest_chunks():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 10, 8) * 0.01
    k = torch.randn(1, 1, 10, 8) * 0.01
    q[..., 2] += 5.0
    k[..., 2 + 4] += 5.0  # chunk 2 = dims (2, 6)
    q[..., 0] += 3.0
    k[..., 0] += 3.0
    assert norm_chunks(q, k, 2).tolist() == [[0, 2]]


def test_selection_strategies_all_convert():
    from .tiny import convert, tiny_model

    chosen = {}
    for strategy in ("elite", "high", "low", "uniform", "norm"):
        model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, selection=strategy)
        chosen[strategy] = model.peft_config["default"].chunk_indices
    assert chosen["high"][0][0] == [0, 1]
    assert chosen["low"][0][0] == [14, 15]
    assert len({str(v) for v in chosen.values()}) >= 3
    _ = list(itertools.chain(*chosen["elite"]))


def test_attention_objective_rounds_follow_their_definition(qk):
    q, k, cos, sin = qk
    r = 3
    order, errors = elite_order(q, k, cos, sin, r=r, max_block_elements=5000, objective="attention")
    G, C = k.shape[1], q.shape[-1] // 2
    for g in range(G):
        chosen: list[int] = []
        for round_ in range(r):
            errs = {
                c: attention_distance(q, k, cos, sin, [chosen + [c]] * G)[g].item() for c in range(C) if c not in chosen
            }
            chosen.append(min(errs, key=errs.get))
            assert errors[g, round_].item() == pytest.approx(errs[chosen[-1]], rel=1e-4)
        assert chosen == order[g].tolist()
    with pytest.raises(ValueError, match="objective='logits'"):
        elite_order(q, k, cos, sin, r=1, objective="logits")


@pytest.mark.parametrize("rope_allocation", ["uniform", "sensitivity"])
def test_the_config_objective_reaches_the_search(monkeypatch, rope_allocation, tmp_path):
    import elitekv_peft.methods.elitekv as elitekv

    from .tiny import convert, tiny_model

    seen = []
    search = elitekv.elite_order

    def spy(*args, **kwargs):
        seen.append(kwargs.get("objective"))
        return search(*args, **kwargs)

    monkeypatch.setattr(elitekv, "elite_order", spy)
    model = convert(
        tiny_model("llama_gqa"), kv_ratio=0.25, selection_objective="attention", rope_allocation=rope_allocation
    )
    assert seen == ["attention"] * 2  # one search per layer
    assert model.peft_config["default"].selection_objective == "attention"
    model.save_pretrained(tmp_path)
    assert "| chunk selection | elite (objective: attention) |" in (tmp_path / "README.md").read_text()


def test_the_objective_is_refused_where_it_does_not_apply():
    from elitekv_peft import EliteKVConfig

    with pytest.raises(ValueError, match="selection='elite' \\(not 'high'\\)"):
        EliteKVConfig(kv_ratio=0.25, selection="high", selection_objective="attention")
    with pytest.raises(ValueError, match="selection_objective applies to method='elitekv' only"):
        EliteKVConfig(kv_ratio=0.25, method="lorc", selection_objective="attention")
    with pytest.raises(ValueError, match="choose one of \\('scores', 'attention'\\)"):
        EliteKVConfig(kv_ratio=0.25, selection_objective="probs")
