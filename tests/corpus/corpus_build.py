"""Builds the bad-input corpus in a folder: the small text fixtures kept under `files/` (with their
placeholders filled in) and the binary or derived ones made here, so the repository stays small.

Placeholders in the text fixtures: @ROOT@ (the built corpus), @MODEL@ (a tiny GPT-2 folder), @DATA@ (a good
data file), @OUT@ (an output folder no case may create), @MARKER@ (the file a payload would write if it ran).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

FILES = Path(__file__).parent / "files"
MARKER_NAME = "PAYLOAD_RAN"  # written only if some code in the corpus gets executed


class Payload:
    """Unpickling this writes the marker file: proof that a loader refused it rather than ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def build_corpus(root: Path, gpt2_dir: str, bert_dir: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER_NAME
    fill = {"@ROOT@": str(root), "@MODEL@": str(root / "models" / "gpt2"), "@DATA@": str(root / "data" / "good.jsonl"),
            "@OUT@": str(root / "out"), "@MARKER@": str(marker)}
    for source in sorted(FILES.rglob("*")):
        if source.is_file():
            target = root / source.relative_to(FILES)
            target.parent.mkdir(parents=True, exist_ok=True)
            text = source.read_text(encoding="utf-8")
            for key, value in fill.items():
                text = text.replace(key, value)
            target.write_text(text, encoding="utf-8")
    shutil.copytree(gpt2_dir, root / "models" / "gpt2")
    shutil.copytree(bert_dir, root / "models" / "bert")
    _configs(root)
    _data(root)
    _adapters(root, marker)
    _models(root, marker)
    _runs(root)
    return root


def _configs(root: Path) -> None:
    base = (root / "configs" / "base.yaml").read_text(encoding="utf-8")
    (root / "configs" / "utf16.yaml").write_bytes(base.encode("utf-16"))
    (root / "configs" / "latin1.yaml").write_bytes(b"# r\xe9glages\n" + base.encode())
    (root / "configs" / "binary.yaml").write_bytes(bytes(range(256)) * 4)


def _data(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / "data"
    good = (data / "good.jsonl").read_text(encoding="utf-8")
    (data / "latin1.jsonl").write_bytes(good.encode() + '{"text": "caf\xe9", "label": "positive"}\n'.encode("latin-1"))
    (data / "utf16.jsonl").write_bytes(good.encode("utf-16"))
    (data / "nul_bytes.csv").write_bytes(b"text,label\nthe good\x00 movie,positive\n\x00\x00\x00")
    rows = [json.loads(line) for line in good.splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), data / "whole.parquet")
    whole = (data / "whole.parquet").read_bytes()
    (data / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (data / "whole.parquet").unlink()
    pq.write_table(pa.Table.from_pylist([{"text": "the good movie", "score": 5}] * 8), data / "no_label.parquet")


def _adapter_state(model_dir: Path, rank: int = 4, targets: tuple[str, ...] = ("c_attn",)):
    from transformers import AutoModelForCausalLM

    import loratune as lt

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lt.add_adapter(model, lt.LoraConfig(r=rank, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                                        task_type="CAUSAL_LM"))
    return model


def _adapters(root: Path, marker: Path) -> None:
    import loratune as lt

    adapters = root / "adapters"
    good = adapters / "good"
    lt.save_adapter(_adapter_state(root / "models" / "gpt2"), good)
    weights = (good / "adapter_model.safetensors").read_bytes()
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name: str, blob: bytes | None = None, **config_changes) -> Path:
        folder = adapters / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}, indent=2))
        if blob is not None:
            (folder / "adapter_model.safetensors").write_bytes(blob)
        return folder

    variant("truncated", weights[: len(weights) // 2])
    variant("empty_weights", b"")
    variant("huge_header", struct.pack("<Q", 2**60) + b"{}")
    variant("header_not_json", struct.pack("<Q", 16) + b"not json at all!" + b"\0" * 16)
    header = json.dumps({"x": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 1024 * 1024]}}).encode()
    variant("offsets_past_end", struct.pack("<Q", len(header)) + header + b"\0" * 64)
    variant("weights_missing")
    variant("r_disagrees", weights, r=8)

    tensors = {**_load(good)}
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    variant("wrong_shapes", _safetensors({**tensors, key: torch.zeros(4, 7)}))
    stray = "base_model.model.transformer.wte.lora_A.weight"
    variant("extra_tensor", _safetensors({**tensors, stray: torch.zeros(4, 4)}))
    variant("missing_tensor", _safetensors({k: v for k, v in tensors.items() if k != key}))
    poisoned = tensors[key].clone()
    poisoned[0, 0] = float("nan")
    variant("non_finite", _safetensors({**tensors, key: poisoned}))

    from transformers import AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(root / "models" / "bert")
    lt.add_adapter(bert, lt.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    lt.save_adapter(bert, adapters / "other_architecture")
    causal = adapters / "causal_for_classifier"  # a causal-LM adapter given to a classification run
    shutil.copytree(adapters / "other_architecture", causal)
    causal_config = json.loads((causal / "adapter_config.json").read_text())
    (causal / "adapter_config.json").write_text(json.dumps({**causal_config, "task_type": "CAUSAL_LM"}))

    pickled = variant("pickle_only")
    torch.save({"weights": Payload(marker)}, pickled / "adapter_model.bin")


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def _models(root: Path, marker: Path) -> None:
    models, gpt2 = root / "models", root / "models" / "gpt2"

    def copy(name: str, drop: tuple[str, ...] = ()) -> Path:
        folder = models / name
        shutil.copytree(gpt2, folder, dirs_exist_ok=True)
        for item in drop:
            (folder / item).unlink()
        return folder

    for item in gpt2.iterdir():  # no_config holds everything but config.json
        if item.name != "config.json":
            shutil.copy(item, models / "no_config" / item.name)
    copy("no_weights", drop=("model.safetensors",))
    corrupt = copy("corrupt_weights")
    blob = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(blob[: len(blob) // 3])

    remote = copy("auto_map")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="evil-gpt2", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import GPT2Config as EvilConfig, GPT2LMHeadModel as EvilModel\n")

    pickled = copy("pickle_only", drop=("model.safetensors",))
    torch.save({"transformer.wte.weight": Payload(marker)}, pickled / "pytorch_model.bin")

    (models / "text.gguf").write_text("this is not a GGUF file\n")
    (models / "truncated.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 2**40))
    (models / "weights.safetensors").write_bytes(b"\0" * 16)


def _runs(root: Path) -> None:
    """Output folders of earlier runs, for --resume: none, one from another config, one with a tampered state."""
    import loratune as lt
    from loratune.train import load_config

    runs = root / "runs"
    (runs / "empty").mkdir(parents=True)
    other = load_config(root / "configs" / "base.yaml").model_dump(mode="json")
    other["train"]["max_steps"] = 3
    for name, config_change in (("other_config", other), ("tampered", None)):
        step = runs / name / "checkpoints" / "step-2"
        model = _adapter_state(root / "models" / "gpt2", targets=("c_attn", "c_fc"))
        lt.save_adapter(model, step)
        (step / "checkpoint.json").write_text(json.dumps({"step": 2}) + "\n")
        if config_change is None:
            torch.save({"optimizer": Payload(root / MARKER_NAME)}, step / "trainer_state.pt")
        else:
            torch.save({"config": config_change, "optimizer": {}, "scheduler": {}, "state": {}, "rng": {}},
                       step / "trainer_state.pt")
