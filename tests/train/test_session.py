"""How a session sets the model up: the attention kernel `auto` picks."""

import torch

from loratune.train.session import attention_for


def test_auto_attention_is_eager_only_where_a_cpu_computes_in_bf16():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_for("auto", cpu, "bf16") == "eager"
    assert attention_for("auto", cpu, "fp32") == "sdpa"
    assert attention_for("auto", cuda, "bf16") == "sdpa"
    assert attention_for("eager", cpu, "fp32") == "eager" and attention_for("sdpa", cpu, "bf16") == "sdpa"
    assert attention_for("auto", cpu, "fp32", has_sdpa=False) == "eager"  # a family without SDPA
