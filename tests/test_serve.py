"""Issue 19: a saved EliteKV model served by transformers' OpenAI-compatible server (`elitekv_peft.serving.serve`).

A tiny random Llama converted at kv_ratio 0.25 is saved to a folder; a server process started on 127.0.0.1 (a free
port) serves it; the `openai` client sends a chat completion, a streamed one and two concurrent ones, whose texts must
equal greedy ``generate()`` of the same folder in this process. The server process records, after every forward of
the served model, the cache that forward returned (a wrapper around the model class's ``forward``, installed by the
driver script below before the model is loaded): the test checks that every layer of it is an `EliteKVCacheLayer`
holding the latent bytes per token, not full keys and values. Last, SIGTERM must stop the server within a bound.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elitekv_peft import EliteKVCacheLayer, cache_nbytes
from tests.tiny import convert, tiny_model, tiny_tokenizer

try:
    import openai
except ImportError as error:  # a missing dev dependency must fail, not skip
    raise ImportError(
        "tests/test_serve.py needs the `openai` client and transformers' serving dependencies: "
        "pip install -e '.[dev]' (or pip install 'transformers[serving]')"
    ) from error

# role markers of the tiny word-level vocabulary t0..t127: t4 user, t5 assistant
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 't4' if m['role'] == 'user' else 't5' }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}t5 {% endif %}"
)
MAX_TOKENS = 10
START_TIMEOUT_S = 90.0  # the server process imports torch/transformers/FastAPI and loads the model first
STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 60.0

DRIVER = '''
"""Server process of tests/test_serve.py: serve(FOLDER, 127.0.0.1, PORT), recording each forward's cache."""
import functools
import json
import os
import sys

import elitekv_peft
from elitekv_peft.serving import serve

RECORD = os.environ["ELITEKV_TEST_SERVE_RECORD"]
served_class = elitekv_peft.EliteKVLlamaForCausalLM
original_forward = served_class.forward


@functools.wraps(original_forward)
def recording_forward(self, *args, **kwargs):
    output = original_forward(self, *args, **kwargs)
    cache = getattr(output, "cache", None)  # transformers >= 5.24
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    layers = [] if cache is None else list(cache.layers)
    entry = {
        "model_class": type(self).__name__,
        "cache_class": None if cache is None else type(cache).__name__,
        "layer_classes": [type(layer).__name__ for layer in layers],
        "bytes": 0 if cache is None else elitekv_peft.cache_nbytes(cache),
        "tokens": 0 if cache is None else int(cache.get_seq_length()),
        "batch": layers[0].keys.shape[0] if layers and getattr(layers[0], "keys", None) is not None else 0,
    }
    with open(RECORD, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\\n")
    return output


served_class.forward = recording_forward  # also in the model's own process (transformers >= 5.25 spawns it)
if __name__ == "__main__":
    serve(sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]), device="cpu")
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny random Llama converted with EliteKV at kv_ratio 0.25, saved with a word-level chat tokenizer."""
    folder = tmp_path_factory.mktemp("serve") / "tiny-elitekv"
    convert(tiny_model("llama_gqa"), kv_ratio=0.25).save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


class Server:
    """The server subprocess, its log, its cache record and an `openai` client for it."""

    def __init__(self, artifact: Path, workdir: Path, command: list[str] | None = None) -> None:
        """``command``: the server's argv (default: the recording driver); ``{artifact}``/``{port}`` filled in."""
        self.artifact = str(artifact)
        self.port = free_port()
        self.log = workdir / "server.log"
        self.record = workdir / "cache_record.jsonl"
        driver = workdir / "serve_driver.py"
        driver.write_text(DRIVER)
        command = command or [sys.executable, str(driver), "{artifact}", "{port}"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", ELITEKV_TEST_SERVE_RECORD=str(self.record))
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [part.format(artifact=self.artifact, port=self.port) for part in command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        """Poll ``GET /health`` until it answers (the model is loaded before the server listens)."""
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode} before it was ready:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
            except OSError:  # refused, reset or timed out while the server starts
                pass
            time.sleep(0.25)
        pytest.fail(f"server not ready within {START_TIMEOUT_S} s:\n{self.log_text()}")

    def records(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def stop(self) -> float:
        """SIGTERM, then wait; returns the seconds it took (kills it and fails past `STOP_TIMEOUT_S`)."""
        start = time.monotonic()
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            pytest.fail(f"server still running {STOP_TIMEOUT_S} s after SIGTERM:\n{self.log_text()}")
        return time.monotonic() - start


@pytest.fixture(scope="module")
def started(artifact, tmp_path_factory):
    """The server process, started (not yet ready); killed at the end of the module if still running."""
    server = Server(artifact, tmp_path_factory.mktemp("server"))
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


@pytest.fixture(scope="module")
def reference(artifact, started):
    """Greedy ``generate()`` of the saved folder, loaded as a user would, in this process (while the server boots)."""
    model = AutoModelForCausalLM.from_pretrained(artifact).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifact)

    def generate(prompt: str, max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        new_ids = out[0, inputs["input_ids"].shape[1] :]
        return tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids)

    generate.model = model
    return generate


@pytest.fixture(scope="module")
def server(started, reference) -> Server:
    """The server, ready to answer."""
    started.wait_ready()
    return started


def chat(server: Server, prompt: str, max_tokens: int = MAX_TOKENS):
    return server.client.chat.completions.create(
        model=server.artifact,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )


def test_chat_completion_equals_greedy_generate(server, reference):
    expected, n_tokens = reference("t7 t8 t9")
    assert n_tokens >= 4 and expected.strip()  # a real continuation, not an immediate end of sequence
    response = chat(server, "t7 t8 t9")
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens == n_tokens


def test_streamed_chat_completion_equals_greedy_generate(server, reference):
    expected, _ = reference("t20 t21 t22 t23")
    stream = server.client.chat.completions.create(
        model=server.artifact,
        messages=[{"role": "user", "content": "t20 t21 t22 t23"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert sum(1 for piece in pieces if piece) > 1  # streamed in pieces, not one block
    assert "".join(pieces) == expected


def test_two_concurrent_requests(server, reference):
    prompts = {"t40 t41": 8, "t90 t91 t92 t93 t94": MAX_TOKENS}
    expected = {prompt: reference(prompt, n)[0] for prompt, n in prompts.items()}
    barrier = threading.Barrier(len(prompts))

    def ask(prompt: str) -> str:
        barrier.wait(timeout=REQUEST_TIMEOUT_S)
        return chat(server, prompt, prompts[prompt]).choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = dict(zip(prompts, pool.map(ask, prompts), strict=True))
    assert answers == expected
    assert len(set(answers.values())) == 2


def test_served_model_uses_the_latent_cache(server, reference):
    """Every forward of the served model returned a cache of `EliteKVCacheLayer`s holding latent bytes per token."""
    model = reference.model
    ids = torch.tensor([[4, 30, 31, 32, 5]])
    with torch.no_grad():
        output = model(ids, use_cache=True)
    cache = output.cache if hasattr(output, "cache") else output.past_key_values  # renamed in transformers 5.24
    assert all(isinstance(layer, EliteKVCacheLayer) for layer in cache.layers)
    latent_per_token = cache_nbytes(cache) // ids.shape[1]
    config = model.config
    full_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # float32
    assert 0 < latent_per_token <= 0.25 * full_per_token

    before = len(server.records())
    chat(server, "t30 t31 t32", MAX_TOKENS)
    records = server.records()
    assert len(records) - before >= MAX_TOKENS  # one prefill and a decode step per further token, at least
    for entry in records:
        assert entry["model_class"] == "EliteKVLlamaForCausalLM"
        assert entry["layer_classes"] == [EliteKVCacheLayer.__name__] * config.num_hidden_layers, entry
        assert entry["tokens"] > 0 and entry["batch"] == 1
        assert entry["bytes"] == entry["tokens"] * latent_per_token, entry


def test_server_stops_cleanly(server):
    """Runs last (it ends the module's server): SIGTERM gives uvicorn's graceful shutdown, then the process exits.

    After shutting down, uvicorn re-raises the signal it caught, so the status is that of SIGTERM (or 0).
    """
    elapsed = server.stop()
    log = server.log_text()
    assert server.process.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Finished server process" in log, log
    assert elapsed < STOP_TIMEOUT_S
    with pytest.raises(openai.APIConnectionError):
        chat(server, "t7 t8 t9", 1)


def test_serve_refuses_bad_input_before_loading_anything(tmp_path):
    """Errors name the fix, and come before any model is loaded or any port is opened."""
    from elitekv_peft.serving import serve

    plain = tmp_path / "plain-llama"
    tiny_model("llama_gqa").config.save_pretrained(plain)
    with pytest.raises(ValueError, match="transformers serve"):
        serve(str(plain))
    with pytest.raises(ValueError, match="no config.json"):
        serve(str(tmp_path))
    with pytest.raises(ValueError, match="not a folder"):
        serve(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="port"):
        serve(str(plain), port=70000)


def test_every_supported_family_is_servable_by_name(tmp_path):
    """Every family that converts is served: a folder whose config.json names its EliteKV model type passes the
    server's check, and that type is registered with AutoConfig (what the server's loader calls)."""
    from transformers import AutoConfig

    from elitekv_peft.conversion import SUPPORTED_MODEL_TYPES
    from elitekv_peft.serving import ELITEKV_MODEL_TYPES, check_artifact

    assert ELITEKV_MODEL_TYPES == {f"elitekv_{model_type}" for model_type in SUPPORTED_MODEL_TYPES}
    for model_type in SUPPORTED_MODEL_TYPES:
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": f"elitekv_{model_type}"}))
        check_artifact(str(folder))  # raises for a model type the server would not load
        assert AutoConfig.for_model(f"elitekv_{model_type}").model_type == f"elitekv_{model_type}"


def test_elitekv_serve_command_serves_the_folder(artifact, reference, tmp_path):
    """``elitekv serve ARTIFACT --port P`` (the CLI) answers as greedy ``generate()`` does, and stops on SIGTERM."""
    call = "import sys, elitekv_cli; sys.exit(elitekv_cli.main(sys.argv[1:]))"
    command = [sys.executable, "-c", call, "serve", "{artifact}", "--port", "{port}", "--device", "cpu"]
    server = Server(artifact, tmp_path, command=command)
    try:
        server.wait_ready()
        expected, _ = reference("t3 t4")
        assert chat(server, "t3 t4").choices[0].message.content == expected
        assert server.stop() < STOP_TIMEOUT_S
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)
