"""Issue 3: uptraining through the HF Trainer and TRL's SFTTrainer on a tiny model: the loss goes down."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import default_data_collator

from elitekv_demo.testing import synthetic_windows
from elitekv_peft.training import (
    EliteKVTrainer,
    chunked_kl,
    hidden_state_loss,
    latent_parameter_names,
    lm_dataset,
    logged_losses,
    plan_steps,
    process_count,
    training_arguments,
    uptrain,
    uptrain_tokens,
)

from .tiny import VOCAB, convert, tiny_model, tiny_tokenizer


@pytest.fixture
def windows():
    return synthetic_windows(VOCAB, 64, 32, seed=0)


@pytest.mark.parametrize("distill", [False, True, "hidden"])
def test_trainer_uptraining_lowers_the_loss(tmp_path, windows, distill):
    original = tiny_model("llama_gqa")
    teacher = copy.deepcopy(original) if distill else None
    hidden_weight = 1.0 if distill == "hidden" else 0.0
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
    trainer = uptrain(model, lm_dataset(windows), args, teacher=teacher, hidden_weight=hidden_weight)
    losses = logged_losses(trainer)
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2


def test_uptrain_tokens_trains_the_budget_in_whole_steps_and_leaves_eval_mode(windows):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8])
    trainer, plan = uptrain_tokens(model, windows, 1000, batch_size=8, seq_len=32, learning_rate=3e-3, progress=False)
    assert (plan.max_steps, plan.tokens) == (4, 1024)  # ceil(1000 / (8 x 32)) steps
    assert trainer.state.global_step == 4 and not model.training
    losses = logged_losses(trainer)
    assert len(losses) == 4 and all(isinstance(x, float) for x in losses)  # a short run logs every step


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_uptrain_tokens_trains_and_counts_the_planned_tokens_when_batches_do_not_divide_the_data(windows, grad_accum):
    """10 windows, 4 a step: a pass over the data used to end with a step of 2 windows that counted as a full one, so
    fewer tokens trained than planned and recorded. Counted here at the model's input."""
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8])
    seen = []
    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _, args, out: seen.append(args[0].numel()) if model.training else None)
    trainer, plan = uptrain_tokens(
        model, windows[:10], 480, batch_size=4 // grad_accum, seq_len=32, grad_accum=grad_accum, progress=False
    )
    hook.remove()
    assert plan.tokens == 512  # 4 steps of 4 windows x 32 tokens
    assert sum(seen) == plan.tokens == trainer.state.num_input_tokens_seen


def test_training_arguments_count_tokens_and_keep_every_evaluation_window(tmp_path, windows):
    """Dropping short batches to make steps whole would drop evaluation windows too: the data is cut instead."""
    from transformers import Trainer

    args = training_arguments(str(tmp_path), max_steps=1, batch_size=4, per_device_eval_batch_size=4)
    assert args.include_num_input_tokens_seen in ("all", True)
    trainer = Trainer(model=tiny_model("llama_gqa"), args=args, data_collator=default_data_collator)
    batches = list(trainer.get_eval_dataloader(lm_dataset(windows[:10])))
    assert sum(batch["input_ids"].shape[0] for batch in batches) == 10


def test_uptrain_tokens_refuses_less_data_than_one_step_and_counts_processes(windows, monkeypatch):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8])
    with pytest.raises(ValueError, match="fewer than one step"):
        uptrain_tokens(model, windows[:3], 480, batch_size=4, seq_len=32, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_count() == 2
    with pytest.raises(ValueError, match=r"4 x 1 x 2 process\(es\)"):
        uptrain_tokens(model, windows[:6], 480, batch_size=4, seq_len=32, progress=False)


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


def test_an_adapter_file_of_another_save_than_the_live_config_is_refused(tmp_path, windows):
    """PEFT keeps the live adapter config when it loads an adapter under an existing name (a plain `Trainer`
    resuming): the weights would come from the folder that config was read from, so that load is refused."""
    from peft import PeftModel

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8]).train()
    args = training_arguments(str(tmp_path), max_steps=4, batch_size=8, save_steps=2, disable_tqdm=True)
    uptrain(model, lm_dataset(windows), args)
    loaded = PeftModel.from_pretrained(tiny_model("llama_gqa"), str(tmp_path / "checkpoint-4"), is_trainable=True)
    with pytest.raises(ValueError, match="saved with another folder.*read_weights_from"):
        loaded.load_adapter(str(tmp_path / "checkpoint-2"), "default", is_trainable=True)
    loaded.load_adapter(str(tmp_path / "checkpoint-4"), "default", is_trainable=True)  # its own save loads


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path, windows):
    """The best checkpoint is the first (greatest eval loss counts as best here), not the last one saved."""
    from transformers import AutoModelForCausalLM

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8]).train()
    best = {"metric_for_best_model": "loss", "greater_is_better": True, "load_best_model_at_end": True}
    args = training_arguments(
        str(tmp_path),
        max_steps=6,
        batch_size=8,
        save_steps=2,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        disable_tqdm=True,
        eval_strategy="steps",
        eval_steps=2,
        **best,
    )
    trainer = EliteKVTrainer(
        model=model, args=args, train_dataset=lm_dataset(windows), eval_dataset=lm_dataset(windows[:8])
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    ids = windows[:2]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(trainer.state.best_model_checkpoint)(ids).logits
        assert torch.allclose(trainer.model(ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("distill_weight", [1.0, 0.5])
def test_gradient_accumulation_steps_like_one_big_batch(tmp_path, windows, distill_weight):
    """2 x 4 windows accumulated update the weights as 1 x 8 does (the distillation loss once counted twice)."""
    original = tiny_model("llama_gqa")
    converted = convert(copy.deepcopy(original), kv_ratio=0.25, calibration_data=windows[:8])
    updates = []
    for batch, accumulate in ((8, 1), (4, 2)):
        model = copy.deepcopy(converted).train()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        args = training_arguments(
            str(tmp_path / f"b{batch}"),
            max_steps=1,
            batch_size=batch,
            grad_accum=accumulate,
            learning_rate=1e-2,
            warmup_ratio=0.0,
            optim="sgd",
            max_grad_norm=0.0,
            disable_tqdm=True,
        )
        trainer = EliteKVTrainer(
            model=model,
            args=args,
            train_dataset=lm_dataset(windows[:8]),
            teacher=copy.deepcopy(original),
            distill_weight=distill_weight,
        )
        trainer.train()
        updates.append(torch.cat([(p.detach() - before[k]).flatten() for k, p in model.named_parameters()]))
    assert torch.allclose(updates[1], updates[0], rtol=1e-3, atol=1e-7)


def test_progressive_stages_refuse_to_pick_a_best_checkpoint(tmp_path, windows):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8])
    args = training_arguments(
        str(tmp_path),
        max_steps=4,
        batch_size=8,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
    )
    with pytest.raises(ValueError, match="load_best_model_at_end=False"):
        EliteKVTrainer(
            model=model,
            args=args,
            train_dataset=lm_dataset(windows),
            eval_dataset=lm_dataset(windows[:8]),
            teacher=tiny_model("llama_gqa"),
            progressive_stages=2,
        )


def test_a_model_with_nothing_to_train_is_refused_with_the_fix(tmp_path, windows):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8], trainable="none")
    args = training_arguments(str(tmp_path), max_steps=1, batch_size=8, disable_tqdm=True)
    with pytest.raises(ValueError, match="is_trainable=True"):
        EliteKVTrainer(model=model, args=args, train_dataset=lm_dataset(windows))


def test_resuming_into_a_model_converted_differently_is_refused(tmp_path, windows):
    """The checkpoint's weights fit its own chunk choices: a model converted anew with others cannot take them."""
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8]).train()
    args = training_arguments(str(tmp_path), max_steps=2, batch_size=8, save_steps=2, disable_tqdm=True)
    uptrain(model, lm_dataset(windows), args)
    other = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8], selection="high").train()
    args = training_arguments(str(tmp_path), max_steps=4, batch_size=8, save_steps=2, disable_tqdm=True)
    with pytest.raises(ValueError, match="holds a conversion other than this model's"):
        uptrain(other, lm_dataset(windows), args, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


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


def test_hidden_state_loss_is_zero_for_the_teacher_and_needs_its_depth():
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(3))  # embeddings + 2 layers
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert hidden_state_loss(teacher, teacher, mask) == 0
    student = tuple(h.clone().requires_grad_(True) for h in teacher)
    shifted = (student[0], student[1] + 1.0, student[2])
    loss = hidden_state_loss(shifted, teacher, mask)
    expected = (torch.ones(2, 5, 8).sum() / teacher[1].pow(2).sum()) / 2  # one layer of two is off by 1 everywhere
    assert torch.allclose(loss, expected)
    loss.backward()
    assert student[1].grad.abs().sum() > 0 and student[0].grad is None  # the embeddings do not count
    with pytest.raises(ValueError, match="depth"):
        hidden_state_loss(student[:2], teacher, mask)


def test_hidden_weight_needs_a_teacher(tmp_path, windows):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8])
    args = training_arguments(str(tmp_path), max_steps=1, batch_size=8, disable_tqdm=True)
    with pytest.raises(ValueError, match="teacher"):
        EliteKVTrainer(model=model, args=args, train_dataset=lm_dataset(windows), hidden_weight=1.0)


def test_latent_lr_ratio_scales_only_the_low_rank_projections(tmp_path, windows):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, calibration_data=windows[:8]).train()
    names = latent_parameter_names(model)
    assert names and all(n.split(".")[-2] in {"kv_down_proj", "k_up_proj", "v_up_proj"} for n in names)
    assert not any(".mlp." in n for n in names)  # the MLP's up_proj/down_proj are not latent projections
    args = training_arguments(
        str(tmp_path), max_steps=4, batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, disable_tqdm=True
    )
    trainer = uptrain(model, lm_dataset(windows), args, latent_lr_ratio=8.0)
    latent = {id(p) for n, p in model.named_parameters() if n in names}
    groups = trainer.optimizer.param_groups
    latent_groups = [g for g in groups if any(id(p) in latent for p in g["params"])]
    other_groups = [g for g in groups if not any(id(p) in latent for p in g["params"])]
    assert latent_groups and other_groups
    assert all(all(id(p) in latent for p in g["params"]) for g in latent_groups)  # no mixed group
    assert sum(len(g["params"]) for g in latent_groups) == len(names)
    # the cosine schedule scales both alike: the ratio holds after training steps
    for g in latent_groups:
        assert g["lr"] == pytest.approx(8.0 * other_groups[0]["lr"])
    assert {g["initial_lr"] for g in latent_groups} == {8e-3}


def test_latent_lr_ratio_refuses_a_model_without_latent_projections(tmp_path, windows):
    args = training_arguments(str(tmp_path), max_steps=1, batch_size=8, disable_tqdm=True)
    with pytest.raises(ValueError, match="get_peft_model"):
        uptrain(tiny_model("llama_gqa"), lm_dataset(windows), args, latent_lr_ratio=4.0)
    with pytest.raises(ValueError, match="latent_lr_ratio"):
        EliteKVTrainer(model=tiny_model("llama_gqa"), args=args, latent_lr_ratio=0.0)


@pytest.mark.slow  # torch.compile builds C++ kernels on the CPU: about a minute
def test_torch_compile_distills_like_eager(tmp_path, windows):
    """``torch_compile=True`` compiles the student and the teacher; the losses stay those of the eager run."""
    original = tiny_model("llama_gqa")
    losses, trainers = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = convert(copy.deepcopy(original), kv_ratio=0.25, calibration_data=windows[:8]).train()
        args = training_arguments(
            str(tmp_path / str(compiled)),
            max_steps=3,
            batch_size=8,
            learning_rate=1e-3,
            logging_steps=1,
            warmup_ratio=0.0,
            disable_tqdm=True,
            torch_compile=compiled,
        )
        trainers[compiled] = uptrain(model, lm_dataset(windows), args, teacher=copy.deepcopy(original))
        losses[compiled] = logged_losses(trainers[compiled])
    compiled_module = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(trainers[True].model_wrapped, compiled_module)
    assert not isinstance(trainers[False].model_wrapped, compiled_module)
    assert isinstance(trainers[True].teacher_forward(), compiled_module)
    assert trainers[False].teacher_forward() is trainers[False].teacher
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
