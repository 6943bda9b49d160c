"""Requests a hostile or careless client sends (issue 27): each is answered alone, in OpenAI's JSON error shape
when refused, and never fails another client's request or leaves a traceback in the server's log."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_tools import thread_server

from loratune.cli import main

GREEDY = {"model": "alpha", "prompt": "the cat sat on a mat", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def url(tiny_llama, adapter_root):
    with thread_server(tiny_llama, [("alpha", str(adapter_root / "alpha"))]) as (base, _):
        yield base


def refusal(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post(url: str, path: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)


def test_tiny_temperature_or_top_p_is_answered_and_spares_the_batch(url):
    alone = post(url, "/v1/completions", GREEDY).json()["choices"][0]["text"]
    odd = [{**GREEDY, "temperature": 1e-39}, {**GREEDY, "temperature": 1e-300},
           {**GREEDY, "temperature": 1.0, "top_p": 1e-300, "seed": 3}]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: post(url, "/v1/completions", body), [GREEDY, *odd, GREEDY] * 2))
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
    assert {a.json()["choices"][0]["text"] for a in answers} == {alone}  # each is the greedy answer


def test_huge_seed_and_lone_surrogates_are_json_400s_without_a_traceback(url, capfd):
    capfd.readouterr()
    error = refusal(post(url, "/v1/completions", {**GREEDY, "seed": 18446744073709551616}))
    assert error["param"] == "seed" and "18446744073709551615" in error["message"]
    surrogate = b'{"model": "alpha", "prompt": "\\ud800abc", "max_tokens": 4}'
    error = refusal(post(url, "/v1/completions", surrogate))
    assert error["param"] == "prompt" and "lone surrogate" in error["message"]
    chat = b'{"model": "alpha", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}'
    assert refusal(post(url, "/v1/chat/completions", chat))["param"] == "messages.0.content.0.text"
    assert refusal(post(url, "/v1/completions", b'{"model": "\\ud800", "prompt": "the"}'))["param"] == "model"
    assert post(url, "/v1/completions", GREEDY).status_code == 200  # the server goes on
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("tool_choice", "required"), ("functions", [{"name": "f"}]),
                                          ("response_format", {"type": "json_object"})])
def test_unsupported_openai_fields_are_refused_by_name(url, field, value):
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", GREEDY)):
        error = refusal(post(url, path, {**body, field: value}))
        assert error["param"] == field and error["message"].startswith(f"{field}: ")
    plain = post(url, "/v1/chat/completions", {**chat, "response_format": {"type": "text"}, "tool_choice": "none"})
    assert plain.status_code == 200, plain.text


def test_image_parts_are_refused_naming_the_part(url):
    parts = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    body = {"model": "alpha", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}
    error = refusal(post(url, "/v1/chat/completions", body))
    assert error["param"] == "messages.0.content.1.type" and "'image_url'" in error["message"]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_key_no_client_can_send_is_refused_at_start(capsys, monkeypatch, tiny_llama, how):
    """Refused rather than compared as bytes: HTTP headers are Latin-1 and the official client sends ASCII."""
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started with a key no client can send")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    argv = ["serve", "--model", tiny_llama, "--port", "0"]
    if how == "flag":
        argv += ["--api-key", "clé-secrète"]
    else:
        monkeypatch.setenv("LORATUNE_API_KEY", "ключ")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    name = "--api-key" if how == "flag" else "LORATUNE_API_KEY"
    assert err.count("\n") == 1 and err.startswith(f"loratune: error: {name}: ") and "ASCII" in err, err
