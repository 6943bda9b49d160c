"""Session fixtures shared by the data and model tests: real tokenizers that work offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2(request, tmp_path_factory):
    """(model, tokenizer) of the built-in SmolLM2; the dequantized copy (about 20 s to make) is kept
    in .pytest_cache for later runs."""
    from loratune.models import load_model

    store = getattr(request.config, "cache", None)
    cache = store.mkdir("loratune-models") if store is not None else tmp_path_factory.mktemp("models")
    return load_model("smollm2-135m-instruct", "causal-lm", cache_dir=cache)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]
