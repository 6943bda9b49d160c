"""What a format cannot carry is refused in one line before anything is written; the command's exit codes."""

import pytest
from export_tools import save_adapter, tiny_adapter, tiny_llama_dir  # noqa: F401 (fixtures)

from loratune.cli import main
from loratune.errors import LoratuneError
from loratune.export import export


def one_line_error(capsys, argv, *fragments):
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def nothing_written(folder):
    return not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.parametrize("lora, fragment", [
    ({"use_dora": True}, "use_dora=true"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding adapter"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
])
def test_gguf_lora_refuses_what_it_cannot_carry(tiny_llama_dir, tmp_path, capsys, lora, fragment):
    adapter = save_adapter(tmp_path / "adapter", tiny_llama_dir, **lora)
    out = tmp_path / "out"
    one_line_error(capsys, ["export", adapter, "--model", str(tiny_llama_dir), "--format", "gguf-lora",
                            "--out", str(out / "a.gguf")], fragment)
    assert nothing_written(out)
    # the merged formats carry all of these
    assert main(["export", adapter, "--model", str(tiny_llama_dir), "--format", "gguf", "--out",
                 str(out / "m.gguf"), "--dtype", "f32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["m.Modelfile", "m.gguf"]


def test_non_llama_architecture_is_refused_before_writing(tiny_gpt2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import loratune as lt

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    lt.add_adapter(model, lt.LoraConfig(r=2, target_modules=["c_attn"]))
    lt.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "out"
    for fmt in ("gguf", "gguf-lora"):
        one_line_error(capsys, ["export", str(tmp_path / "adapter"), "--model", tiny_gpt2, "--format", fmt,
                                "--out", str(out / "x.gguf")], "'GPT2LMHeadModel'", "is not supported by GGUF export")
    assert nothing_written(out)


@pytest.mark.parametrize("fmt, dtype", [("gguf-lora", "bf16"), ("safetensors", "q8_0")])
def test_dtype_a_format_cannot_take(tiny_llama_dir, tiny_adapter, tmp_path, capsys, fmt, dtype):
    out = tmp_path / "out"
    one_line_error(capsys, ["export", tiny_adapter, "--model", str(tiny_llama_dir), "--format", fmt,
                            "--out", str(out / "x"), "--dtype", dtype], f"--dtype '{dtype}'")
    assert nothing_written(out)


def test_missing_adapter_and_folder_out(tiny_llama_dir, tiny_adapter, tmp_path, capsys):
    one_line_error(capsys, ["export", str(tmp_path / "nope"), "--model", str(tiny_llama_dir), "--format", "gguf",
                            "--out", str(tmp_path / "x.gguf")], "adapter_config.json")
    one_line_error(capsys, ["export", tiny_adapter, "--model", str(tiny_llama_dir), "--format", "gguf",
                            "--out", str(tmp_path)], "is a folder")
    assert main(["export", tiny_adapter, "--model", str(tiny_llama_dir), "--format", "safetensors",
                 "--out", str(tmp_path / "merged")]) == 0
    one_line_error(capsys, ["export", tiny_adapter, "--model", str(tiny_llama_dir), "--format", "safetensors",
                            "--out", str(tmp_path / "merged")], "not empty")


def test_unknown_format_is_a_usage_error(tiny_adapter, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", tiny_adapter, "--model", "m", "--format", "onnx", "--out", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(LoratuneError, match="--format 'onnx'"):
        export(tiny_adapter, "m", "onnx", "x")


def test_failed_write_leaves_no_partial_file(tiny_llama_dir, tiny_adapter, tmp_path, monkeypatch):
    import loratune.export as export_module

    def crash(*args, **kwargs):
        (args[3]).write_bytes(b"GGUF half")  # the temporary file, partly written
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_model_gguf", crash)
    with pytest.raises(OSError, match="disk full"):
        export(tiny_adapter, str(tiny_llama_dir), "gguf", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_export_command_prints_what_it_wrote(tiny_llama_dir, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "lora.gguf"
    assert main(["export", tiny_adapter, "--model", str(tiny_llama_dir), "--format", "gguf-lora",
                 "--out", str(out), "--dtype", "q8_0"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}", f"wrote {tmp_path / 'lora.Modelfile'}"]
