"""AdamW over the trainable parameters (LoRA+ option) and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, lora_plus_ratio: float) -> torch.optim.AdamW:
    """AdamW; with LoRA+ (`lora_plus_ratio` > 1) the B factors learn `ratio` times faster than A, which
    speeds up feature learning at no cost (Hayou et al., 2024)."""
    fast, normal = [], []
    for path, param in model.named_parameters():
        if param.requires_grad:
            is_b = ".lora_B." in path or ".lora_embedding_B." in path
            (fast if is_b else normal).append(param)
    groups = [{"params": normal, "lr": lr}]
    if fast:
        groups.append({"params": fast, "lr": lr * lora_plus_ratio})
    # torch's fused kernel: one pass per tensor instead of a dozen operations (a LoRA step's 420 small tensors:
    # 5.5 ms against 24 ms on a 2-core CPU); plain tensors on a CPU or GPU only (not sharded ones)
    fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in fast + normal)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step`: linear warmup, then cosine, linear or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                    schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule))
