"""`python -m benchmarks scale` on a tiny Llama shape: one base per child, and the three bases interleaved."""

import math

from benchmarks import scale

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=False)


def spec(**extra) -> dict:
    return {"shape": TINY, "quantize": "nf4", "tokens": 32, "steps": 3, "precision": "bf16", "threads": 1,
            "checkpointing": False, **extra}


def test_one_base_per_child_reports_speed_memory_and_a_finite_loss():
    row = scale.child(spec())
    assert row["tokens_per_s"] == 32 / row["step_s"] and row["step_range"][0] <= row["step_s"] <= row["step_range"][1]
    assert row["built_rss"] >= row["start_rss"] > 0
    assert math.isfinite(row["loss"]) and 4.0 < row["loss"] < 7.0  # random weights: about ln(256) = 5.5


def test_interleaved_bases_each_train_and_read_as_ratios_to_plain():
    runs = scale.child(spec(bases=["none", "nf4", "int8"]))["interleaved"]
    assert set(runs) == {"none", "nf4", "int8"} and all(r["tokens_per_s"] > 0 for r in runs.values())
    line = scale.interleaved_line({"size": "tiny", "interleaved": runs})
    plain, nf4, int8 = (runs[b]["tokens_per_s"] for b in ("none", "nf4", "int8"))
    assert line == f"| tiny | {plain:.1f} | {nf4:.1f} ({nf4 / plain:.2f}x) | {int8:.1f} ({int8 / plain:.2f}x) |"
    assert "not run" in scale.interleaved_line({"size": "7b", "interleaved": None})
