"""`loratune serve --quantize` answers as `loratune generate --quantize` does, and a client that stalls in its
headers is answered 408 and dropped (uvicorn alone would hold the connection forever)."""

import json
import socket

import httpx
import pytest
from serve_tools import thread_server

from loratune.cli import main
from loratune.quant.linear import QuantLinear

PROMPTS = ["the cat sat on a mat", "hello world", "the good movie was great and the plot"]


def cli_generate(capsys, model_dir, prompt, quantize, adapter=None) -> str:
    argv = ["generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "12", "--quantize", quantize]
    argv += ["--adapter", str(adapter)] if adapter else []
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_server_answers_like_quantized_generate(capsys, tiny_llama, adapter_root, quantize):
    expected = {(model, prompt): cli_generate(capsys, tiny_llama, prompt, quantize,
                                              adapter_root / model if model != "tiny" else None)
                for model in ("tiny", "alpha") for prompt in PROMPTS}
    plain = {(model, prompt): cli_generate(capsys, tiny_llama, prompt, "none",
                                           adapter_root / model if model != "tiny" else None)
             for model in ("tiny", "alpha") for prompt in PROMPTS}
    assert expected != plain  # the quantization changes answers, so equality below is not the unquantized path
    with thread_server(tiny_llama, [("alpha", str(adapter_root / "alpha"))], quantize=quantize) as (url, engine):
        formats = {m.format for m in engine.model.modules() if isinstance(m, QuantLinear)}
        assert formats == {quantize}
        for (model, prompt), text in expected.items():
            answer = httpx.post(url + "/v1/completions", timeout=60,
                                json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == text, (model, prompt)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response (head, body) read to its content-length, or to the connection's close."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return head, body


def assert_408_then_closed(sock: socket.socket) -> None:
    head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert sock.recv(65536) == b""  # dropped


def test_stalled_headers_get_408_and_the_connection_is_dropped(tiny_llama):
    with thread_server(tiny_llama, header_timeout=1.0) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as fresh:
            fresh.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            answer = httpx.post(url + "/v1/completions", timeout=30,
                                json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
            assert answer.status_code == 200  # others are served while it stalls
            assert_408_then_closed(fresh)
        with socket.create_connection((host, int(port)), timeout=30) as kept_alive:
            kept_alive.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = read_response(kept_alive)
            assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["data"][0]["id"] == "tiny"
            kept_alive.sendall(b"GET /v1/models HTTP/1.1\r\nHo")  # the next request stalls mid-headers
            assert_408_then_closed(kept_alive)


def test_a_slow_but_complete_request_is_served(tiny_llama):
    """Headers sent in pieces within the deadline are answered normally."""
    with thread_server(tiny_llama, header_timeout=5.0) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as client:
            for piece in (b"GET /v1/mod", b"els HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                client.sendall(piece)
            head, body = read_response(client)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["data"][0]["id"] == "tiny"
