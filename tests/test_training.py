"""Issue 3: uptraining through the HF Trainer and TRL's SFTTrainer on a tiny model: the loss goes down."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from elitekv_peft.data import lm_dataset, synthetic_windows
from elitekv_peft.training import chunked_kl, plan_steps, training_arguments, uptrain

from .tiny import VOCAB, convert, tiny_model, tiny_tokenizer


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture
def windows():
    return synthetic_windows(VOCAB, 64, 32, seed=0)


@pytest.mark.parametrize("distill", [False, True])
def test_trainer_uptraining_lowers_the_loss(tmp_path, windows, distill):
    original = tiny_model("llama_gqa")
    teacher = copy.deepcopy(original) if distill else None
    model = convert(original, kv_ratio=0.25, calibration_data=windows[:8])
    model.train()
    args = training_arguments(
        str(tmp_path),
        max_steps=40,
        batch_size=8,
        learning_rate=3e-3,
        logging_steps=5,
        warmup_ratio=0.0,
        disable_tqdm=True,
    )
    trainer = uptrain(model, lm_dataset(windows), args, teacher=teacher)
    losses = logged_losses(trainer)
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2


def test_checkpoints_resume(tmp_path, windows):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8]).train()
    args = training_arguments(
        str(tmp_path), max_steps=6, batch_size=8, save_steps=3, disable_tqdm=True, logging_steps=1
    )
    trainer = uptrain(model, lm_dataset(windows), args)
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "checkpoint-6").is_dir()
    fresh = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8]).train()
    args = training_arguments(
        str(tmp_path), max_steps=6, batch_size=8, save_steps=3, disable_tqdm=True, logging_steps=1
    )
    resumed = uptrain(fresh, lm_dataset(windows), args, resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 6
    a, b = trainer.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sft_trainer_with_elitekv_peft_config_lowers_the_loss(tmp_path, windows):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from elitekv_peft import EliteKVConfig

    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=5,
        report_to="none",
        disable_tqdm=True,
        max_length=32,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": False},
        bf16=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(
            model=tiny_model("llama_gqa"),
            args=config,
            train_dataset=dataset,
            processing_class=tiny_tokenizer(),
            peft_config=EliteKVConfig(kv_ratio=0.25, calibration_data=windows[:8]),
        )
        trainer.train()
    losses = logged_losses(trainer)
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2
    assert type(trainer.model).__name__.startswith("PeftModel")


def test_chunked_kl_matches_direct_computation():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randn(2, 5, 11)
    mask = torch.rand(2, 5) > 0.3
    got = chunked_kl(s, t, mask, temperature=2.0, chunk_tokens=3)
    p_t = torch.softmax(t[mask] / 2, -1)
    ref = (p_t * (p_t.log() - torch.log_softmax(s[mask] / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(got, ref, atol=1e-6)
    got.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert chunked_kl(t.clone(), t, mask) < 1e-6


def test_plan_steps():
    plan = plan_steps(1_000_000, batch_size=8, seq_len=512, grad_accum=2)
    assert plan.max_steps == 123 and plan.tokens >= 1_000_000
