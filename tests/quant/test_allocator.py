"""Bounded kernel caches: oneDNN's per-shape kernels (bf16 products) are capped before any model runs, unless
the user set the capacities."""

import os
import subprocess
import sys

from loratune.quant.allocator import KERNEL_CACHE_CAPACITY

READ = ("import os, loratune.pretrained; "
        "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")


def _capacities(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    done = subprocess.run([sys.executable, "-c", READ], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.split()


def test_loading_code_caps_both_kernel_caches_and_leaves_a_users_setting():
    assert _capacities() == [str(KERNEL_CACHE_CAPACITY)] * 2
    assert _capacities(LRU_CACHE_CAPACITY="1024") == [str(KERNEL_CACHE_CAPACITY), "1024"]
