"""The wheel installs: built from a copy of the source, installed into a fresh virtualenv, and `loratune demo`
runs from it (its package data, the demo config and the playground page, included).

The fresh venv gets the wheel alone (`--no-deps`, no index); the dependencies are the test environment's own,
seen through a .pth file, so the test needs no network and checks what the wheel itself carries.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(argv, **kwargs):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{argv[:3]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
         source])
    (wheel,) = (tmp_path / "dist").glob("loratune-*.whl")
    return wheel


def test_the_wheel_installs_and_runs_the_demo(tmp_path, model_cache):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"loratune/train/demo.yaml", "loratune/serve/playground.html", "loratune/cli.py"} <= set(names)
    assert any(n.endswith("entry_points.txt") for n in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])  # this environment's pip installs into it
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after the wheel's own

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LORATUNE_CACHE=str(model_cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    where = run([python, "-c", "import loratune; print(loratune.__file__)"], cwd=tmp_path, env=env).stdout
    assert where.strip().startswith(str(site)), where  # the wheel's copy, not the source tree
    out = tmp_path / "demo"
    small = ["data.max_train_records=64", "data.max_eval_records=16", "train.num_samples=0"]  # to keep it short
    done = run([venv / "bin" / "loratune", "demo", "--set", "train.max_steps=2", *[f"--set={s}" for s in small],
                "--output", out, "--quiet"], cwd=tmp_path, env=env)
    assert "trained 2 steps" in done.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
