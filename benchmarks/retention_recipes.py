"""Uptraining recipes for the retention benchmark (``benchmarks/retention.py``), and self-generated training text.

A recipe is the settings of ``elitekv run`` (:class:`elitekv_peft.pipeline.JobSettings`, resolved for the device)
with a few changed, plus the self-generation knobs:

* ``"default"``: exactly what ``elitekv run`` does by default (whatever ``JobSettings`` says today);
* ``"lm"``: LM loss on the Python docs' train split;
* ``"distill"``: KL to the original model (the teacher is the unconverted model as loaded);
* ``"selfgen"``: distillation on a mix of real text and text sampled from the original model itself (prompts are
  real-text prefixes of varied lengths, temperatures varied per batch), generated once and cached on disk;
* ``"broad"``: distillation on every training corpus (Python docs, Linux kernel docs, PostgreSQL manual);
* ``"none"``: no training (the training-free conversion; and the original as is).

``--set key=value`` changes any knob (a ``JobSettings`` field or a ``selfgen_*`` knob); every row records its knobs.
:func:`uptrain_row` trains a converted model by its recipe, stopping at a deadline with a checkpoint to resume from.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

RECIPES = ("default", "lm", "distill", "selfgen", "broad", "none")
BROAD_CORPORA = ("pydocs", "linuxdoc", "pgdocs")
UNRECORDED = ("device", "progress", "output_dir", "extra", "eval_windows", "kv_ratio", "method")


@dataclasses.dataclass
class SelfGen:
    """How much text the original model writes for training, and how.

    Attributes:
        fraction: share of the training windows that are generated (0: none).
        tokens: tokens to generate (each sample is one window of ``seq_len`` tokens, its prompt included).
        temperatures: sampling temperatures, one per batch in turn.
        prompt_lengths: lengths of the real-text prompts, one per batch in turn.
        batch: samples generated at once.
    """

    fraction: float = 0.0
    tokens: int = 0
    temperatures: tuple[float, ...] = (0.7, 0.9, 1.0, 1.2)
    prompt_lengths: tuple[int, ...] = (1, 4, 16, 64)
    batch: int = 512


@dataclasses.dataclass
class Recipe:
    """A named recipe: ``job`` (resolved ``JobSettings``) and ``selfgen``."""

    name: str
    job: Any
    selfgen: SelfGen

    def knobs(self) -> dict[str, Any]:
        """What the row records: the job's training and conversion fields, and the selfgen knobs when used."""
        knobs = {k: v for k, v in dataclasses.asdict(self.job).items() if k not in UNRECORDED}
        knobs = {k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()}
        if self.selfgen.fraction > 0:
            knobs.update({f"selfgen_{k}": list(v) if isinstance(v, tuple) else v for k, v in _fields(self.selfgen)})
        return knobs


def _fields(obj: Any) -> list[tuple[str, Any]]:
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]


def _convert_value(text: str, current: Any, name: str) -> Any:
    """``text`` parsed as the type of the knob's current value (``a,b`` for tuples; ``none`` for ``None``)."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(current, tuple):
        items = [t.strip() for t in text.split(",") if t.strip()]
        kind = type(current[0]) if current else str
        return tuple(kind(t) for t in items)
    if isinstance(current, int) and not isinstance(current, bool):
        return int(float(text))
    if isinstance(current, float):
        return float(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_recipe(name: str, device: str, overrides: dict[str, str] | None = None) -> Recipe:
    """The recipe called ``name`` for ``device`` (``"cuda"`` or ``"cpu"``), with ``overrides`` applied.

    Raises:
        ValueError: an unknown recipe or knob (the message lists the known ones).
    """
    from elitekv_peft.pipeline import JobSettings

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose from {', '.join(RECIPES)}")
    job = JobSettings(device=device, progress=False)
    on_gpu = device.startswith("cuda")
    selfgen = SelfGen()
    if name == "lm":
        job.loss = "lm"
    elif name in ("distill", "selfgen", "broad"):
        job.loss = "distill"
    elif name == "none":
        job.loss, job.train_tokens = "none", 0
    if name == "selfgen":
        selfgen.fraction, selfgen.tokens = 0.5, 4_000_000 if on_gpu else 4_096
    if name == "broad":
        job.train_corpora = BROAD_CORPORA
    for key, text in (overrides or {}).items():
        if key.startswith("selfgen_") and hasattr(selfgen, key[len("selfgen_") :]):
            field = key[len("selfgen_") :]
            setattr(selfgen, field, _convert_value(text, getattr(selfgen, field), key))
        elif hasattr(job, key) and key not in UNRECORDED:
            current = getattr(job, key)
            if current is None:  # device-dependent defaults: resolve first to learn the type
                current = getattr(JobSettings(device=device).resolved(), key, None)
            setattr(job, key, _convert_value(text, current, key))
        else:
            knobs = [f.name for f in dataclasses.fields(job) if f.name not in UNRECORDED]
            knobs += [f"selfgen_{f.name}" for f in dataclasses.fields(selfgen)]
            raise ValueError(f"unknown knob {key!r} for --set: choose from {', '.join(knobs)}")
    if name == "none":  # whatever --set said about training: none happens
        job.loss, job.train_tokens = "none", 0
        for knob, default in (("distill_weight", 1.0), ("hidden_weight", 0.0), ("torch_compile", False)):
            if hasattr(job, knob):
                setattr(job, knob, default)
    if getattr(job, "teacher", None):
        raise ValueError("--set teacher: the retention rows distill from the original model itself; drop teacher")
    return Recipe(name, job.resolved(), selfgen)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of the config and of every parameter's sum and first values (cheap; tells models apart)."""
    h = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().float().reshape(-1)
            h.update(f"{name}:{float(flat.sum()):.6e}:{flat[:4].tolist()}".encode())
    return h.hexdigest()[:16]


def generate_text(
    model: torch.nn.Module,
    prompts_from: torch.Tensor,
    knobs: SelfGen,
    seq_len: int,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """Windows ``[M, seq_len]`` sampled from ``model``, ``M = ceil(knobs.tokens / seq_len)``, and the seconds it took.

    Batch ``i`` takes ``knobs.batch`` prompts of length ``P = prompt_lengths[i % len]`` from random windows of
    ``prompts_from`` ``[N, T]`` (random offsets) and samples ``seq_len - P`` new tokens at temperature
    ``temperatures[i % len]`` (no top-k/top-p; EOS suppressed so every sample fills its window). The result is
    cached under ``cache_dir`` (default ``<ELITEKV cache>/selfgen``) keyed by the model, the prompt text and the
    knobs; a cached result returns the seconds the generation took when it ran.
    """
    from elitekv_demo.corpora import cache_root

    n_samples = -(-knobs.tokens // seq_len)
    if n_samples <= 0:
        return torch.empty(0, seq_len, dtype=torch.long), 0.0
    if prompts_from.dim() != 2 or prompts_from.shape[0] == 0:
        raise ValueError(f"prompts_from must be a non-empty [N, T] tensor, got {tuple(prompts_from.shape)}")
    lengths = [min(p, seq_len - 1, prompts_from.shape[1]) for p in knobs.prompt_lengths]
    key = hashlib.sha1()
    key.update(model_fingerprint(model).encode())
    key.update(hashlib.sha1(prompts_from.to(torch.int64).numpy().tobytes()).digest())
    key.update(json.dumps([n_samples, seq_len, seed, knobs.temperatures, lengths, knobs.batch]).encode())
    folder = cache_dir if cache_dir is not None else cache_root() / "selfgen"
    path = folder / f"selfgen-{n_samples}x{seq_len}-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["windows"].long(), float(saved["seconds"])

    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    gen_model = copy.deepcopy(model).to(torch.bfloat16) if on_gpu else model
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start = time.time()
    out = []
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_samples, desc="selfgen", unit="sample")
    i = 0
    while sum(o.shape[0] for o in out) < n_samples:
        p_len = lengths[i % len(lengths)]
        temperature = knobs.temperatures[i % len(knobs.temperatures)]
        b = min(knobs.batch, n_samples - sum(o.shape[0] for o in out))
        rows = torch.randint(0, prompts_from.shape[0], (b,), generator=generator)
        offsets = torch.randint(0, prompts_from.shape[1] - p_len + 1, (b,), generator=generator)
        pairs = zip(rows.tolist(), offsets.tolist(), strict=True)
        prompts = torch.stack([prompts_from[r, o : o + p_len] for r, o in pairs])  # [b, P]
        prompts = prompts.to(device)
        with torch.no_grad():
            sequences = gen_model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - p_len,
                min_new_tokens=seq_len - p_len,
                pad_token_id=model.config.eos_token_id,
            )
        out.append(sequences[:, :seq_len].cpu().to(torch.int32))
        if bar is not None:
            bar.update(b)
        i += 1
    if bar is not None:
        bar.close()
    if on_gpu:
        torch.cuda.synchronize()
        del gen_model
    seconds = time.time() - start
    windows = torch.cat(out)[:n_samples]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"windows": windows, "seconds": seconds, "knobs": dataclasses.asdict(knobs)}, tmp)
    os.replace(tmp, path)
    return windows.long(), seconds


def mix_windows(real: torch.Tensor, generated: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Training windows ``[N, T]`` from ``real`` ``[R, T]`` and ``generated`` ``[G, T]`` in which ``fraction`` of the
    rows are generated, every window of both used at least once: ``R`` real and ``round(fraction / (1 - fraction)
    * R)`` generated rows, or, when that is fewer than ``G``, all ``G`` generated and ``round((1 - fraction) /
    fraction * G)`` real rows; a set that must give more rows than it has is repeated, each pass in a random order.
    ``fraction`` 0 returns ``real``; 1 returns ``generated``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"selfgen fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0 or generated.shape[0] == 0:
        return real
    if fraction == 1.0:
        return generated
    n_real, n_gen = real.shape[0], round(fraction / (1.0 - fraction) * real.shape[0])
    if n_gen < generated.shape[0]:
        n_gen, n_real = generated.shape[0], round((1.0 - fraction) / fraction * generated.shape[0])
    g = torch.Generator().manual_seed(seed)

    def take(windows: torch.Tensor, count: int) -> torch.Tensor:
        if count == windows.shape[0]:
            return windows
        passes = -(-count // windows.shape[0])
        order = torch.cat([torch.randperm(windows.shape[0], generator=g) for _ in range(passes)])[:count]
        return windows[order]

    return torch.cat([take(real, n_real), take(generated, n_gen)])


@dataclasses.dataclass
class TrainOutcome:
    """What :func:`uptrain_row` did: tokens of the full plan, the generation cost (recorded, and spent in this call),
    and whether training reached its last step (else a checkpoint was saved to resume from)."""

    tokens: int = 0
    gen_seconds: float = 0.0
    gen_wall: float = 0.0
    finished: bool = True
    step: int = 0
    max_steps: int = 0


def _stop_at(deadline: float) -> Any:
    """A ``TrainerCallback`` that saves a checkpoint and stops training at the first step end after ``deadline``."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            if time.time() > deadline and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopAt()


def _latest_checkpoint(folder: Path | None) -> str | None:
    if folder is None or not folder.is_dir():
        return None
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def uptrain_row(bench: Any, model: torch.nn.Module, recipe: Recipe, ckpt_dir: Path | None = None) -> TrainOutcome:
    """Train ``model`` by the recipe (the library's ``EliteKVTrainer``, as ``uptrain`` runs it) on
    ``bench.train_data(corpora)`` (a ``retention.Bench``), mixed with self-generated text if the recipe says so. With
    ``bench.deadline`` it stops at the first step after it and saves a checkpoint in ``ckpt_dir``; a later call
    resumes from the latest checkpoint there (the model converted again the same way)."""
    from elitekv_peft.training import EliteKVTrainer, lm_dataset, plan_steps, training_arguments, whole_steps

    job = recipe.job
    if job.loss == "none" or not job.train_tokens:
        return TrainOutcome()
    windows = bench.train_data(tuple(job.train_corpora))
    outcome = TrainOutcome()
    if recipe.selfgen.fraction > 0:
        start = time.time()
        generated, outcome.gen_seconds = generate_text(
            bench.base, windows, recipe.selfgen, job.seq_len, job.seed, bench.selfgen_dir, bench.progress
        )
        outcome.gen_wall = time.time() - start
        windows = mix_windows(windows, generated, recipe.selfgen.fraction, job.seed)
    grad_accum = getattr(job, "grad_accum", 1)
    plan = plan_steps(job.train_tokens, job.batch_size, job.seq_len, grad_accum)
    outcome.tokens, outcome.max_steps = plan.tokens, plan.max_steps
    args = training_arguments(
        str(ckpt_dir) if ckpt_dir is not None else bench.work_dir,
        max_steps=plan.max_steps,
        batch_size=job.batch_size,
        grad_accum=grad_accum,
        learning_rate=job.learning_rate,
        seed=job.seed,
        logging_steps=max(1, plan.max_steps // 10),
        disable_tqdm=not bench.progress,
        torch_compile=getattr(job, "torch_compile", False),
    )
    teacher = copy.deepcopy(bench.base).eval() if job.loss == "distill" else None
    from transformers import default_data_collator

    trainer = EliteKVTrainer(
        model=model,
        args=args,
        train_dataset=whole_steps(lm_dataset(windows), job.batch_size, grad_accum),  # no short step: tokens exact
        data_collator=default_data_collator,
        teacher=teacher,
        distill_weight=getattr(job, "distill_weight", 1.0),
        hidden_weight=getattr(job, "hidden_weight", 0.0) if teacher is not None else 0.0,
        latent_lr_ratio=getattr(job, "latent_lr_ratio", 1.0),
        progressive_stages=getattr(job, "progressive_stages", 1) if teacher is not None else 1,
    )
    if bench.deadline is not None:
        trainer.add_callback(_stop_at(bench.deadline))
    model.train()
    trainer.train(resume_from_checkpoint=_latest_checkpoint(ckpt_dir))
    model.eval()
    outcome.step = trainer.state.global_step
    outcome.finished = outcome.step >= plan.max_steps
    return outcome
