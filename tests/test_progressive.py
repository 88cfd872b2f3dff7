"""Progressive conversion (issue 18): converted layers start in stages, the original attention running before."""

from __future__ import annotations

import copy

import pytest
import torch

from elitekv_demo.testing import synthetic_windows
from elitekv_peft.pipeline import JobSettings
from elitekv_peft.progressive import ProgressiveConversion, stage_starts
from elitekv_peft.training import EliteKVTrainer, lm_dataset, training_arguments

from .tiny import VOCAB, convert, tiny_model


def test_stage_starts_groups_layers_first_to_last():
    assert stage_starts(6, 3, 0.5, 120) == [0, 0, 30, 30, 60, 60]
    assert stage_starts(5, 2, 0.5, 10) == [0, 0, 0, 5, 5]  # the first group takes the odd layer
    assert stage_starts(4, 1, 0.5, 10) == [0, 0, 0, 0]
    for stages, share in ((0, 0.5), (7, 0.5), (2, 1.0), (2, -0.1)):
        with pytest.raises(ValueError, match="progressive"):
            stage_starts(6, stages, share, 10)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_layers_before_their_turn_run_the_original_attention():
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    original = tiny_model("llama_gqa", layers=2)
    teacher = copy.deepcopy(original)
    model = convert(original, kv_ratio=0.25)
    converted_logits = _logits(model, ids)
    hybrid = copy.deepcopy(teacher)  # layer 0 converted, layer 1 original: what step 0 of two stages must run
    hybrid.model.layers[0].self_attn = copy.deepcopy(model.get_base_model().model.layers[0].self_attn)

    callback = ProgressiveConversion(model, teacher, stages=2, share=0.5)
    callback.apply(step=0, max_steps=10)
    assert callback.converted_layers() == 1
    torch.testing.assert_close(_logits(model, ids), _logits(hybrid, ids))
    assert not torch.allclose(_logits(model, ids), converted_logits)
    callback.apply(step=5, max_steps=10)  # the second group's start: every layer converted
    assert callback.converted_layers() == 2
    torch.testing.assert_close(_logits(model, ids), converted_logits)
    callback.apply(step=0, max_steps=10)
    callback.restore()
    torch.testing.assert_close(_logits(model, ids), converted_logits)


def test_trainer_switches_every_layer_on_and_leaves_the_original_untouched(tmp_path):
    windows = synthetic_windows(VOCAB, 32, 32, seed=0)
    original = tiny_model("llama_gqa", layers=2)
    teacher = copy.deepcopy(original)
    model = convert(original, kv_ratio=0.25, calibration_data=windows[:8]).train()
    late = model.get_base_model().model.layers[1].self_attn
    before = {k: v.clone() for k, v in late.state_dict().items()}
    args = training_arguments(str(tmp_path), max_steps=4, batch_size=8, learning_rate=3e-3, disable_tqdm=True)
    trainer = EliteKVTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(windows),
        teacher=teacher,
        progressive_stages=2,
        progressive_share=0.5,
    )
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressiveConversion))
    teacher_attention = {k: v.clone() for k, v in teacher.model.layers[1].self_attn.state_dict().items()}
    steps_on_original = []
    original_forward = callback.originals[1].forward

    def counted(*args, **kwargs):
        steps_on_original.append(trainer.state.global_step)
        return original_forward(*args, **kwargs)

    callback.originals[1].forward = counted
    trainer.train()
    assert steps_on_original == [0, 1]  # layer 1's group starts at step floor(0.5 * 4) = 2
    assert trainer.state.global_step == 4 and callback.converted_layers() == 2
    assert "forward" not in vars(late)  # no redirect left behind
    assert any(not torch.equal(before[k], v) for k, v in late.state_dict().items())  # trained from step 2 on
    for k, v in teacher.model.layers[1].self_attn.state_dict().items():
        assert torch.equal(teacher_attention[k], v)


def test_progressive_needs_the_teacher(tmp_path):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    args = training_arguments(str(tmp_path), max_steps=1, batch_size=2, disable_tqdm=True)
    with pytest.raises(ValueError, match="teacher=<original model>"):
        EliteKVTrainer(model=model, args=args, train_dataset=None, progressive_stages=2)
    with pytest.raises(ValueError, match="add loss='distill'"):
        JobSettings(loss="lm", progressive_stages=3).check()
    with pytest.raises(ValueError, match="the original's attention"):
        JobSettings(teacher="some/model", progressive_stages=3).check()
    with pytest.raises(ValueError, match="progressive_stages=0"):
        JobSettings(progressive_stages=0).check()


def test_more_stages_than_layers_is_refused_before_anything_runs(tmp_path):
    from elitekv_peft.pipeline import convert_and_evaluate

    model = tiny_model("llama_gqa")  # 2 layers
    settings = JobSettings(progressive_stages=3, output_dir=str(tmp_path / "out")).resolved()
    with pytest.raises(ValueError, match="the model has 2 layers; choose 1 to 2"):
        convert_and_evaluate(model, None, {}, settings, {})  # no data: the check comes first
    assert not (tmp_path / "out").exists()

