"""`python -m benchmarks scale` on a tiny Llama shape, in child processes as the benchmark runs them: one base
per child, and the bases interleaved; the pairing decision with the children faked."""

import math

from benchmarks import scale

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=False)


def spec(**extra) -> dict:
    return {"shape": TINY, "quantize": "nf4", "tokens": 32, "steps": 3, "precision": "bf16", "threads": 1,
            "checkpointing": False, **extra}


def test_one_base_per_child_reports_speed_memory_and_a_finite_loss():
    row = scale.run_spec(spec(), timeout=300)
    assert "error" not in row, row
    assert math.isclose(row["tokens_per_s"], 32 / row["step_s"])
    assert row["step_range"][0] <= row["step_s"] <= row["step_range"][1]
    assert row["peak_rss"] >= row["built_rss"] >= row["start_rss"] > 0
    assert math.isfinite(row["loss"]) and 4.0 < row["loss"] < 7.0  # random weights: about ln(256) = 5.5


def test_interleaved_bases_each_train_and_read_as_ratios_to_plain():
    runs = scale.run_spec(spec(bases=["none", "nf4", "int8"]), timeout=300)["interleaved"]
    assert set(runs) == {"none", "nf4", "int8"} and all(r["tokens_per_s"] > 0 for r in runs.values())
    plain, nf4, int8 = (runs[b]["tokens_per_s"] for b in ("none", "nf4", "int8"))
    line = scale.interleaved_line({"size": "tiny", "pairs": [runs]})
    assert line == f"| tiny | {plain:.1f} | {nf4:.1f} ({nf4 / plain:.2f}x) | {int8:.1f} ({int8 / plain:.2f}x) |"
    assert "not run" in scale.interleaved_line({"size": "7b", "pairs": []})
    assert scale.interleaved_line({"size": "3b", "pairs": [{"error": "timed out after 60 s"}]}) == (
        "| 3b | timed out after 60 s | | |")


def test_where_the_three_bases_do_not_fit_each_quantized_one_runs_beside_the_plain_one(monkeypatch):
    specs = []

    def fake_run(spec, timeout):
        specs.append(spec["bases"])
        return {"interleaved": {b: {"tokens_per_s": 10.0 if b == "none" else 8.0} for b in spec["bases"]}}

    monkeypatch.setattr(scale, "run_spec", fake_run)
    rows = [{"size": "3b", "quantize": q, "start_rss": 0, "peak_rss": gb * 10**9, "checkpointing": False}
            for q, gb in (("none", 10), ("nf4", 6), ("int8", 7))]
    args = type("Args", (), {"tokens": 32, "steps": 2, "threads": 1, "timeout": 60})()

    def interleave(available_gb):
        return scale.interleaved("3b", rows, args, available=available_gb * 10**9, precision="bf16")

    row = interleave(23)  # 10 + 6 + 7 GB > 85% of 23; each pair fits
    assert specs == [["none", "nf4"], ["none", "int8"]]
    assert scale.interleaved_line(row) == "| 3b | 10.0 / 10.0 | 8.0 (0.80x) | 8.0 (0.80x) |"
    specs.clear()
    assert interleave(30)["pairs"] and specs == [["none", "nf4", "int8"]]
    specs.clear()
    assert interleave(12) == {"size": "3b", "pairs": []} and not specs
    rows[1] = {**rows[1], "checkpointing": True}  # a base that needed checkpointing is not compared without it
    assert interleave(30) == {"size": "3b", "pairs": []} and not specs
    rows[0] = {"size": "3b", "quantize": "none", "error": "not run: estimate 20.1 GB of 23.0 GB"}
    assert interleave(30) == {"size": "3b", "pairs": []} and not specs


def test_a_rate_the_cpu_does_not_have_natively_reads_as_a_dash():
    row = {"size": "135m", "quantize": "nf4", "checkpointing": False, "tokens": 512, "step_range": [2.0, 4.0],
           "tokens_per_s": 200.0, "gflops": 80.0, "pct_fp32": 50.0, "pct_int8": 2.5, "peak_rss": 2e9,
           "start_rss": 1e9, "estimate": 1.1e9, "vs_plain": 0.9}
    assert scale.table_line(row) == ("| 135m | nf4 | off | 200.0 (128.0-256.0) | 0.90x | 80.0 | 50.0 / - / 2.5% | "
                                     "2.00 | 1.00 / 1.10 (+10%) |")


def test_a_plain_base_the_estimate_keeps_in_bf16_is_widened_as_a_run_widens_it():
    import torch

    from loratune.quant.widen import WidenedLinear

    model, _ = scale.prepared(spec(quantize="none", precision="fp32", widened=True), "none")
    widened = [m for m in model.modules() if isinstance(m, WidenedLinear)]
    assert len(widened) == 2 * 7 and all(m.weight.dtype == torch.bfloat16 for m in widened)
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    plain, _ = scale.prepared(spec(quantize="none", precision="fp32"), "none")
    assert not any(isinstance(m, WidenedLinear) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
