"""`loratune sweep`: Optuna trials scored on a part of the training split, kept in a storage that survives a
killed worker and that several workers share."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import yaml

from loratune.train.run_config import validate_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


def start(cwd, *args):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "loratune", "sweep", "run.yaml", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def config_file(run_config, tmp_path):
    data = run_config(train={"max_steps": 8})
    validate_config(data, "test")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))


def trials(url):
    return optuna.load_study(study_name="loratune-sweep", storage=url).get_trials(deepcopy=False)


def finished(url):
    return [t for t in trials(url) if t.state.name in ("COMPLETE", "PRUNED")]


def finished_so_far(url) -> int:
    """Trials finished, read straight from the SQLite file (read-only, so this poller never races the worker
    creating the database's tables, as Optuna's own reader would); 0 until the worker has made them."""
    path = url.removeprefix("sqlite:///")
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_sweep_resumes_from_its_storage(run_config, tmp_path):
    config_file(run_config, tmp_path)
    url = f"sqlite:///{tmp_path / 'run' / 'sweep.db'}"
    first = start(tmp_path, "--trials", "5", "--heartbeat", "1")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (tmp_path / "run" / "sweep.db").exists() and finished_so_far(url) >= 2:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    before = {t.number: (t.state.name, t.value, t.params) for t in finished(url)}
    assert 2 <= len(before) < 5  # killed mid-way
    time.sleep(3.5)  # past the grace period (3 heartbeats): the killed worker's trial counts as stale
    second = start(tmp_path, "--trials", "5", "--heartbeat", "1")
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    after = finished(url)
    assert len(after) == 5
    assert {t.number: (t.state.name, t.value, t.params) for t in after if t.number in before} == before
    for t in trials(url):
        assert t.state.name in ("COMPLETE", "PRUNED", "FAIL")  # nothing left running
    table = (tmp_path / "run" / "sweep.md").read_text()
    assert "| trial | state | learning rate |" in table and "Best: trial" in table
    best = yaml.safe_load((tmp_path / "run" / "best.yaml").read_text())
    validate_config(best, "best.yaml")
    assert best["output_dir"] == str(tmp_path / "run" / "best")


def test_two_workers_share_one_storage_and_never_run_a_trial_twice(run_config, tmp_path):
    config_file(run_config, tmp_path)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [start(tmp_path, "--trials", "6", "--storage", url) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    done = finished(url)
    assert len(done) == 6  # the budget over both workers, not per worker
    assert len({t.number for t in done}) == 6
    ran_by = {t.number: t.user_attrs["worker"] for t in done}
    assert set(ran_by.values()) <= {w.pid for w in workers}
    assert all(t.state.name != "RUNNING" for t in trials(url))


def test_a_missing_optuna_or_a_bad_storage_is_one_line(run_config, tmp_path, monkeypatch):
    import pytest

    from loratune.core.errors import LoratuneError
    from loratune.sweep import sweep

    config = validate_config(run_config(), "test")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "optuna", None)  # as if not installed
        with pytest.raises(LoratuneError, match=r"^loratune sweep needs Optuna: pip install 'loratune\[sweep\]'$"):
            sweep(config, 2)
    with pytest.raises(LoratuneError, match=r"^--storage nosuchdb://x: "):
        sweep(config, 2, storage="nosuchdb://x")
