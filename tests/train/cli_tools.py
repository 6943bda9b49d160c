"""Helpers shared by the training tests: a config file on disk, the one error line a command must end with,
and a run interrupted right after a checkpoint."""

from __future__ import annotations

import yaml

import loratune.train.loop as loop
from loratune.cli import main


def write_config(tmp_path, run_config, name: str = "run.yaml", **sections) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(run_config(**sections)))
    return str(path)


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def crash_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Until `monkeypatch.undo()`, a run raises KeyboardInterrupt right after writing checkpoint `at_step`."""
    real_save = loop.save_checkpoint

    def save_then_crash(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if step == at_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
