"""The bad-input corpus (cases.yaml) through the real command line: each input ends with a non-zero exit and
one stderr line that names the problem and the file, no traceback, and nothing written or executed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from corpus_build import MARKER_NAME, Payload, build_corpus

import loratune
from loratune.cli import main

CASES_FILE = Path(__file__).with_name("cases.yaml")
_ALL = yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))
CASES = _ALL["cases"]
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar, the one thing besides the message allowed on stderr


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tiny_gpt2, tiny_bert) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"), tiny_gpt2, tiny_bert)


def _params():
    for case in CASES:
        yield pytest.param(case, id=case["id"])


def _fill(text: str, root: Path, case: dict, escape) -> str:
    values = {"{file}": str(root / case["file"]), "{root}": str(root), "{model}": str(root / "models" / "gpt2")}
    for key, value in values.items():
        text = text.replace(key, escape(value))
    return text


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in root.rglob("*")}


def _run(argv: list[str], in_subprocess: bool, capsys, cache: Path) -> tuple[int, str, str]:
    if not in_subprocess:
        try:
            code = main(argv)
        except SystemExit as exc:  # the command line's own refusals
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    env = {**os.environ, "PYTHONPATH": str(Path(loratune.__file__).parents[1]), "LORATUNE_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "loratune.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("case", _params())
def test_bad_input_gives_one_line_naming_the_file(case, corpus, capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORATUNE_CACHE", str(cache))
    argv = shlex.split(_fill(case["argv"], corpus, case, str))
    before = _snapshot(corpus)
    try:
        code, out, err = _run(argv, case.get("subprocess", False), capsys, cache)
        lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not PROGRESS.search(line)]
        assert code != 0, f"exit 0; stdout: {out[-500:]}"
        assert "Traceback" not in err and len(lines) == 1, err[-3000:]
        assert out == "", out  # nothing half-printed
        pattern = "loratune: error: " + _fill(case["error"], corpus, case, re.escape)
        assert re.fullmatch(pattern, lines[0]), f"\n{lines[0]}\ndoes not match\n{pattern}"
        named = _fill(case.get("names", "{file}"), corpus, case, str)
        assert named in lines[0]
        assert not (corpus / MARKER_NAME).exists(), "a payload in the corpus was executed"
        assert _snapshot(corpus) == before, "files were written or changed"
        assert not [p for p in cache.rglob("*") if p.is_file()], "files were left in the model cache"
    finally:  # a case that fails must not spoil the others
        (corpus / MARKER_NAME).unlink(missing_ok=True)
        shutil.rmtree(corpus / "out", ignore_errors=True)


def test_the_corpus_is_large_and_its_payloads_are_live(corpus, tmp_path):
    """At least 60 inputs; and the pickle payload really would write its marker, so the refusals above mean
    something (this runs it once, on purpose, into a scratch folder)."""
    import pickle

    assert len(CASES) >= 60 and len({c["id"] for c in CASES}) == len(CASES)
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "ran"
    assert MARKER_NAME in (corpus / "configs" / "python_object_tag.yaml").read_text()
    assert MARKER_NAME in (corpus / "models" / "auto_map" / "evil.py").read_text()
