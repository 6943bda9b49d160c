"""Helpers shared by the CLI-level training tests: a config file on disk, and the one error line a
command must end with."""

from __future__ import annotations

import yaml

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
