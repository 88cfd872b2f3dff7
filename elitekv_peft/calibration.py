"""Calibration data and the activations the conversion needs.

`calibration_tokens` returns the token ids used for calibration: the user's (``config.calibration_data``), or text
sampled from the model itself when none is given (data-free; a warning recommends real text).
`collect_attention_inputs` runs the *original* model over them once and records, for every layer, the hidden
states entering attention, plus the rotary tables for positions ``0..T-1``.
`collect_attention_inputs_layerwise` records the same, one decoder layer at a time (as GPTQ's sequential
calibration): each layer is moved to the compute device in turn and only that layer's input hidden states are kept,
so a model that does not fit on the GPU (kept on the CPU) converts with one layer on the GPU at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .progress import progress_bar

MIN_SEQ_LEN = 8


@dataclass
class Calibration:
    """Recorded activations of one calibration pass.

    inputs: per layer, attention inputs ``[N, T, d]`` (float32, CPU).
    cos, sin: rotary tables ``[T, D]`` for positions ``0..T-1`` (float32, CPU), of the first layer.
    layer_tables: per layer ``(cos, sin)`` when the layers do not all rotate alike (Gemma 3's local and global layers:
    `rotary`), else None.
    """

    inputs: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    layer_tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def rotary(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables ``(cos, sin)`` ``[T, D]`` that layer ``layer_idx`` was given."""
        return self.layer_tables[layer_idx] if self.layer_tables else (self.cos, self.sin)

    @property
    def num_tokens(self) -> int:
        return self.inputs[0].shape[0] * self.inputs[0].shape[1]


def as_token_tensor(data: object) -> torch.Tensor:
    """User calibration data (tensor ``[N, T]`` or list of equal-length id lists) -> LongTensor ``[N, T]``."""
    if isinstance(data, torch.Tensor):
        tokens = data
    elif isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
        raise TypeError(
            "calibration_data holds strings; tokenize them first, e.g. "
            "`tokenizer(texts, return_tensors='pt', truncation=True, max_length=512, padding=False)['input_ids']`."
        )
    else:
        try:
            tokens = torch.as_tensor(data)
        except (TypeError, ValueError) as error:
            raise TypeError(
                "calibration_data must be token ids: a LongTensor [N, T] or a list of equal-length lists of ints."
            ) from error
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"calibration_data must have shape [N, T] with N, T >= 1; got {tuple(tokens.shape)}.")
    if tokens.dtype.is_floating_point:
        raise TypeError("calibration_data must hold integer token ids, not floats.")
    if tokens.shape[1] < MIN_SEQ_LEN:
        raise ValueError(
            f"calibration sequences have {tokens.shape[1]} tokens; at least {MIN_SEQ_LEN} are needed "
            "(the paper uses 2048): pass longer sequences."
        )
    return tokens.long()


def calibration_tokens(model: nn.Module, data: object, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Token ids ``[N, T]`` for calibration: ``data`` if given, else ``samples`` sequences sampled from ``model``."""
    if data is not None:
        tokens = as_token_tensor(data)
        vocab = model.get_input_embeddings().num_embeddings
        if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
            bad = int(tokens.max()) if int(tokens.max()) >= vocab else int(tokens.min())
            raise ValueError(
                f"calibration_data holds token id {bad} outside the model's vocabulary ({vocab}); "
                "was it made with another tokenizer?"
            )
        return tokens
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"calibration_seq_len={seq_len} is too short; use at least {MIN_SEQ_LEN}.")
    warnings.warn(
        "No calibration_data given: sampling calibration text from the model itself. Pass real text of your "
        "domain (EliteKVConfig(calibration_data=token_ids)) for a better conversion.",
        stacklevel=3,
    )
    return sample_from_model(model, samples, seq_len, seed)


@torch.no_grad()
def sample_from_model(model: nn.Module, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample ``samples`` sequences of ``seq_len`` tokens from the model, starting at BOS: ``[N, T]``."""
    device = next(model.parameters()).device
    bos = model.config.bos_token_id
    bos = bos[0] if isinstance(bos, list) else bos
    start = torch.full((samples, 1), 0 if bos is None else int(bos), dtype=torch.long, device=device)
    # sample under a forked RNG: the user's random streams (CPU, and this GPU) are left as they were
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        tokens = model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=0,
        )
    return tokens[:, :seq_len].cpu()


@torch.no_grad()
def collect_attention_inputs(
    model: nn.Module, decoder_layers: nn.ModuleList, tokens: torch.Tensor, batch_size: int, progress: bool = True
) -> Calibration:
    """Run ``model`` over ``tokens [N, T]`` and record each layer's attention input and the rotary tables."""
    device = next(model.parameters()).device
    recorder = _Recorder(decoder_layers)
    was_training = model.training
    model.eval()
    try:
        for start in progress_bar(range(0, tokens.shape[0], batch_size), desc="EliteKV calibration", enabled=progress):
            batch = tokens[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
    finally:
        recorder.remove()
        model.train(was_training)
    return recorder.result()


class _Recorder:
    """Forward pre-hooks on every layer's ``self_attn`` that keep its input (float32, CPU) and the rotary tables."""

    def __init__(self, decoder_layers: nn.ModuleList) -> None:
        self.recorded: list[list[torch.Tensor]] = [[] for _ in decoder_layers]
        self.tables: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(decoder_layers)
        self.handles = [
            layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(decoder_layers)
        ]

    def _hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.recorded[layer_idx].append(hidden.detach().float().cpu())
            if self.tables[layer_idx] is None and kwargs.get("position_embeddings") is not None:
                cos, sin = kwargs["position_embeddings"]
                cos, sin = cos[0].float().cpu(), sin[0].float().cpu()
                # layers given equal tables share one copy (Gemma 3: one per layer type)
                same = [t for t in self.tables if t is not None and torch.equal(t[0], cos) and torch.equal(t[1], sin)]
                self.tables[layer_idx] = same[0] if same else (cos, sin)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def result(self) -> Calibration:
        if any(tables is None for tables in self.tables):
            raise ValueError(
                "The model passed no rotary position embeddings to its attention layers: is it a RoPE model?"
            )
        first = self.tables[0]
        per_layer = None if all(tables is first for tables in self.tables) else list(self.tables)
        return Calibration([torch.cat(chunks) for chunks in self.recorded], *first, layer_tables=per_layer)


def check_weights(model: nn.Module, decoder_layers: nn.ModuleList) -> None:
    """Raise unless every attention weight can be read: materialized (not meta) and of one floating dtype."""
    if any(param.device.type == "meta" for param in model.parameters()):
        raise ValueError(
            "Some weights of this model are on the meta device (offloaded by `device_map`?); the conversion reads "
            "every attention weight. Load the model on the CPU (no `device_map`) and convert it layer by layer on "
            "the GPU: EliteKVConfig(calibration_device='cuda')."
        )
    from .quantization import dense_dtype, is_quantized

    linears = [getattr(layer.self_attn, name) for layer in decoder_layers for name in ("q_proj", "k_proj", "v_proj")]
    linears += [layer.self_attn.o_proj for layer in decoder_layers]
    # bitsandbytes 4/8-bit layers are read dequantized (`elitekv_peft.quantization.dense_weight`)
    dtypes = {dense_dtype(linear, model) if is_quantized(linear) else linear.weight.dtype for linear in linears}
    if any(not dtype.is_floating_point for dtype in dtypes):
        raise TypeError(
            f"The attention weights are stored as {sorted(map(str, dtypes))} (a quantized model?); EliteKV converts "
            "floating-point or bitsandbytes 4/8-bit weights. Convert the unquantized model, then quantize the "
            "frozen parts with `elitekv_peft.quantization.quantize_frozen`."
        )
    if len(dtypes) > 1:
        raise TypeError(
            f"The attention weights mix dtypes {sorted(map(str, dtypes))}; cast the model to one dtype first, e.g. "
            "`model.to(torch.bfloat16)`."
        )


@torch.no_grad()
def collect_attention_inputs_layerwise(
    decoder: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device | str, progress: bool = True
) -> Calibration:
    """Record each layer's attention input like `collect_attention_inputs`, running one decoder layer at a time.

    ``decoder`` is the ``*Model`` (``embed_tokens``, ``rotary_emb``, ``layers``). Each module is moved to ``device``
    for its turn and back afterwards; between layers only the hidden states ``[N, T, d]`` (model dtype, CPU) are
    kept. On the same device this gives the same activations as the whole-model pass, bit for bit.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from .modeling.variants import layer_rope_type, layer_window

    device = torch.device(device)
    T = tokens.shape[1]
    batches = [tokens[start : start + batch_size] for start in range(0, tokens.shape[0], batch_size)]
    was_training = decoder.training
    decoder.eval()
    recorder = _Recorder(decoder.layers)
    try:
        with _on(decoder.embed_tokens, device):
            hidden = [decoder.embed_tokens(batch.to(device)).cpu() for batch in batches]
        config, position_ids = decoder.config, torch.arange(T, device=device).unsqueeze(0)
        rotary = {}  # per layer type where the rotary module takes one (Gemma 3), else one entry
        with _on(decoder.rotary_emb, device):
            for kind in {layer_rope_type(config, idx) for idx in range(len(decoder.layers))}:
                extra = () if kind is None else (kind,)
                rotary[kind] = decoder.rotary_emb(hidden[0][:1].to(device), position_ids, *extra)
        layers = progress_bar(decoder.layers, desc="EliteKV calibration (layer by layer)", enabled=progress)
        for idx, layer in enumerate(layers):
            windowed = layer_window(config, idx) is not None  # sliding-window layers get the model's sliding mask
            make_mask = create_sliding_window_causal_mask if windowed else create_causal_mask
            with _on(layer, device):
                for b, states in enumerate(hidden):
                    states = states.to(device)
                    # positional: the cache argument's name differs between transformers versions
                    mask = make_mask(config, states, None, None, position_ids=position_ids)
                    out = layer(
                        states,
                        attention_mask=mask,
                        position_embeddings=rotary[layer_rope_type(config, idx)],
                        position_ids=position_ids,
                        use_cache=False,
                    )
                    hidden[b] = (out[0] if isinstance(out, tuple) else out).cpu()
    finally:
        recorder.remove()
        decoder.train(was_training)
    return recorder.result()


class _on:
    """Context manager: ``module`` on ``device`` inside, back on its own device after."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device
        first = next(iter(module.parameters()), None)
        if first is None:
            first = next(iter(module.buffers()), None)
        self.home = first.device if first is not None else device

    def __enter__(self) -> nn.Module:
        return self.module.to(self.device)

    def __exit__(self, *exc: object) -> None:
        self.module.to(self.home)
