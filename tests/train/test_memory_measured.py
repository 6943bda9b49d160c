"""The memory estimate against measured runs: a child process per run (plain, NF4 and int8 bases, with and
without gradient checkpointing) builds a small Llama-shaped model, trains two steps and reports its peak
RSS. What is compared is the training increment: the peak over the child's resident memory once torch,
transformers and loratune are imported, against the estimate less its interpreter baseline (`runtime`),
since the interpreter's own size depends on what else the process imported, not on the run."""

import pytest

from benchmarks.scale import estimate, machine_precision, run_spec

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False)
TOKENS = 512


# Without gradient checkpointing only: with it, the measured increment moved between 160 and 247 MB from one
# run to the next (estimate 175-200 MB), too wide for a 15% check to mean anything (docs/benchmarks.md).
@pytest.mark.parametrize("checkpointing", [False])
@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_the_estimate_is_within_15_percent_of_a_measured_training_increment(quantize, checkpointing, tmp_path):
    expected = estimate(SHAPE, quantize, TOKENS, checkpointing, tmp_path)
    spec = {"shape": SHAPE, "quantize": quantize, "checkpointing": checkpointing, "tokens": TOKENS, "steps": 2,
            "precision": machine_precision(), "threads": 1}
    measured = run_spec(spec, timeout=600)
    assert "error" not in measured, measured
    increment = measured["peak_rss"] - measured["start_rss"]
    predicted = expected.training - expected.runtime
    assert abs(predicted / increment - 1) < 0.15, (predicted, increment, expected)
