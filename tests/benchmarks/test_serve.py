"""The serving benchmark's soak traffic: every shape of request the server answers, the same on every run."""

from __future__ import annotations

import itertools

from benchmarks.serve import settled_growth, soak_traffic
from loratune.serve.bodies import ChatRequest, CompletionRequest
from loratune.serve.completions import logprobs_asked


def test_soak_traffic_mixes_every_model_endpoint_and_option_and_repeats_itself():
    models = ["base", "adapter0", "adapter1"]
    requests = list(itertools.islice(soak_traffic(models, 32), 300))
    assert requests == list(itertools.islice(soak_traffic(models, 32), 300))
    bodies = [body for _, body in requests]
    assert {body["model"] for body in bodies} == set(models)
    assert {path for path, _ in requests} == {"/v1/chat/completions", "/v1/completions"}
    assert {body["stream"] for body in bodies} == {True, False}
    assert {body["n"] for body in bodies} == {1, 2}
    assert {body["temperature"] for body in bodies} == {0, 0.8}
    assert all(8 <= body["max_tokens"] <= 32 for body in bodies)
    assert any(body.get("top_logprobs") for body in bodies) and any(body.get("logprobs") == 2 for body in bodies)
    for path, body in requests:  # every body is one the server takes, log-probabilities in its endpoint's shape
        chat = path == "/v1/chat/completions"
        parsed = (ChatRequest if chat else CompletionRequest).model_validate(body)
        assert logprobs_asked(parsed, chat) in (None, 2)


def test_settled_growth_compares_the_quietest_moments_of_the_second_and_last_minutes():
    rss = {0: 600, 60: 1000, 90: 1400, 120: 1010, 150: 1300, 170: 1020, 190: 1500, 200: 1030}
    samples = [{"t_s": t, "rss_mb": mb} for t, mb in rss.items()]
    got = settled_growth(samples)
    assert (got["settled_second_minute_mb"], got["settled_last_minute_mb"]) == (1000, 1020)
    assert abs(got["settled_growth"] - 0.02) < 1e-12
