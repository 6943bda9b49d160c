"""The serving benchmark's soak traffic: every shape of request the server answers, the same on every run."""

from __future__ import annotations

import itertools

from benchmarks.serve import soak_traffic


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
    assert all(("messages" in body) == (path == "/v1/chat/completions") for path, body in requests)
