"""Convert and uptrain in one go with TRL's `SFTTrainer` and ``peft_config=EliteKVConfig(...)``.

`SFTTrainer` receives the *base* model and an `EliteKVConfig` holding the calibration windows; it calls
``get_peft_model`` itself (calibration, RoPElite chunk search, low-rank latent), then trains with the LM loss on a
`datasets.Dataset` whose ``input_ids`` column holds token windows. After training: perplexity on held-out windows
and ``trainer.model.save_pretrained(out)`` (a PEFT adapter and a standalone model, which loads with
``AutoModelForCausalLM.from_pretrained`` after ``import elitekv_peft``).

By default the model is SmolLM2-135M and the data the Python docs; ``--tiny`` swaps in a tiny random Llama, a tiny
word-level tokenizer and synthetic Markov-chain windows, so the script runs in well under a minute on a CPU.

Run it (from the repository root, after ``bash scripts/setup.sh``):

    # CPU, tiny model, synthetic data (about 10 s)
    python examples/uptrain_trl.py --tiny --train-tokens 20000 --out /tmp/ex_trl

    # CPU, real model: a smoke run only (about a minute per step of 4 x 512 tokens on two cores)
    python examples/uptrain_trl.py --train-tokens 4096 --batch-size 4 --eval-windows 4 --out out/uptrain-trl-cpu

    # one GPU, real model: 30M tokens, batch 32 x 512, bf16
    python examples/uptrain_trl.py --out out/uptrain-trl

    # several GPUs: --train-tokens is the global budget, --batch-size is per GPU
    accelerate launch --num_processes 2 examples/uptrain_trl.py --out out/uptrain-trl-ddp

    # the same DDP path on a CPU (two processes, gloo), with the tiny model
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/uptrain_trl.py --tiny --out /tmp/d

(`SFTConfig` turns gradient checkpointing on by default; ``--no-gradient-checkpointing`` turns it off, which is
faster when memory allows.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from common import add_run_arguments, check_run_arguments, load_model_and_data, resolve_defaults, write_summary
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

import elitekv_peft  # noqa: F401  (registers EliteKV with PEFT and AutoModelForCausalLM)
from elitekv_peft import EliteKVConfig, check_fsdp_launch
from elitekv_peft.evaluation import perplexity, sharded_perplexity
from elitekv_peft.quantization import quantize_frozen
from elitekv_peft.training import plan_steps, process_count


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert with EliteKV and uptrain with TRL's SFTTrainer (peft_config=EliteKVConfig).",
        epilog="Defaults marked 'auto' depend on --tiny and on whether a GPU is present.",
    )
    add_run_arguments(parser)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="SFTConfig turns it on by default")
    parser.add_argument("--out", default="out/uptrain-trl", help="output folder (default out/uptrain-trl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return check_run_arguments(parser, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    args = resolve_defaults(args, on_gpu)
    progress = not args.no_progress
    out = Path(args.out)
    started = time.time()

    # The SFTConfig comes first: it sets up the (distributed) state exactly as the trainer will use it, so
    # PartialState() below knows the process rank and device under `accelerate launch` / torchrun.
    world_size = process_count()  # WORLD_SIZE, as accelerate launch / torchrun set it
    plan = plan_steps(args.train_tokens, args.batch_size, args.seq_len, world_size=world_size)
    config = SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=plan.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(0, round(0.03 * plan.max_steps)),
        logging_steps=max(1, plan.max_steps // 20),
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        seed=args.seed,
        max_length=args.seq_len,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": False},
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        ddp_find_unused_parameters=False,  # every trainable parameter is used in each step
        include_num_input_tokens_seen=True,  # the trained tokens, counted (recorded in the summary)
        **({"gradient_checkpointing": False} if args.no_gradient_checkpointing else {}),
    )
    state = PartialState()
    if state.num_processes != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but the trainer's state has {state.num_processes} processes")

    def say(message: str) -> None:
        if state.is_main_process:
            print(f"[uptrain_trl] {message}", flush=True)

    model, tokenizer, data = load_model_and_data(args, state)
    check_fsdp_launch(model, fused_lm_head=True)  # fail now, not at the first step, on FSDP settings that fail
    say(
        f"{'tiny Llama' if args.tiny else 'SmolLM2-135M'} on {state.device} x {state.num_processes} process(es); "
        f"windows of {args.seq_len}: train {len(data['train'])}, held-out {len(data['eval'])}, "
        f"calibration {len(data['calib'])}"
    )
    say(f"SFT uptraining (trainable={args.trainable}): {plan.max_steps} steps = {plan.tokens:,} tokens")
    trainer = SFTTrainer(
        model=model,  # the base model: SFTTrainer converts it with the peft_config below
        args=config,
        train_dataset=Dataset.from_dict({"input_ids": data["train"].tolist()}),
        processing_class=tokenizer,
        peft_config=EliteKVConfig(
            kv_ratio=args.kv_ratio,
            selection=args.selection,
            calibration_data=data["calib"],
            trainable=args.trainable,
            seed=args.seed,
        ),
    )
    if args.quantize:  # before train(): the optimizer is built there, over the trainable (dense) parameters
        replaced = quantize_frozen(trainer.model, args.quantize)
        say(f"{len(replaced)} frozen linear layers now in bitsandbytes {args.quantize}")
    if trainer.is_world_process_zero():
        trainer.model.print_trainable_parameters()
    # every process evaluates its share of the windows (FSDP's forward is collective)
    rows: dict[str, float] = {"training_free": sharded_perplexity(trainer.model, data["eval"], progress=progress)}
    say(f"perplexity of the training-free EliteKV model: {rows['training_free']:.2f}")
    trainer.train()

    rows["uptrained_sft"] = sharded_perplexity(trainer.model_wrapped, data["eval"], progress=progress)
    trainer.save_model(str(out))  # gathers FSDP shards first; the main process writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        if args.check_reload:  # what a user gets back from the folder, evaluated on the same windows
            reloaded = AutoModelForCausalLM.from_pretrained(str(out)).to(state.device)
            rows["reloaded"] = perplexity(reloaded, data["eval"], progress=progress)
        write_summary(
            out, args, trainer, rows, processes=state.num_processes, started=started,
            train_tokens=trainer.state.num_input_tokens_seen,  # counted by the Trainer, all processes
            say=say,
        )  # fmt: skip
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
