"""`loratune serve`: its options, and starting the engine and the HTTP server on one loaded base model.

This module imports nothing heavy at the top, so the command-line parser can use it cheaply.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from ..core.errors import ConfigError
from ..extras import require_extra


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _port(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535, got {value}")
    return value


def check_api_key(key: str | None, source: str = "--api-key") -> None:
    """HTTP headers carry Latin-1 at most, and clients send ASCII: a key no client can send is refused at start."""
    if key is None:
        return
    if not key.isascii() or not key.isprintable() or key != key.strip():
        raise ConfigError(f"{source}: the API key must be printable ASCII without surrounding spaces, "
                          "since clients send it in an HTTP header")


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def add_serve_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="serve a base model and many adapters over an OpenAI-compatible API")
    serve.add_argument("--model", required=True, help="base model: folder, .gguf file, built-in or hub name")
    serve.add_argument("--adapter", action="append", default=[], type=_adapter_pair, metavar="NAME=DIR",
                       help="load an adapter at start (repeatable)")
    serve.add_argument("--adapter-root", help="folder under which POST /v1/adapters may load adapters")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--api-key", help="require this Bearer token (default: $LORATUNE_API_KEY)")
    serve.add_argument("--quantize", choices=["none", "nf4", "int8"], default="none",
                       help="store the base model's linear layers quantized")
    serve.add_argument("--max-batch", type=_positive, default=32, help="requests decoded together")
    serve.add_argument("--max-queued", type=_positive, default=256, help="requests waiting before 429")
    serve.add_argument("--max-adapters", type=_positive, default=16)
    serve.add_argument("--max-prompt-tokens", type=_positive, default=2048)
    serve.add_argument("--max-tokens", type=_positive, default=512, help="largest max_tokens a request may ask")
    serve.add_argument("--max-body-bytes", type=_positive, default=1 << 20)
    serve.add_argument("--body-timeout", type=_seconds, default=30.0,
                       help="seconds a request body may take to arrive whole before 408 (default: 30)")
    serve.add_argument("--header-timeout", type=_seconds, default=10.0,
                       help="seconds a request's headers may take to arrive whole before 408 (default: 10)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=run)
    return serve


def base_name(model: str) -> str:
    """The `model` id of the base: a built-in or hub name as given, a folder or file by its own name."""
    path = Path(model)
    return path.stem if path.exists() else model


def build(model, tokenizer, name: str, adapters: list[tuple[str, str]], *, api_key: str | None = None,
          adapter_root: str | None = None, max_batch: int = 32, max_queued: int = 256, max_adapters: int = 16,
          max_prompt_tokens: int = 2048, max_tokens: int = 512, max_body_bytes: int = 1 << 20,
          body_timeout: float = 30.0):
    """Start the engine on a loaded model, load the start-up adapters, and return `(app, engine)`."""
    require_extra("serve", "loratune serve")
    from ..batching import max_positions
    from .app import Settings, create_app
    from .completions import Limits
    from .registry import AdapterRegistry, check_name, check_safetensors_folder
    from .scheduler import Engine

    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(f"--model {name}: serving supports decoder-only causal language models")
    check_api_key(api_key)
    root = Path(adapter_root) if adapter_root else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--adapter-root {adapter_root}: no such folder")
    registry = AdapterRegistry(name, max_adapters)
    for adapter, folder in adapters:
        check_name(adapter)
        check_safetensors_folder(folder)
        registry.reserve(adapter)
    limits = Limits(max_prompt_tokens, max_tokens, max_body_bytes, body_timeout, max_positions(model))
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queued=max_queued)
    engine.start()
    try:
        for adapter, folder in adapters:
            engine.load_adapter(adapter, folder).result()
            registry.settle(adapter, folder)
    except BaseException:
        engine.stop()
        raise
    settings = Settings(base_name=name, api_key=api_key, adapter_root=root, limits=limits)
    return create_app(engine, registry, settings), engine


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind before loading anything slow, so a taken port fails at once with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> None:
    require_extra("serve", "loratune serve")
    import uvicorn

    from ..precision import inference_dtype
    from ..pretrained import load_model
    from .http import uvicorn_config

    api_key = args.api_key or os.environ.get("LORATUNE_API_KEY") or None
    check_api_key(api_key, "--api-key" if args.api_key else "LORATUNE_API_KEY")
    sock = listening_socket(args.host, args.port)
    model, tokenizer = load_model(args.model, "causal-lm", quantize=args.quantize,
                                  dtype=inference_dtype(args.precision))
    app, engine = build(model, tokenizer, base_name(args.model), args.adapter, api_key=api_key,
                        adapter_root=args.adapter_root, max_batch=args.max_batch, max_queued=args.max_queued,
                        max_adapters=args.max_adapters, max_prompt_tokens=args.max_prompt_tokens,
                        max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
                        body_timeout=args.body_timeout)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {base_name(args.model)} with {len(args.adapter)} adapter(s) at http://{shown}:{port}/v1 "
          f"(playground: http://{shown}:{port}/)", file=sys.stderr, flush=True)
    if not _is_loopback(host) and api_key is None:
        print("loratune: warning: listening beyond loopback without an API key", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, args.header_timeout, args.log_level)).run(sockets=[sock])
    finally:
        engine.stop()
