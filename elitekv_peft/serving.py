"""Serve a saved EliteKV model with transformers' OpenAI-compatible server (``transformers serve``).

``transformers serve FOLDER`` cannot load an EliteKV folder as it is: its model manager looks the architecture of
``config.json`` up as an attribute of the ``transformers`` module (``transformers.EliteKVLlamaForCausalLM`` does not
exist). `serve` is that same server, with one change: a model manager whose loader loads EliteKV folders through
``AutoModelForCausalLM`` (where importing `elitekv_peft` registered the EliteKV classes) and leaves every other
model to transformers. Endpoints, request handling, streaming and the generation loop are transformers' own:
``POST /v1/chat/completions`` (streamed or not), ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.

Each request runs ``model.generate()`` with its default cache, in which every EliteKV attention layer keeps its
latent cache (`EliteKVCacheLayer`: rotated RoPE chunks ``[batch, G, seq, 2r]`` and latents ``[batch, 1, seq, d_c]``).
For that reason the server's continuous batching (a paged cache of full keys and values) and ``--compile`` (a static
cache) are not offered here; requests are answered one after another, as transformers serves without them.

Example::

    from elitekv_peft.serving import serve

    if __name__ == "__main__":  # transformers >= 5.25 starts the model's process with spawn, which re-imports this
        serve("out/smollm2-elitekv", host="127.0.0.1", port=8000)   # blocks; Ctrl-C or SIGTERM stops it

then any OpenAI client: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``, with
``model="out/smollm2-elitekv"`` (the name the server was started with).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

from elitekv_peft.serving_models import ELITEKV_MODEL_TYPES, load_elitekv_model

__all__ = ["ELITEKV_MODEL_TYPES", "serve"]

MODEL_MANAGER_MODULE = "transformers.cli.serving.model_manager"
INSTALL_SERVING = "pip install 'transformers[serving]' (FastAPI, uvicorn, openai)"


def split_model_key(key: str) -> tuple[str, str | None]:
    """``'folder'`` / ``'org/name@revision'`` (how the model manager names a model) -> (path or repo, revision)."""
    if os.path.isdir(key) or "@" not in key:
        return key, None
    name, _, revision = key.rpartition("@")
    return name, revision or None


def elitekv_model_manager(base: type) -> type:
    """A subclass of transformers' serving ``ModelManager`` (``base``) that loads EliteKV folders.

    Only ``_load_model`` changes, and only for configs whose ``model_type`` is an EliteKV one: those load with
    ``AutoModelForCausalLM.from_pretrained`` and the manager's own options (dtype, device, attention, quantization).
    """

    class EliteKVModelManager(base):
        def _load_model(self, model_id_and_revision: str, *args: Any, **kwargs: Any) -> Any:
            from transformers import AutoConfig

            if kwargs.get("gguf_file") is not None:
                return super()._load_model(model_id_and_revision, *args, **kwargs)
            name, revision = split_model_key(model_id_and_revision)
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=self.trust_remote_code)
            if config.model_type not in ELITEKV_MODEL_TYPES:
                return super()._load_model(model_id_and_revision, *args, **kwargs)
            progress_callback = kwargs.get("progress_callback")
            return load_elitekv_model(self, model_id_and_revision, name, revision, config, progress_callback)

    return EliteKVModelManager


@contextlib.contextmanager
def elitekv_loading() -> Iterator[None]:
    """While open, transformers' server loads EliteKV folders: through `serving_loader.EliteKVModelLoader` from
    transformers 5.25 on (a loader that loads in the model's own process), through `elitekv_model_manager` before."""
    module = importlib.import_module(MODEL_MANAGER_MODULE)
    name = "ModelLoader" if hasattr(module, "ModelLoader") else "ModelManager"
    original = getattr(module, name)
    if name == "ModelLoader":
        from elitekv_peft.serving_loader import EliteKVModelLoader

        replacement = EliteKVModelLoader
    else:
        replacement = elitekv_model_manager(original)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def check_artifact(artifact: str) -> None:
    """Raise a `ValueError` naming the fix unless ``artifact`` is a Hub id or a folder holding an EliteKV model."""
    if not os.path.isdir(artifact):
        if os.path.exists(artifact) or artifact.startswith((".", "/", "~")) or artifact.count("/") > 1:
            raise ValueError(
                f"{artifact!r} is not a folder: pass the folder that `save_pretrained` (or `elitekv convert`) wrote."
            )
        return  # a Hub id: the server loads it (where the Hub is reachable) and says so if it cannot
    config_file = os.path.join(artifact, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(
            f"{artifact!r} has no config.json: pass the folder that `save_pretrained` (or `elitekv convert`) wrote."
        )
    with open(config_file, encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    if model_type not in ELITEKV_MODEL_TYPES:
        raise ValueError(
            f"{artifact!r} holds a {model_type!r} model, not an EliteKV one ({sorted(ELITEKV_MODEL_TYPES)}): convert "
            f"it first (`elitekv convert`), or serve it unchanged with `transformers serve {artifact}`."
        )


def serve(
    artifact: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str = "auto",
    dtype: str = "auto",
    log_level: str = "warning",
    enable_cors: bool = False,
    default_seed: int | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Serve the EliteKV model saved in ``artifact`` on ``http://host:port/v1`` until SIGINT/SIGTERM.

    From transformers 5.25 the model runs in a process of its own started with ``spawn``, which imports the calling
    script again: call `serve` from a script under ``if __name__ == "__main__":`` (``elitekv serve`` does).

    Args:
        artifact: folder written by ``save_pretrained`` / ``elitekv convert`` (or a Hub id of one); it is loaded
            once, before the server listens, and requests name it as their ``model`` (or leave it out).
        host: address to listen on; the default listens on loopback only.
        port: TCP port.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``, ... (transformers' ``--device``).
        dtype: ``"auto"`` (the saved dtype) or a torch dtype name such as ``"bfloat16"``.
        log_level: transformers' log level while serving.
        enable_cors: permissive CORS headers (for browser clients).
        default_seed: torch seed set once at start.
        trust_remote_code: transformers' option, passed on. Not needed for EliteKV folders: importing elitekv_peft
            registers their classes, and the installed ones are used.
    """
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
    check_artifact(artifact)
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError(f"Serving needs transformers' serving dependencies: {INSTALL_SERVING}")
    from transformers.cli.serve import Serve

    with elitekv_loading():
        Serve(
            force_model=artifact,
            continuous_batching=False,  # a paged cache of full keys/values: it cannot hold the latent cache
            compile=False,  # a static cache of full keys/values, for the same reason
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            host=host,
            port=port,
            enable_cors=enable_cors,
            log_level=log_level,
            default_seed=default_seed,
        )
