"""A missing optional part (serve, export, plot) is one line naming the extra that installs it.

Each case runs in a subprocess where the extra's modules are blocked (`sys.modules[name] = None`, which is
what an uninstalled module looks like to `import` and to `importlib.util.find_spec`).
"""

import json
import subprocess
import sys

import pytest
import yaml

RUN = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
from loratune.cli import main
sys.exit(main({argv!r}))
"""


def run_blocked(blocked, argv, cwd):
    code = RUN.format(blocked=list(blocked), argv=list(argv))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(("blocked", "argv", "extra", "what"), [
    (["fastapi"], ["serve", "--model", "{model}"], "serve", "loratune serve"),
    (["uvicorn"], ["serve", "--model", "{model}"], "serve", "loratune serve"),
    (["gguf"], ["export", "{tmp}/adapter", "--model", "{model}", "--format", "gguf-lora", "--out", "{tmp}/a.gguf"],
     "export", "loratune export"),
])
def test_a_missing_extra_is_one_line_naming_it(tiny_gpt2, tmp_path, blocked, argv, extra, what):
    argv = [a.format(model=tiny_gpt2, tmp=tmp_path) for a in argv]
    done = run_blocked(blocked, argv, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"loratune: error: {what} needs the {extra} extra: pip install 'loratune[{extra}]'"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_same_commands_get_past_the_check_when_the_extra_is_there(tiny_gpt2, tmp_path):
    done = run_blocked([], ["export", str(tmp_path / "adapter"), "--model", tiny_gpt2, "--format", "gguf-lora",
                            "--out", str(tmp_path / "a.gguf")], tmp_path)
    assert done.returncode == 2 and "extra" not in done.stderr and "adapter" in done.stderr, done.stderr


def test_training_without_the_plot_extra_writes_the_report_without_a_plot(run_config, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(train={"max_steps": 2})))
    done = run_blocked(["matplotlib"], ["train", str(config), "--quiet"], tmp_path)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "plot" in line]
    assert said == ["loratune: no plot.png: training plots need the plot extra: pip install 'loratune[plot]'"]
    out = tmp_path / "run"
    assert not (out / "plot.png").exists() and "plot:" not in done.stdout
    report = (out / "report.md").read_text()
    assert "No plot: training plots need the plot extra" in report and "plot.png" not in report
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
