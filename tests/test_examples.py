"""Every shipped example config validates, and names a built-in or a file that exists."""

from pathlib import Path

import pytest

from loratune.train import demo_config, load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_there_is_an_example_per_promised_use():
    names = {p.stem for p in EXAMPLES}
    assert {"minilm-sentiment", "sms-spam", "smollm2-translation", "smollm2-chat", "smollm2-language-model"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates(path, monkeypatch):
    monkeypatch.chdir(path.parent.parent)
    config = load_config(path)
    assert config.train.max_steps > 0



def test_demo_config_validates():
    config = demo_config("runs/demo-check")
    assert config.model.name == "smollm2-135m-instruct" and config.data.train == "movie-sentiment"
