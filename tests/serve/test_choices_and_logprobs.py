"""`n` choices and log-probabilities on both endpoints (issue 25), spoken to with the official `openai` client:
greedy choices are equal, seeded sampled ones differ and repeat, and every log-probability equals log_softmax
of a direct forward of the model with the adapter, within 1e-4."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serve_tools import thread_server

import loratune as lt
from loratune.pretrained import load_model

PROMPT = "the cat sat on a mat"
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def url(tiny_llama, adapter_root):
    adapters = [(name, str(adapter_root / name)) for name in ("alpha", "beta")]
    with thread_server(tiny_llama, adapters) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_llama, adapter_root):
    """A separate copy of the model per adapter, run by a plain forward (no server, no mixed batch)."""
    def make(adapter: str):
        model, tokenizer = load_model(tiny_llama, "causal-lm")
        lt.load_adapter(model, adapter_root / adapter)
        return model.eval(), tokenizer
    return {name: make(name) for name in ("alpha", "beta")}


def direct_logprobs(model, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits that predicted each of `new_ids`, from one forward over prompt and answer."""
    ids = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_completion_logprobs_equal_a_direct_forward(client, reference):
    model, tokenizer = reference["alpha"]
    prompt_ids = tokenizer(PROMPT).input_ids
    for sampling in ({"temperature": 0}, {"temperature": 1.3, "seed": 5}):
        answer = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=10, logprobs=3,
                                           extra_body={"ignore_eos": True}, **sampling).choices[0]
        got = answer.logprobs
        ids = tokenizer.convert_tokens_to_ids(got.tokens)  # word-level: a token's text is its name
        want = direct_logprobs(model, prompt_ids, ids)
        assert len(ids) == 10 and len(got.token_logprobs) == len(got.top_logprobs) == len(got.text_offset) == 10
        for i, token in enumerate(ids):
            assert abs(got.token_logprobs[i] - want[i, token].item()) < 1e-4
            best = want[i].topk(3).indices.tolist()
            assert set(got.top_logprobs[i]) == {tokenizer.decode([t]) for t in best + [token]}  # best 3 and chosen
            for text, value in got.top_logprobs[i].items():
                assert abs(value - want[i, tokenizer.convert_tokens_to_ids(text)].item()) < 1e-4
            if sampling["temperature"] == 0:
                assert token == best[0]
        assert got.text_offset == [len(tokenizer.decode(ids[:i], skip_special_tokens=True)) for i in range(10)]
        assert answer.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_logprobs_equal_a_direct_forward_for_each_of_n_choices(client, reference):
    model, tokenizer = reference["beta"]
    prompt_ids = tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False).input_ids
    response = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=8, n=2, temperature=1.5,
                                              seed=9, logprobs=True, top_logprobs=2,
                                              extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].message.content != response.choices[1].message.content
    for choice in response.choices:
        content = choice.logprobs.content
        ids = tokenizer.convert_tokens_to_ids([entry.token for entry in content])
        want = direct_logprobs(model, prompt_ids, ids)
        assert len(ids) == 8
        for i, entry in enumerate(content):
            assert abs(entry.logprob - want[i, ids[i]].item()) < 1e-4
            assert entry.bytes == list(entry.token.encode())
            best = want[i].topk(2)
            assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in best.indices.tolist()]
            assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, best.values.tolist()))
    assert response.usage.completion_tokens == 16 and response.usage.prompt_tokens == len(prompt_ids)


def test_n_greedy_choices_are_equal_and_seeded_ones_differ_and_repeat(client):
    one = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0)
    three = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens

    def chat(**options):
        return client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=12, temperature=1.5,
                                              seed=11, **options)

    sampled = [c.message.content for c in chat(n=4).choices]
    assert len(set(sampled)) > 1 and [c.message.content for c in chat(n=4).choices] == sampled
    assert chat().choices[0].message.content == sampled[0]  # choice 0 samples with the request's seed
    streamed = ["", ""]
    for chunk in client.completions.create(model="beta", prompt=PROMPT, max_tokens=12, temperature=1.5, seed=2,
                                           n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    whole = client.completions.create(model="beta", prompt=PROMPT, max_tokens=12, temperature=1.5, seed=2, n=2)
    assert streamed == [c.text for c in whole.choices]


def test_streamed_chat_logprobs_cover_every_token(client):
    options = {"model": "alpha", "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "logprobs": True,
               "top_logprobs": 1}
    whole = client.chat.completions.create(**options).choices[0]
    pieces, entries = "", []
    for chunk in client.chat.completions.create(stream=True, **options):
        for choice in chunk.choices:
            pieces += choice.delta.content or ""
            entries += choice.logprobs.content if choice.logprobs else []
    assert pieces == whole.message.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in whole.logprobs.content]


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"n": 0}, "n"), ("/v1/chat/completions", {"n": 33}, "n"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"), ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_out_of_range_choices_and_logprobs_are_refused_by_name(url, path, fields, param):
    body = {"model": "alpha", "max_tokens": 4, **fields}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT})
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param + ":") and "\n" not in error["message"]


def test_n_choices_beside_other_requests_keep_their_greedy_tokens(client):
    def ask(n):
        return [c.text for c in client.completions.create(model="beta", prompt=PROMPT, max_tokens=16,
                                                          temperature=0, n=n).choices]

    alone = ask(1)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, [3, 1, 2, 1]))
    assert together == [alone * 3, alone, alone * 2, alone]
