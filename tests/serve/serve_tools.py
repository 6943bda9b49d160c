"""Helpers for the server tests: random adapters, a server in a thread, bounded polling."""

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn
from transformers import AutoModelForCausalLM

import loratune as lt
from loratune.serve.command import build, listening_socket
from loratune.serve.http import uvicorn_config

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"alpha": (1, 4, ALL_LINEAR), "beta": (2, 2, ["q_proj", "v_proj", "down_proj"])}


def make_adapters(model_dir: str, root: Path) -> Path:
    """`alpha` (r=4, every linear layer) and `beta` (r=2, three layers): random A and B, so each changes outputs."""
    for name, (seed, rank, targets) in ADAPTERS.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(seed)
        config = lt.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                               task_type="CAUSAL_LM")
        lt.add_adapter(model, config)
        lt.save_adapter(model, root / name)
    return root


@contextmanager
def thread_server(model_dir: str, adapters=(), quantize: str = "none", header_timeout: float = 10.0, **options):
    """The real uvicorn server (as `loratune serve` configures it) on a free loopback port, in a thread;
    yields (base URL, engine)."""
    from loratune.pretrained import load_model

    model, tokenizer = load_model(model_dir, "causal-lm", quantize=quantize)
    app, engine = build(model, tokenizer, "tiny", list(adapters), **options)
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, header_timeout))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    assert server.started, "the server did not start within 30 s"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()
        sock.close()


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (bounded), and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
