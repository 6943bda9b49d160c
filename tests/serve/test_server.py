"""The real server (`loratune serve` in a subprocess, or uvicorn in a thread) spoken to with the official `openai`
client and plain HTTP: answers equal to `loratune generate`, streaming, mixed batches, management and refusals."""

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serve_tools import thread_server, wait_for
from transformers import LlamaConfig, LlamaForCausalLM

from loratune.cli import main

KEY = "test-key-123"
PROMPTS = ["the cat sat on a mat", "hello world", "the good movie was great and the plot"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama, adapter_root):
    """`loratune serve` with alpha and beta, the key from LORATUNE_API_KEY, a 64 KiB body limit."""
    port = free_port()
    env = {**os.environ, "LORATUNE_API_KEY": KEY, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "loratune.cli", "serve", "--model", tiny_llama, "--port", str(port),
            "--adapter", f"alpha={adapter_root / 'alpha'}", "--adapter", f"beta={adapter_root / 'beta'}",
            "--adapter-root", str(adapter_root), "--max-body-bytes", "65536", "--max-prompt-tokens", "40",
            "--max-tokens", "64", "--max-adapters", "3"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert process.poll() is None, process.stdout.read()
        try:
            return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=120, what="`loratune serve` to answer /health")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def cli_generate(capsys, model_dir, prompt, adapter=None, chat=False, tokens=20) -> str:
    argv = ["generate", "--model", model_dir, "--prompt", prompt, "--max-new-tokens", str(tokens)]
    argv += ["--adapter", str(adapter)] if adapter else []
    argv += ["--chat"] if chat else []
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.removesuffix("\n")


def complete(client, model, prompt, stream=False, **options):
    options = {"max_tokens": 20, "temperature": 0, **options}
    if not stream:
        response = client.completions.create(model=model, prompt=prompt, **options)
        return response.choices[0].text, response.choices[0].finish_reason, response.usage
    chunks = list(client.completions.create(model=model, prompt=prompt, stream=True, **options))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason, chunks[-1].usage


def test_models_lists_the_base_and_every_adapter(client, tiny_llama):
    models = client.models.list().data
    assert [m.id for m in models] == [Path(tiny_llama).name, "alpha", "beta"]  # a folder is named by its name
    assert [getattr(m, "parent", None) for m in models] == [None, models[0].id, models[0].id]


def test_completions_equal_loratune_generate_streamed_or_not(client, capsys, tiny_llama, adapter_root):
    base = client.models.list().data[0].id
    texts = set()
    for model, adapter in ((base, None), ("alpha", adapter_root / "alpha"), ("beta", adapter_root / "beta")):
        expected = cli_generate(capsys, tiny_llama, PROMPTS[0], adapter)
        text, reason, usage = complete(client, model, PROMPTS[0])
        assert text == expected
        assert complete(client, model, PROMPTS[0], stream=True) == (text, reason, usage)
        assert usage.prompt_tokens == len(PROMPTS[0].split()) and 1 <= usage.completion_tokens <= 20
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        texts.add(text)
    assert len(texts) == 3  # each adapter changes the answer


def test_chat_uses_the_template_and_equals_loratune_generate_chat(client, capsys, tiny_llama, adapter_root):
    expected = cli_generate(capsys, tiny_llama, "hello world", adapter_root / "beta", chat=True)
    messages = [{"role": "user", "content": "hello world"}]
    response = client.chat.completions.create(model="beta", messages=messages, max_tokens=20, temperature=0)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant" and response.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="beta", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason


def test_concurrent_mixed_requests_equal_requests_alone(client):
    base = client.models.list().data[0].id
    cases = [(m, p, s) for m in (base, "alpha", "beta") for p in PROMPTS for s in (False, True)]
    alone = {case: complete(client, case[0], case[1], stream=case[2], max_tokens=32) for case in cases}
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda case: complete(client, case[0], case[1], stream=case[2], max_tokens=32),
                                 cases))
    assert together == [alone[case] for case in cases]


def test_sampling_seed_stop_and_limits(client):
    first = complete(client, "alpha", "hello world", temperature=1.2, seed=5)
    assert complete(client, "alpha", "hello world", temperature=1.2, seed=5) == first
    text, _, _ = complete(client, client.models.list().data[0].id, "hello world")
    stop = text.split()[2]
    cut, reason, _ = complete(client, client.models.list().data[0].id, "hello world", stop=[stop])
    assert reason == "stop" and cut == text[:text.index(stop)]
    _, reason, usage = complete(client, "beta", "hello world", max_tokens=50, extra_body={"ignore_eos": True})
    assert reason == "length" and usage.completion_tokens == 50
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(client, "nope", "hello")
    with pytest.raises(openai.BadRequestError, match="n: from 1 to the server's --max-batch of 32"):
        complete(client, "alpha", "hello", n=33)
    with pytest.raises(openai.BadRequestError, match="max_tokens: 65 is more than the server's limit of 64"):
        complete(client, "alpha", "hello", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="more than the server's limit of 40"):
        complete(client, "alpha", "the cat " * 30)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        complete(client, "alpha", "hello", temperature=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_key_is_required_everywhere_but_the_page(server):
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/alpha")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            error = error_of(httpx.request(method, server + path, headers=headers, json={}), 401)
            assert error["type"] == "authentication_error"
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "side by side" in page.text.lower()
    assert error_of(httpx.get(server + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)


def test_adapters_load_and_delete_at_run_time(server, client, tmp_path_factory, adapter_root):
    auth = {"Authorization": f"Bearer {KEY}"}
    added = httpx.post(server + "/v1/adapters", headers=auth, json={"name": "gamma", "path": "alpha"}, timeout=60)
    assert added.status_code == 200, added.text
    assert [m.id for m in client.models.list().data][1:] == ["alpha", "beta", "gamma"]
    assert complete(client, "gamma", PROMPTS[1]) == complete(client, "alpha", PROMPTS[1])  # same weights
    full = httpx.post(server + "/v1/adapters", headers=auth, json={"name": "delta", "path": "beta"})
    assert error_of(full, 409)["code"] == "adapter_limit"
    assert httpx.delete(server + "/v1/adapters/gamma", headers=auth, timeout=60).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        complete(client, "gamma", PROMPTS[1])
    assert error_of(httpx.delete(server + "/v1/adapters/gamma", headers=auth), 404)["param"] == "name"


def test_adapter_paths_stay_under_the_root_and_names_stay_safe(server, adapter_root, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "alpha", outside)
    (adapter_root / "escape").symlink_to(outside, target_is_directory=True)
    (adapter_root / "links").mkdir()
    (adapter_root / "links" / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (adapter_root / "links" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (adapter_root / "pickled").mkdir()
    shutil.copy(adapter_root / "alpha" / "adapter_config.json", adapter_root / "pickled")
    torch.save({}, adapter_root / "pickled" / "adapter_model.bin")
    refused_paths = {"../alpha": "'..'", "alpha/../beta": "'..'", str(outside): "outside the adapter root",
                     "/etc": "outside the adapter root", "escape": "outside the adapter root",
                     "links": "links outside", "pickled": "only safetensors", "missing": "no such folder", "": "give"}
    for path, message in refused_paths.items():
        error = error_of(httpx.post(server + "/v1/adapters", headers=auth, json={"name": "x1", "path": path}), 400)
        assert error["param"] == "path" and message in error["message"], (path, error)
    for name in ("../a", "a.b", "", "a" * 65, "-a", "a b", "naïve", "alpha"):
        error = error_of(httpx.post(server + "/v1/adapters", headers=auth, json={"name": name, "path": "alpha"}), 400)
        assert error["param"] == "name", (name, error)
    assert error_of(httpx.post(server + "/v1/adapters", headers=auth, json={"name": "x"}), 400)["param"] == "path"


def test_oversized_bodies_are_refused(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = json.dumps({"model": "alpha", "prompt": "the " * 40000}).encode()
    assert error_of(httpx.post(server + "/v1/completions", headers=auth, content=body), 413)["code"] == \
        "request_too_large"

    def chunked():  # no Content-Length: the limit applies while the body streams in
        for _ in range(20):
            yield b" " * 8192

    error_of(httpx.post(server + "/v1/completions", headers=auth, content=chunked()), 413)
    assert error_of(httpx.post(server + "/v1/completions", headers=auth, content=b"{"), 400)


def test_management_needs_a_key_and_a_root(tiny_llama, adapter_root):
    with thread_server(tiny_llama) as (url, _):
        error = error_of(httpx.post(url + "/v1/adapters", json={"name": "a", "path": "alpha"}), 403)
        assert "API key" in error["message"]
        assert httpx.get(url + "/v1/models").status_code == 200  # no key set: the API itself is open
    with thread_server(tiny_llama, api_key=KEY) as (url, _):
        error = error_of(httpx.post(url + "/v1/adapters", headers={"Authorization": f"Bearer {KEY}"},
                                    json={"name": "a", "path": "alpha"}), 403)
        assert "--adapter-root" in error["message"]


def test_no_key_learns_nothing_of_the_body_and_a_stalled_body_gets_408(tiny_llama):
    """Found by benchmarks/serve_abuse.py: a malformed body without the key was answered 400 (naming fields) and
    a client that stalled mid-body held its request forever (uvicorn has no read timeout)."""
    with thread_server(tiny_llama, api_key=KEY, body_timeout=1.0) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            error = error_of(httpx.post(url + "/v1/completions", headers=headers, content=b'{"model": 1}'), 401)
            assert error["code"] == "invalid_api_key"
        auth = {"Authorization": f"Bearer {KEY}"}
        assert error_of(httpx.post(url + "/v1/completions", headers=auth, content=b'{"model": 1}'), 400)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as stalled:
            stalled.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                            "Content-Length: 50\r\n\r\n{\"model\"".encode())
            answer = httpx.post(url + "/v1/completions", headers=auth, timeout=10,
                                json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
            assert answer.status_code == 200  # others are served while it stalls
            answer = b""
            while not answer.endswith(b"}}"):  # headers and body may come in separate pieces
                piece = stalled.recv(65536)
                if not piece:
                    break
                answer += piece
            head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory, tiny_llama):
    """The tiny Llama with room for long answers, so a row is still running when the test acts on it."""
    folder = tmp_path_factory.mktemp("long-llama")
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(tiny_llama, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in os.listdir(tiny_llama):
        if "token" in name:
            shutil.copy(os.path.join(tiny_llama, name), folder)
    return str(folder)


def test_full_queue_gives_429_and_a_dropped_stream_frees_its_row(long_llama):
    with thread_server(long_llama, max_batch=1, max_queued=1, max_tokens=4000) as (url, _):
        health = lambda: httpx.get(url + "/health").json()  # noqa: E731
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True,
                "ignore_eos": True}  # rows run until max_tokens or until their client leaves
        with httpx.Client(timeout=30) as first, first.stream("POST", url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            with httpx.Client(timeout=30) as second, second.stream("POST", url + "/v1/completions",
                                                                    json=body) as queued:
                wait_for(lambda: health()["queued"] == 1, what="the second request to wait")
                error = error_of(httpx.post(url + "/v1/completions", json={**body, "stream": False}), 429)
                assert error["type"] == "rate_limit_error"
                assert health()["running"] == 1
                running.close()
                first.close()
                wait_for(lambda: health()["queued"] == 0, what="the queued request to take the freed row")
                assert next(line for line in queued.iter_lines() if line.startswith("data:"))
        wait_for(lambda: health() == {"status": "ok", "adapters": 0, "running": 0, "queued": 0},
                 what="both rows to be freed")


def test_serve_command_errors_are_one_line(capsys, tiny_llama, tmp_path):
    (tmp_path / "empty").mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    for argv, fragment in ((["--adapter", f"a={tmp_path / 'empty'}"], "adapter_model.safetensors"),
                           (["--adapter", f"a.b={tmp_path / 'empty'}"], "adapter name 'a.b'"),
                           (["--adapter-root", str(tmp_path / "none")], "--adapter-root"),
                           (["--port", str(taken.getsockname()[1])], "cannot listen")):
        capsys.readouterr()
        assert main(["serve", "--model", tiny_llama, "--port", "0", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and fragment in err, err
    taken.close()
