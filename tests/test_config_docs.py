"""docs/config.md lists every key a run accepts, each with a meaning, and is regenerated when the models change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from loratune import config_docs
from loratune.train.run_config import RunConfig

PAGE = Path(__file__).resolve().parents[1] / config_docs.DOC_PATH


def test_docs_config_md_is_current():
    on_disk = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
    assert on_disk == config_docs.render(), f"docs/config.md is stale: run `{config_docs.REGENERATE}`"


def _leaf_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict) and key in ("model", "lora", "data", "train"):
            keys |= _leaf_keys(value, f"{key}.")
        else:
            keys.add(prefix + key)
    return keys


def test_every_key_of_a_validated_config_is_documented_once():
    config = RunConfig.model_validate({"model": {"name": "m"}, "lora": {"target_modules": ["q"]}, "data": {}})
    dumped = _leaf_keys(config.model_dump(mode="json"))
    documented = [row["key"] for row in config_docs.config_keys()]
    assert sorted(documented) == sorted(dumped)
    assert all(row["meaning"].strip() for row in config_docs.config_keys())
    lora_fields = {f"lora.{f.name}" for f in dataclasses.fields(config.lora)}
    assert lora_fields <= set(documented)


def test_a_key_without_meaning_is_an_error(monkeypatch):
    meanings = dict(config_docs.MEANINGS)
    del meanings["train.batch_size"]
    monkeypatch.setattr(config_docs, "MEANINGS", meanings)
    with pytest.raises(ValueError, match="train.batch_size: no meaning"):
        config_docs.config_keys()


def test_a_meaning_for_a_removed_key_is_an_error(monkeypatch):
    monkeypatch.setattr(config_docs, "MEANINGS", {**config_docs.MEANINGS, "train.gone": "was here"})
    with pytest.raises(ValueError, match="train.gone"):
        config_docs.config_keys()


def test_check_reports_a_stale_page_with_the_command(tmp_path, capsys):
    page = tmp_path / "config.md"
    assert config_docs.main(["--check", str(page)]) == 1
    assert "make config-docs" in capsys.readouterr().err
    assert config_docs.main([str(page)]) == 0
    assert config_docs.main(["--check", str(page)]) == 0
    page.write_text(page.read_text() + "edited\n")
    assert config_docs.main(["--check", str(page)]) == 1
