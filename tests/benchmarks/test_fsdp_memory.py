"""`benchmarks.fsdp_memory` on a tiny model: the model folder it writes loads, and a 2-process FSDP2 run reports
both ranks' peak memory."""

from __future__ import annotations

import argparse
import json

from benchmarks.fsdp_memory import measure, table, write_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=600, tie_word_embeddings=False)


def test_a_tiny_run_reports_every_ranks_peak_memory(tmp_path):
    model = write_model(tmp_path / "model", TINY)
    files = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(files.values())) == ["model-0.safetensors", "model-1.safetensors", "model-rest.safetensors"]
    args = argparse.Namespace(tokens=32, steps=1, timeout=600, src=None)
    row = measure(model, "nf4", 2, args, tmp_path)
    assert "error" not in row, row
    assert len(row["peak_rss_mb"]) == 2 and all(100 < mb < 4000 for mb in row["peak_rss_mb"]), row
    assert json.loads((tmp_path / "nf4-2" / "run" / "metrics.json").read_text())["global_batch"]["processes"] == 2
    assert f"| nf4 | 2 | {row['peak_rss_mb'][0]}, {row['peak_rss_mb'][1]} |" in table([row])
