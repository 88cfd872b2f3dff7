"""Convert a model with EliteKV, then uptrain it with the Hugging Face `Trainer` (`EliteKVTrainer`).

Steps: load the model and token windows -> (``--loss distill``: keep a copy of the original as teacher) ->
``get_peft_model(model, EliteKVConfig(kv_ratio=..., calibration_data=...))`` -> perplexity of the original and the
training-free model on held-out windows (``elitekv_peft.evaluation``) -> ``EliteKVTrainer(...).train()`` (the
Trainer with LM loss, or KL to the teacher) -> perplexity again -> ``trainer.save_model`` (``save_pretrained``: a PEFT
adapter and a standalone model) -> with ``--check-reload``, ``AutoModelForCausalLM.from_pretrained`` (after
``import elitekv_peft``) and its perplexity on the same windows.

By default the model is SmolLM2-135M and the data the Python docs (train split for training and calibration,
held-out files for perplexity); ``--tiny`` swaps in a tiny random Llama and synthetic Markov-chain windows so the
whole script runs in well under a minute on a CPU.

Run it (from the repository root, after ``bash scripts/setup.sh``):

    # CPU, tiny model, synthetic data (about 10 s)
    python examples/uptrain.py --tiny --train-tokens 20000 --out /tmp/ex_up
    # (the tiny teacher is a random model that the converted one already matches closely: the KL starts near 0)
    python examples/uptrain.py --tiny --loss distill --trainable attention --out /tmp/ex_up_distill

    # CPU, real model: a smoke run only (about a minute per step of 4 x 512 tokens on two cores)
    python examples/uptrain.py --train-tokens 4096 --batch-size 4 --eval-windows 4 --out out/uptrain-cpu

    # one GPU, real model: 30M tokens, batch 32 x 512, bf16
    python examples/uptrain.py --out out/uptrain --save-steps 200
    python examples/uptrain.py --out out/uptrain --save-steps 200 --resume-from-checkpoint last

    # several GPUs (DDP), unchanged: --train-tokens is the global budget, --batch-size is per GPU;
    # --check-reload evaluates the saved folder again through AutoModelForCausalLM
    accelerate launch --num_processes 2 examples/uptrain.py --out out/uptrain-ddp --check-reload

    # QLoRA-style: MLPs frozen in 4-bit NF4 (bitsandbytes), attention and norms trained in full precision
    python examples/uptrain.py --tiny --quantize 4bit --trainable attention_norms --out /tmp/ex_up_4bit

    # the same DDP path on a CPU (two processes, gloo), with the tiny model
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/uptrain.py --tiny --out /tmp/ex_ddp

Every process converts its own copy (same data, same result; DDP then broadcasts rank 0's weights and buffers);
every process evaluates a share of the held-out windows (`sharded_perplexity`), the Trainer saves (`save_model`
gathers FSDP shards into the full state dict first) and the main process prints the summary.
Trainer checkpoints go to ``<out>/checkpoints``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from common import add_run_arguments, check_run_arguments, load_model_and_data, resolve_defaults, write_summary
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import elitekv_peft  # noqa: F401  (registers EliteKV with PEFT and AutoModelForCausalLM)
from elitekv_peft import EliteKVConfig, check_fsdp_launch
from elitekv_peft.evaluation import perplexity, sharded_perplexity
from elitekv_peft.quantization import quantize_frozen
from elitekv_peft.training import EliteKVTrainer, lm_dataset, plan_steps, process_count, training_arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert with EliteKV and uptrain with the HF Trainer.",
        epilog="Defaults marked 'auto' depend on --tiny and on whether a GPU is present.",
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--loss", default="distill", choices=["distill", "lm"], help="KL to the original (default) or LM loss"
    )
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: none)")
    parser.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="a checkpoint folder, or 'last' for the newest one under <out>/checkpoints",
    )
    parser.add_argument("--out", default="out/uptrain", help="output folder (default out/uptrain)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return check_run_arguments(parser, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_defaults(parse_args(argv), on_gpu=torch.cuda.is_available())
    progress = not args.no_progress
    out = Path(args.out)
    started = time.time()

    # The TrainingArguments come first: they set up the (distributed) state exactly as the Trainer will use it, so
    # PartialState() below knows the process rank and device under `accelerate launch` / torchrun, on GPUs or CPUs.
    world_size = process_count()  # WORLD_SIZE, as accelerate launch / torchrun set it
    plan = plan_steps(args.train_tokens, args.batch_size, args.seq_len, args.grad_accum, world_size)
    train_args = training_arguments(
        str(out / "checkpoints"),
        max_steps=plan.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        seed=args.seed,
        save_steps=args.save_steps,
        logging_steps=max(1, plan.max_steps // 20),
        disable_tqdm=not progress,
        ddp_find_unused_parameters=False,  # every trainable parameter is used in each step
    )
    state = PartialState()
    if state.num_processes != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but the Trainer's state has {state.num_processes} processes")
    main_process = state.is_main_process

    def say(message: str) -> None:
        if main_process:
            print(f"[uptrain] {message}", flush=True)

    model, tokenizer, data = load_model_and_data(args, state)
    check_fsdp_launch(model)  # fail now, not after calibration, on FSDP settings that fail
    say(
        f"{'tiny Llama' if args.tiny else 'SmolLM2-135M'} on {state.device} x {state.num_processes} process(es); "
        f"windows of {args.seq_len}: train {len(data['train'])}, held-out {len(data['eval'])}, "
        f"calibration {len(data['calib'])}"
    )
    # every process evaluates its share of the windows (FSDP's forward is collective; DDP gets faster)
    rows: dict[str, float] = {"original": sharded_perplexity(model, data["eval"], progress=progress)}

    # the teacher is the original model: copy it BEFORE the conversion rewrites the attention in place
    teacher = copy.deepcopy(model).eval() if args.loss == "distill" else None
    config = EliteKVConfig(
        kv_ratio=args.kv_ratio,
        selection=args.selection,
        calibration_data=data["calib"],
        trainable=args.trainable,
        seed=args.seed,
    )
    model = get_peft_model(model, config)
    if args.quantize:
        replaced = quantize_frozen(model, args.quantize)
        say(f"{len(replaced)} frozen linear layers now in bitsandbytes {args.quantize}")
    if main_process:
        model.print_trainable_parameters()
    rows["training_free"] = sharded_perplexity(model, data["eval"], progress=progress)
    if main_process:
        say(f"perplexity: original {rows['original']:.2f}, training-free EliteKV {rows['training_free']:.2f}")

    say(f"uptraining ({args.loss} loss, trainable={args.trainable}): {plan.max_steps} steps = {plan.tokens:,} tokens")
    resume: str | bool | None = args.resume_from_checkpoint
    if resume == "last":
        resume = True
    # the Hugging Face Trainer, with the distillation loss when there is a teacher
    trainer = EliteKVTrainer(model=model, args=train_args, train_dataset=lm_dataset(data["train"]), teacher=teacher)
    trainer.train(resume_from_checkpoint=resume)

    # through the DDP/FSDP wrapper, on every process; then the Trainer saves (it gathers FSDP shards first)
    rows[f"uptrained_{args.loss}"] = sharded_perplexity(trainer.model_wrapped, data["eval"], progress=progress)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        if args.check_reload:  # what a user gets back from the folder, evaluated on the same windows
            reloaded = AutoModelForCausalLM.from_pretrained(str(out)).to(state.device)
            rows["reloaded"] = perplexity(reloaded, data["eval"], progress=progress)
        write_summary(
            out, args, trainer, rows, processes=state.num_processes, started=started,
            train_tokens=trainer.state.num_input_tokens_seen,  # counted by the Trainer, all processes
            say=say, loss=args.loss,
        )  # fmt: skip
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
