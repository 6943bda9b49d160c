"""Fixtures for the server tests."""

import pytest
from serve_tools import make_adapters


@pytest.fixture(scope="session")
def adapter_root(tiny_llama, tmp_path_factory):
    return make_adapters(tiny_llama, tmp_path_factory.mktemp("adapters"))
