"""A quantized base loaded for FSDP2 as each rank's shard only (`load_model(..., shard=(rank, world))`): each
rank keeps 1/world of the blocks' quantized codes and scales from the start, the sharded model equals one
loaded whole and then sharded, and a run through it equals today's whole-load run (gloo, tiny Llama)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratune
from loratune.errors import QuantizationError
from loratune.pretrained import load_model
from loratune.quant.convert import transformer_blocks
from loratune.quant.linear import QuantLinear

SRC = str(Path(loratune.__file__).resolve().parents[1])


def quantized_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's shardable tensors (codes and scales), by name."""
    return {f"{path}.{key}": getattr(layer, key) for path, layer in model.named_modules()
            if isinstance(layer, QuantLinear) for key in layer.shardable()}


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_each_rank_loads_its_rows_of_the_quantized_blocks(tiny_llama, quantize):
    """The ranks' rows, joined in rank order, are the whole load's tensors; each rank holds about half the bytes,
    and a layer holding only its rows refuses to run."""
    whole = quantized_tensors(load_model(tiny_llama, "causal-lm", quantize=quantize)[0])
    ranks = [load_model(tiny_llama, "causal-lm", quantize=quantize, shard=(rank, 2))[0] for rank in (0, 1)]
    parts = [quantized_tensors(model) for model in ranks]
    assert whole and all(part.keys() == whole.keys() for part in parts)
    blocks = tuple(f"{path}." for path in transformer_blocks(ranks[0]))
    assert all(name.startswith(blocks) for name in whole)  # every quantized layer of a Llama is in a block
    for name, tensor in whole.items():
        assert torch.equal(torch.cat([parts[0][name], parts[1][name]]), tensor), name
    size = sum(t.numel() * t.element_size() for t in whole.values())
    held = [sum(t.numel() * t.element_size() for t in part.values()) for part in parts]
    assert sum(held) == size and max(held) <= 0.51 * size, (held, size)
    layer = next(m for m in ranks[0].modules() if isinstance(m, QuantLinear))
    with pytest.raises(QuantizationError, match="holds only this process's rows"):
        layer(torch.randn(1, layer.in_features))


# Under torchrun (2 ranks): a tiny Llama loaded whole and loaded as shards, both given the same adapter and
# sharded with FSDP2, hold the same local tensors and give the same forward and adapter gradients; each rank's
# quantized tensors are half the whole before and after sharding, and again between forward and backward. Then
# `fit` with the shard loader and with the whole load (today's path) train the same adapter. One JSON line a rank.
SCRIPT = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor
from loratune.core.adapters import add_adapter
from loratune.core.lora_config import LoraConfig
from loratune.pretrained import load_model
from loratune.quant.linear import QuantLinear
from loratune.train import fit, session
from loratune.train.distributed import shard_blocks
from loratune.train.run_config import validate_config

folder, job = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
local = lambda t: t.to_local() if isinstance(t, DTensor) else t

def quantized_bytes(model):
    return sum(local(getattr(m, k)).numel() * getattr(m, k).element_size() for m in model.modules()
               if isinstance(m, QuantLinear) for k in m.shardable())

def sharded(quantize, shard):
    model = load_model(folder, "causal-lm", quantize=quantize, shard=shard)[0]
    before = quantized_bytes(model)
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    shard_blocks(model, torch.device("cpu"))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    logits = model(input_ids=ids).logits
    resharded = all(isinstance(getattr(m, "data"), DTensor) for m in model.modules() if isinstance(m, QuantLinear))
    logits.square().mean().backward()
    grads = {n: local(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, before, logits.detach(), grads, resharded

calls = []
keep_shard = QuantLinear.keep_shard
QuantLinear.keep_shard = lambda self, *a: calls.append(1) or keep_shard(self, *a)
report = {}
for quantize in ("nf4", "int8"):
    whole, whole_bytes, whole_logits, whole_grads, _ = sharded(quantize, None)
    part, part_bytes, part_logits, part_grads, resharded = sharded(quantize, (rank, world))
    tensors = dict(whole.named_parameters())
    same = all(torch.equal(local(p), local(tensors[n])) for n, p in part.named_parameters())
    grad_diff = max((part_grads[n] - g).abs().max().item() for n, g in whole_grads.items())
    report[quantize] = {"whole_bytes": whole_bytes, "loaded_bytes": part_bytes, "held_bytes": quantized_bytes(part),
                        "same_shards": same, "logits_equal": torch.equal(part_logits, whole_logits),
                        "grad_diff": grad_diff, "resharded_after_forward": resharded}

data = yaml.safe_load((job / "run.yaml").read_text())
loaded = len(calls)
fit(validate_config({**data, "output_dir": str(job / "sharded")}, "test"), quiet=True)
report["keep_shard_calls_in_fit"] = len(calls) - loaded
session._weight_shard = lambda processes: None  # today's path: every rank loads the whole base, then shards
fit(validate_config({**data, "output_dir": str(job / "whole")}, "test"), quiet=True)
print(json.dumps({"rank": rank, **report}))
dist.destroy_process_group()
"""


def test_shard_loaded_fsdp_equals_whole_load_and_holds_half(tmp_path, tiny_llama, sentiment_file):
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": {"name": tiny_llama, "quantize": "nf4"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {"train": sentiment_file, "format": "classification", "prompt_template": "{text} sentiment :",
                 "completion_template": "{label}", "validation_fraction": 0.25, "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 0.01, "precision": "fp32", "eval_batch_size": 8,
                  "max_new_tokens": 2, "seed": 0, "checkpoint_every": 0, "distributed": "fsdp"}}), encoding="utf-8")
    (tmp_path / "check.py").write_text(SCRIPT, encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "check.py"), tiny_llama, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for quantize in ("nf4", "int8"):
        ranks = [r[quantize] for r in reports]
        whole = ranks[0]["whole_bytes"]
        assert all(r["whole_bytes"] == whole for r in ranks)
        # the loaded rows are what FSDP2 keeps (no second copy), half of the whole between the two ranks
        assert sum(r["loaded_bytes"] for r in ranks) == whole
        assert all(r["held_bytes"] == r["loaded_bytes"] <= 0.51 * whole for r in ranks), ranks
        assert all(r["same_shards"] and r["logits_equal"] and r["grad_diff"] <= 1e-6 for r in ranks), ranks
        assert all(r["resharded_after_forward"] for r in ranks)  # between forward and backward a rank holds 1/2
    assert all(r["keep_shard_calls_in_fit"] > 0 for r in reports)  # the run went through the shard loader
    adapters = [loratune_adapter(tmp_path / name) for name in ("sharded", "whole")]
    assert adapters[0].keys() == adapters[1].keys()
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) <= 1e-5
    losses = [train_losses(tmp_path / name) for name in ("sharded", "whole")]
    assert [s for s, _ in losses[0]] == [1, 2, 3]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]]
    assert [v for _, v in losses[0]] == pytest.approx([v for _, v in losses[1]], abs=1e-5)


def loratune_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
