"""Uptraining with the Hugging Face `Trainer`: plain LM loss, or self-distillation from the original model.

`EliteKVTrainer` is a `transformers.Trainer` whose loss can add a KL term to a frozen teacher (the model before
conversion) and a hidden-state term (each layer's output matched to the teacher's). The KL is computed in chunks of
tokens under activation checkpointing, so the float32 softmaxes of a ``[tokens, vocab]`` batch are never all alive
at once. The optimizer can give the new low-rank projections a learning rate of their own (``latent_lr_ratio``,
as LoRA+ does for LoRA's B). Everything else (optimizer, schedule, mixed precision, checkpoints and resuming,
DDP/FSDP through ``accelerate launch``) is the Trainer's own.

`uptrain` runs an `EliteKVTrainer` with given `TrainingArguments`; `uptrain_tokens` builds them for a token budget
(`plan_steps`, `training_arguments`) and runs it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

from .adapter_source import read_weights_from
from .distill_losses import chunked_kl, hidden_state_loss
from .distributed import check_fsdp_launch, check_same_conversion
from .progressive import ProgressiveConversion

IGNORE_INDEX = -100
# The projections conversion creates from a low-rank factorization (EliteKV, LoRC); ``latent_lr_ratio`` scales theirs.
LATENT_PROJECTIONS = frozenset({"kv_down_proj", "k_up_proj", "v_up_proj", "k_down_proj", "v_down_proj"})


def latent_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the low-rank projections conversion created (``*.kv_down_proj.weight``, ...)."""
    return {name for name, _ in model.named_parameters() if _owner(name) in LATENT_PROJECTIONS}


def _owner(parameter_name: str) -> str:
    """The name of the module holding a parameter: ``"kv_down_proj"`` for ``"...self_attn.kv_down_proj.weight"``."""
    parts = parameter_name.split(".")
    return parts[-2] if len(parts) > 1 else ""


def scale_latent_learning_rate(optimizer: torch.optim.Optimizer, model: nn.Module, ratio: float) -> None:
    """Move the latent projections' parameters of every param group of ``optimizer`` into a twin group whose
    learning rate is ``ratio`` times the group's. Call before the scheduler is made (it records each group's lr)."""
    names = latent_parameter_names(model)
    latent = {id(p) for name, p in model.named_parameters() if name in names}
    if not latent:
        raise ValueError(
            "latent_lr_ratio applies to the low-rank projections of a converted model (EliteKV or LoRC), and this "
            "model has none: convert it with get_peft_model first, or leave latent_lr_ratio at 1.0."
        )
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in latent]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in latent]
        twin = {key: value for key, value in group.items() if key != "params"}
        optimizer.add_param_group({**twin, "params": moved, "lr": group["lr"] * ratio})
    optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]


class EliteKVTrainer(Trainer):
    """A `Trainer` with optional self-distillation and a separate learning rate for the latent projections.

    Args:
        teacher: frozen model giving target logits (e.g. the model before conversion), or None for LM loss only.
        distill_weight: loss = ``distill_weight * KL + (1 - distill_weight) * LM`` when a teacher is given.
        temperature: distillation temperature.
        hidden_weight: adds ``hidden_weight *`` `hidden_state_loss` (every layer's output against the teacher's;
            needs a teacher of the same depth).
        latent_lr_ratio: learning rate of the low-rank projections (``kv_down_proj``, ``k_up_proj``, ``v_up_proj``;
            LoRC's ``k_down_proj``/``v_down_proj``) over the rest's, as LoRA+'s ``loraplus_lr_ratio``.
        progressive_stages: above 1, the converted layers start to run in that many groups, first to last, the
            others running the teacher's attention until their turn (`elitekv_peft.progressive`; needs the teacher).
        progressive_share: part of the training steps before the last group starts.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        hidden_weight: float = 0.0,
        latent_lr_ratio: float = 1.0,
        progressive_stages: int = 1,
        progressive_share: float = 0.5,
        **kwargs: Any,
    ) -> None:
        check_fsdp_launch(kwargs.get("model", args[0] if args else None))
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight={distill_weight} must be in [0, 1].")
        if hidden_weight < 0.0:
            raise ValueError(f"hidden_weight={hidden_weight} must be >= 0.")
        if hidden_weight > 0.0 and teacher is None:
            raise ValueError("hidden_weight > 0 matches hidden states to a teacher's: pass teacher=<original model>.")
        if latent_lr_ratio <= 0.0:
            raise ValueError(f"latent_lr_ratio={latent_lr_ratio} must be > 0 (1.0 keeps one learning rate).")
        if progressive_stages > 1 and teacher is None:
            raise ValueError(
                "progressive_stages > 1 runs the original attention until each layer's turn: pass "
                "teacher=<original model> (distillation), or progressive_stages=1."
            )
        super().__init__(*args, **kwargs)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "No parameter of this model trains: it was loaded for inference (PeftModel.from_pretrained without "
                "is_trainable=True) or converted with EliteKVConfig(trainable='none'). Load it with "
                "is_trainable=True, or choose trainable='all' / 'attention' / 'attention_norms'."
            )
        peft_configs = getattr(self.model, "peft_config", None)
        for config in peft_configs.values() if isinstance(peft_configs, dict) else ():
            if getattr(config, "is_converted", False):
                check_same_conversion(config)  # the process group is up once the TrainingArguments exist
        if progressive_stages > 1 and self.args.load_best_model_at_end:
            raise ValueError(
                "progressive_stages > 1 evaluates a partly converted model until the last group of layers switches on, "
                "so load_best_model_at_end would pick among scores of different models: set "
                "load_best_model_at_end=False (the final model is the fully converted one), or progressive_stages=1."
            )
        if progressive_stages > 1:
            self.add_callback(ProgressiveConversion(self.model, teacher, progressive_stages, progressive_share))
        self.teacher = teacher
        self._teacher_forward: nn.Module | None = None  # the teacher, compiled with the student (`torch_compile`)
        self.distill_weight, self.temperature, self.hidden_weight = distill_weight, temperature, hidden_weight
        self.latent_lr_ratio = latent_lr_ratio
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            # the distillation loss is a mean per micro-batch: the Trainer divides it by the accumulation steps
            self.model_accepts_loss_kwargs = False

    def teacher_forward(self) -> nn.Module:
        """The teacher as the loss calls it: compiled (once) when the student is (``args.torch_compile``)."""
        if self._teacher_forward is None:
            compiled = self.args.torch_compile and self.teacher is not None
            self._teacher_forward = torch.compile(self.teacher) if compiled else self.teacher
        return self._teacher_forward

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: an EliteKV adapter reads its weights from the checkpoint's standalone model files."""
        read_weights_from(self.model if model is None else model, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the adapter reads its weights from the best checkpoint's standalone files."""
        if self.state.best_model_checkpoint is not None:
            read_weights_from(self.model, self.state.best_model_checkpoint)
        super()._load_best_model()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.latent_lr_ratio != 1.0:
            scale_latent_learning_rate(optimizer, self.model if model is None else model, self.latent_lr_ratio)
        return optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        hidden = self.hidden_weight > 0.0
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        # the student's own LM loss (a softmax over the vocabulary) only when it is mixed in
        outputs = model(**batch, labels=labels if self.distill_weight < 1.0 else None, output_hidden_states=hidden)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        # the teacher is not prepared by accelerate: run it in the student's mixed precision, not in float32
        with torch.no_grad(), self.accelerator.autocast():
            teacher_outputs = self.teacher_forward()(**batch, output_hidden_states=hidden)
        # logits at position t predict token t+1: count the positions whose next-token label is real
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        kl = chunked_kl(outputs.logits, teacher_outputs.logits, mask, self.temperature)
        loss = self.distill_weight * kl
        if self.distill_weight < 1.0:
            loss = loss + (1.0 - self.distill_weight) * outputs.loss
        if hidden:
            loss = loss + self.hidden_weight * hidden_state_loss(
                outputs.hidden_states, teacher_outputs.hidden_states, mask
            )
        return (loss, outputs) if return_outputs else loss


@dataclass
class UptrainPlan:
    """Steps and tokens of a run for a token budget."""

    max_steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step


def process_count() -> int:
    """Processes that train together: ``WORLD_SIZE`` as `accelerate launch` / torchrun set it, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def plan_steps(
    train_tokens: int, batch_size: int, seq_len: int, grad_accum: int = 1, world_size: int = 1
) -> UptrainPlan:
    """Optimizer steps needed to see ``train_tokens`` tokens (rounded up) over ``world_size`` processes."""
    per_step = batch_size * seq_len * grad_accum * world_size
    return UptrainPlan(max(1, math.ceil(train_tokens / per_step)), per_step)


def whole_steps(dataset: Any, batch_size: int, grad_accum: int = 1, processes: int = 1) -> Any:
    """The first rows of ``dataset`` (windows of the same length) that fill whole optimizer steps of ``batch_size`` x
    ``grad_accum`` windows on each of ``processes``: a pass over them ends with no short step, so every step trains
    the tokens :func:`plan_steps` counts. ``ValueError`` when there is not one step's worth."""
    step = batch_size * grad_accum * processes
    if len(dataset) < step:
        raise ValueError(
            f"{len(dataset)} training windows are fewer than one step ({batch_size} x {grad_accum} x {processes} "
            "process(es)): give more text, or a smaller batch_size or grad_accum (or seq_len)."
        )
    return dataset.select(range(len(dataset) - len(dataset) % step)) if len(dataset) % step else dataset


def training_arguments(
    output_dir: str,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float = 1e-4,
    grad_accum: int = 1,
    warmup_ratio: float = 0.03,
    seed: int = 0,
    save_steps: int | None = None,
    logging_steps: int = 10,
    bf16: bool | None = None,
    report_to: str = "none",
    **overrides: Any,
) -> TrainingArguments:
    """`TrainingArguments` for uptraining: cosine schedule, AdamW, bf16 where the device supports it.

    The Trainer counts the tokens it trains (``trainer.state.num_input_tokens_seen``, all processes): a pass over
    data that does not divide into whole steps ends with a short one, so ``max_steps`` from :func:`plan_steps` can
    train fewer tokens than planned (:func:`uptrain_tokens` cuts the data to whole steps). The short last batch is
    kept (``dataloader_drop_last`` would also drop evaluation windows)."""
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1 if max_steps > 1 and warmup_ratio > 0 else 0, round(warmup_ratio * max_steps)),
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or max_steps,
        seed=seed,
        bf16=bf16,
        report_to=report_to,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=False,
        include_num_input_tokens_seen=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def uptrain(
    model: nn.Module,
    train_dataset: Any,
    args: TrainingArguments,
    *,
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
    hidden_weight: float = 0.0,
    latent_lr_ratio: float = 1.0,
    progressive_stages: int = 1,
    resume_from_checkpoint: str | bool | None = None,
) -> EliteKVTrainer:
    """Train ``model`` on ``train_dataset`` (``input_ids``/``labels`` columns) and return the trainer.

    ``teacher``, ``distill_weight``, ``hidden_weight``, ``latent_lr_ratio`` and ``progressive_stages`` are
    `EliteKVTrainer`'s."""
    trainer = EliteKVTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=default_data_collator,
        teacher=teacher,
        distill_weight=distill_weight,
        hidden_weight=hidden_weight,
        latent_lr_ratio=latent_lr_ratio,
        progressive_stages=progressive_stages,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def uptrain_tokens(
    model: nn.Module,
    train: Any,
    train_tokens: int,
    *,
    batch_size: int,
    seq_len: int,
    learning_rate: float = 1e-4,
    grad_accum: int = 1,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
    hidden_weight: float = 0.0,
    latent_lr_ratio: float = 1.0,
    progressive_stages: int = 1,
    progress: bool = True,
    **overrides: Any,
) -> tuple[EliteKVTrainer, UptrainPlan]:
    """Uptrain ``model`` on ``train_tokens`` tokens (rounded up to whole steps, over all processes) of ``train`` and
    leave it in eval mode.

    The run writes no checkpoints (its Trainer folder is temporary) and logs the loss 20 times. Returns the trainer
    (its ``state.log_history``: :func:`logged_losses`; ``state.num_input_tokens_seen``: the tokens trained) and the
    `UptrainPlan`. The windows are cut to whole steps (at most one step's worth left out); ``ValueError`` when
    ``train`` holds fewer windows than one step.

    Args:
        train: windows ``[N, seq_len]`` (wrapped with :func:`lm_dataset`) or a dataset with ``input_ids`` /
            ``labels`` columns of ``seq_len`` tokens.
        overrides: more `TrainingArguments` fields (e.g. ``use_cpu=True``); the rest is :func:`uptrain`'s.
    """
    processes = process_count()
    plan = plan_steps(train_tokens, batch_size, seq_len, grad_accum, processes)
    dataset = lm_dataset(train) if isinstance(train, torch.Tensor) else train
    dataset = whole_steps(dataset, batch_size, grad_accum, processes)
    with tempfile.TemporaryDirectory(prefix="elitekv-trainer-") as folder:
        args = training_arguments(
            folder,
            max_steps=plan.max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            learning_rate=learning_rate,
            seed=seed,
            logging_steps=max(1, plan.max_steps // 20),
            disable_tqdm=not progress,
            **overrides,
        )
        model.train()
        trainer = uptrain(
            model,
            dataset,
            args,
            teacher=teacher,
            distill_weight=distill_weight,
            hidden_weight=hidden_weight,
            latent_lr_ratio=latent_lr_ratio,
            progressive_stages=progressive_stages,
        )
    model.eval()
    return trainer, plan


def logged_losses(trainer: Trainer) -> list[float]:
    """The training losses ``trainer`` logged (every ``logging_steps`` steps), oldest first."""
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def lm_dataset(windows: torch.Tensor) -> Any:
    """Wrap windows ``[N, T]`` as a ``datasets.Dataset`` for the Hugging Face Trainer.

    Columns ``input_ids`` and ``labels`` (equal; the model shifts labels itself), each a list of
    ``T`` int64 per row.  ``transformers.default_data_collator`` stacks them into ``[B, T]``.
    """
    import datasets

    if windows.dim() != 2:
        raise ValueError(f"windows must be [N, T], got shape {tuple(windows.shape)}")
    arr = windows.detach().cpu().long().numpy()
    return datasets.Dataset.from_dict({"input_ids": arr, "labels": arr.copy()})
