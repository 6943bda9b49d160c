"""The `loratune` command: each subcommand on a tiny model, and one-line errors with exit code 2."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import loratune as lt
from loratune.allocator import active_malloc
from loratune.cli import main
from loratune.generate import generate_stream


@pytest.fixture
def config_file(run_config, tmp_path):
    def write(**sections):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(run_config(**sections)))
        return str(path)
    return write


def one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_train_with_overrides_then_eval_inspect_merge_generate(config_file, capsys, tmp_path, tiny_gpt2):
    path = config_file()
    assert main(["train", path, "--set", "train.max_steps=4", "--set", "lora.r=2", "--quiet"]) == 0
    out = tmp_path / "run"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["lora"]["r"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert "adapter:" in capsys.readouterr().out
    malloc = active_malloc()  # this process's: the run's summary and report name it
    assert json.loads((out / "metrics.json").read_text())["malloc"] == malloc
    assert f"MiB RSS ({malloc} malloc)" in (out / "report.md").read_text()

    assert main(["eval", path, "--quiet"]) == 0
    assert "accuracy:" in capsys.readouterr().out

    assert main(["inspect", "--config", path, "--adapter", str(out / "adapter")]) == 0
    shown = capsys.readouterr().out
    assert "lora targets: 4 modules" in shown and "trainable" in shown and "r=2" in shown

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", tiny_gpt2, "--adapter", str(out / "adapter"), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    lt.load_adapter(adapted, out / "adapter")
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    assert (merged(ids).logits - adapted(ids).logits).abs().max() <= 1e-5
    assert not any("lora" in k for k in merged.state_dict())
    capsys.readouterr()

    assert main(["generate", "--model", tiny_gpt2, "--adapter", str(out / "adapter"), "--prompt", "the good movie",
                 "--max-new-tokens", "3"]) == 0
    streamed = io.StringIO()
    text = generate_stream(tiny_gpt2, "the good movie sentiment :", str(out / "adapter"), chat=False,
                           max_new_tokens=3, out=streamed)
    assert streamed.getvalue() == text + "\n"
    chat_stream = io.StringIO()
    chat_text = generate_stream(str(merged_dir), "hello", None, chat=True, max_new_tokens=2, out=chat_stream)
    assert chat_stream.getvalue() == chat_text + "\n"


@pytest.mark.parametrize("override,fragments", [
    ("train.max_stepz=3", ["train.max_stepz", "unknown key"]),
    ("train.max_steps=many", ["train.max_steps"]),
    ("train.max_steps=0", ["train.max_steps", "greater than 0"]),
    ("lora.r=-1", ["lora", "positive integer"]),
    ("data.train=/nonexistent/file.jsonl", ["data.train", "/nonexistent/file.jsonl"]),
    ("model.task=poetry", ["model.task"]),
    ("train.max_steps", ["KEY=VALUE"]),
])
def test_config_errors_are_one_line_and_name_the_key(config_file, capsys, tmp_path, override, fragments):
    path = config_file()
    one_line_error(capsys, ["train", path, "--set", override], path if "=" in override else "", *fragments)
    assert not (tmp_path / "run").exists()  # nothing written before the config is valid


def test_missing_and_broken_config_files(capsys, tmp_path):
    one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml", "not found")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    one_line_error(capsys, ["train", str(broken)], "broken.yaml", "invalid YAML")


def test_merge_refuses_a_non_empty_output_and_bad_adapters(capsys, tmp_path, tiny_gpt2):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    one_line_error(capsys, ["merge", "--model", tiny_gpt2, "--adapter", str(tmp_path), "--out", str(tmp_path / "out")],
                   "not empty")
    one_line_error(capsys, ["merge", "--model", tiny_gpt2, "--adapter", str(tmp_path / "missing"), "--out",
                            str(tmp_path / "new")], "adapter_config.json")
    assert not (tmp_path / "new").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(lt.ConfigError):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])


def test_demo_smoke_on_the_real_model(model_cache, tmp_path, capsys):
    """The real SmolLM2 and movie-sentiment data, cut down to seconds: the whole pipeline runs."""
    argv = ["demo", "--output", str(tmp_path / "demo"), "--quiet", "--set", "train.max_steps=2",
            "--set", "data.max_train_records=32", "--set", "data.max_eval_records=8", "--set", "train.num_samples=1"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert summary["data"]["eval_examples"] == 8 and summary["steps"] == 2
    assert 0.0 <= summary["after"]["accuracy"] <= 1.0 and len(summary["samples_after"]) == 1
    assert json.loads((tmp_path / "demo" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_output_paths_that_are_files_and_bad_generate_arguments(config_file, capsys, tmp_path, tiny_gpt2):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    one_line_error(capsys, ["train", config_file(), "--set", f"output_dir={blocker}"], "not a folder")
    one_line_error(capsys, ["merge", "--model", tiny_gpt2, "--adapter", str(tmp_path), "--out", str(blocker)],
                   "not a folder")
    one_line_error(capsys, ["generate", "--model", tiny_gpt2, "--prompt", "  "], "prompt is empty")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", tiny_gpt2, "--prompt", "the", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2


def test_lengths_beyond_the_models_positions_are_one_line_errors(config_file, capsys, tiny_gpt2):
    one_line_error(capsys, ["train", config_file(), "--set", "data.max_length=200"], "data.max_length=200", "64")
    one_line_error(capsys, ["generate", "--model", tiny_gpt2, "--prompt", "the", "--max-new-tokens", "100"],
                   "--max-new-tokens", "64 positions")


def test_generate_with_a_seq2seq_adapter(tiny_t5, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    lt.add_adapter(model, lt.LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM",
                                        init_lora_weights=False))
    lt.save_adapter(model, tmp_path / "t5-adapter")
    streamed = io.StringIO()
    text = generate_stream(tiny_t5, "the cat", str(tmp_path / "t5-adapter"), chat=False, max_new_tokens=3,
                           out=streamed)
    assert streamed.getvalue() == text + "\n"
    assert main(["generate", "--model", tiny_t5, "--adapter", str(tmp_path / "t5-adapter"), "--prompt", "the cat",
                 "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("override,message", [
    ("lora.r=true", "lora: LoraConfig.r must be a positive integer, got True"),
    ("lora.lora_alpha=0", "lora: LoraConfig.lora_alpha must be a finite non-zero number, got 0"),
    ("lora.lora_alpha=.nan", "lora: LoraConfig.lora_alpha must be a finite non-zero number, got nan"),
    ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number"),
    ("train.learning_rate=-.inf", "train.learning_rate: Input should be a finite number"),
    ("train.weight_decay=.nan", "train.weight_decay: Input should be a finite number"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm: Input should be a finite number"),
    ("train.lora_plus_ratio=.inf", "train.lora_plus_ratio: Input should be a finite number"),
])
def test_values_that_would_train_nothing_or_blow_up_are_refused_before_loading(config_file, capsys, tmp_path,
                                                                               monkeypatch, override, message):
    import loratune.pretrained

    monkeypatch.setattr(loratune.pretrained, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = config_file()
    assert one_line_error(capsys, ["train", path, "--set", override]) == f"loratune: error: {path}: {message}"
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8_is_one_line(config_file, capsys, tmp_path):
    path = config_file()
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes(open(path, encoding="utf-8").read().encode("utf-16"))
    assert one_line_error(capsys, ["train", str(utf16)]) == (
        f"loratune: error: {utf16}: the file is UTF-16 text; save the config as UTF-8")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: {name: caf\u00e9}\n".encode("latin-1"))
    assert one_line_error(capsys, ["train", str(latin1)]) == (
        f"loratune: error: {latin1}: not UTF-8 text (byte 0xe9 at position 17); save the config as UTF-8")


def test_a_corrupt_model_file_is_one_line_for_train_inspect_and_generate(config_file, capsys, tmp_path, tiny_gpt2):
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_gpt2, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])  # truncated
    expected = (f"loratune: error: model '{bad}': {weights} is corrupt or truncated (Error while deserializing "
                "header: incomplete metadata, file not fully covered)")
    for argv in (["train", config_file(model={"name": str(bad)})], ["inspect", "--model", str(bad)],
                 ["generate", "--model", str(bad), "--prompt", "the cat"]):
        assert one_line_error(capsys, argv) == expected, argv
    assert not (tmp_path / "run").exists()  # the failed run left no folder behind


def test_eval_refuses_an_adapter_made_for_another_task(config_file, capsys, tmp_path, tiny_bert):
    path = config_file(train={"max_steps": 1})
    assert main(["train", path, "--quiet"]) == 0
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    classify = config_file(model={"name": tiny_bert, "task": "classification"}, data={
        "prompt_template": None, "completion_template": None}, lora={"target_modules": ["query", "value"]})
    assert one_line_error(capsys, ["eval", classify, "--adapter", str(adapter)]) == (
        f"loratune: error: {adapter}/adapter_config.json: a causal-lm adapter (task_type CAUSAL_LM), but the run's "
        "model.task is classification")


def test_loading_a_model_puts_only_loratunes_own_lines_on_stderr(config_file, tmp_path):
    """transformers imports torchao when installed (a test dependency here), which logs about its kernels."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "loratune.cli", "train", config_file(train={"max_steps": 1})],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_the_demo_writes_a_new_numbered_folder_beside_earlier_demos(tmp_path):
    from loratune.cli import next_free_folder

    base = tmp_path / "runs" / "demo"
    assert next_free_folder(base) == str(base)
    base.mkdir(parents=True)
    assert next_free_folder(base) == str(base)  # empty: free
    (base / "report.md").write_text("earlier demo")
    (tmp_path / "runs" / "demo-2").mkdir()
    (tmp_path / "runs" / "demo-2" / "config.yaml").write_text("x")
    assert next_free_folder(base) == str(tmp_path / "runs" / "demo-3")


def test_inspect_reports_an_adapter_made_for_another_model(tmp_path, capsys, tiny_gpt2):
    """Issue 27: `inspect --model X --adapter A` said nothing when A was made for another model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    lt.add_adapter(model, lt.LoraConfig(r=2, target_modules=["c_attn"], base_model_name_or_path="someone/gpt2-xl"))
    lt.save_adapter(model, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["inspect", "--model", tiny_gpt2, "--adapter", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert f"warning: the adapter fits, but was made for base model 'someone/gpt2-xl', not {tiny_gpt2!r}" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config,
                                                                          "base_model_name_or_path": tiny_gpt2}))
    assert main(["inspect", "--model", tiny_gpt2, "--adapter", str(tmp_path / "adapter")]) == 0
    assert "adapter fits this model\n" in capsys.readouterr().out


def test_generate_precision_picks_the_base_dtype_as_the_cpu_choice_says(monkeypatch, capsys, tiny_gpt2):
    """`--precision` (generate and serve share it): fp32 by default, bf16 when asked, and `auto` as the CPU probe
    chose (`precision.inference_dtype`)."""
    import loratune.generate as generate
    import loratune.precision as precision

    loaded = []

    def recording(*args, **kwargs):
        loaded.append(kwargs["dtype"])
        return real(*args, **kwargs)

    real = generate.load_model
    monkeypatch.setattr(generate, "load_model", recording)
    for extra in ([], ["--precision", "bf16"]):
        assert main(["generate", "--model", tiny_gpt2, "--prompt", "the good movie", "--max-new-tokens", "3",
                     *extra]) == 0
    assert loaded == [torch.float32, torch.bfloat16]
    for chosen, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        monkeypatch.setattr(precision, "cpu_choice", lambda chosen=chosen: {"precision": chosen})
        assert precision.inference_dtype("auto") == dtype
    assert [precision.inference_dtype(p) for p in ("fp32", "bf16")] == [torch.float32, torch.bfloat16]
    from loratune.cli import build_parser

    parsed = build_parser().parse_args(["serve", "--model", tiny_gpt2, "--precision", "auto"])
    assert parsed.precision == "auto" and build_parser().parse_args(["serve", "--model", "m"]).precision == "fp32"


def test_the_command_starts_without_transformers_modeling_code():
    """Every process (each torchrun rank, each compared method) pays its imports: transformers' modeling module
    (seconds, and logs about kernels this machine cannot load) comes in only with a model."""
    probe = "import sys, loratune.cli, loratune.batching; print('transformers.modeling_utils' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
