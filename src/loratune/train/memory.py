"""Estimate a training run's peak memory before any weight loads, so running out of memory is foreseen,
not discovered minutes into a load.

The estimate counts parameters exactly (on a `meta`-device copy of the model with the adapter added) and models
activations and logits with per-token formulas: the tensors autograd saves per layer (counted with saved-tensor
hooks: 2 (10 h + 4 i) bytes per token in bf16, 4 (4.5 h + 4 i) in fp32; 2 i where a gated MLP keeps two of its
intermediates and its product as a recipe, `saved_activations`), times the resident memory measured per saved byte
(which depends on the process's malloc: `RESIDENT_PER_SAVED`), plus a layer's backward buffers (`BACKWARD_BUFFERS`
elements per intermediate unit and token). Fitted on measured peaks of Llama-shaped runs (135M and smaller, plain /
NF4 / int8, with and without checkpointing, 128-1024 tokens; bf16 on an AMX CPU, fp32 on an AVX2 one) to within 15%
of the increment over the interpreter's baseline; `tests/train/test_memory_measured.py` checks it on child processes
(under the system malloc) and `python -m benchmarks scale` shows it beside each measured peak.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratune.allocator import active_malloc
from loratune.core.adapters import add_adapter, trainable_parameters
from loratune.precision import base_dtype, model_base_dtype, resolve_precision
from loratune.pretrained import model_skeleton, will_stream
from loratune.quant.convert import quantizable_layers
from loratune.quant.storage import bytes_per_weight
from loratune.quant.streaming import safetensors_files
from loratune.quant.widen import NARROW_DTYPES, widenable_layers
from loratune.tasks import TASK_TYPES
from loratune.train.methods import mark_method_trainable
from loratune.train.saved_activations import save_less
from loratune.train.step import split_lm

GB = 1e9
#: The Python process itself: torch, transformers, tokenizer and data, measured at about 0.5 GB here.
RUNTIME_BYTES = int(0.6 * GB)
ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two AdamW moments
#: The first step's kernel workspaces, thread pools and allocator arenas. 40 MB centred the estimate between the
#: increments measured on a busy machine (tests/train/test_memory_measured.py's runs: 199-278 MB) and on a quiet
#: one (161-269 MB, 30-45 MB less with checkpointing); since saved activations became recipes (2026-12-07, AVX2,
#: fp32) 40 MB put that test's runs at +4% to +16% (245-298 MB measured) and the scale table's 135M under glibc at
#: -10% to -3%, under jemalloc +3% to +6%: 25 MB centres the first two.
KERNEL_BYTES = int(0.025 * GB)
#: Resident bytes per byte of saved activations (allocator rounding, fragmentation), by `allocator.active_malloc()`.
#: glibc keeps freed blocks of a step's sizes in fragments; jemalloc's size classes reuse them. Refitted on
#: 2026-12-07 after the LoRA branch began adding into the base output in place (fewer output-sized blocks freed
#: per layer): jemalloc's on the scale table (135M and 360M, plain / NF4 / int8, fp32, 512 tokens), all six within
#: 0-4% of their measured increments; glibc's on the same 135M runs and test_memory_measured's model, -11% to +13%
#: (1.27 before, which now overshot that model by up to 17%).
RESIDENT_PER_SAVED = {"system": 1.15, "jemalloc": 0.9}
#: Saved activation elements per token and layer: SAVED_PER_HIDDEN[precision] h + 4 i (2 i in a gated MLP). Autocast
#: keeps a bf16 copy of each linear's input beside the fp32 tensors around it, where fp32 keeps the norms' outputs
#: as recipes (`saved_activations`), so bf16 saves more h-sized tensors than fp32. Counted in fp32 on 2026-12-07:
#: 5.5 h + 2 i at h = 512, 4.8 h + 2 i at h = 1024 (7.5 h + 3 i and 6.8 h + 3 i before the recipes, when this was 6).
SAVED_PER_HIDDEN = {"bf16": 10, "fp32": 4.5}
#: A layer's backward buffers: this many activation elements per intermediate unit and token. bf16 fitted on an
#: AMX CPU; fp32 on an AVX2 one (tests/train/test_memory_measured.py's runs: estimate / measured 0.96-1.08).
BACKWARD_BUFFERS = {"bf16": 24, "fp32": 18}
#: The same where plain frozen layers run as one node with their adapter, alone or with the layers reading the same
#: input (`core.lora_branch.lora_linear`, `core.shared_input`: fp32, a plain base), whose input gradients are summed
#: in place: fitted on 2026-12-08 (AVX2, fp32) to test_memory_measured's plain runs, 272-288 MB measured
#: where 18 put the estimate at +9% to +16%.
ONE_NODE_BACKWARD_BUFFERS = 7


@dataclass
class MemoryEstimate:
    """Bytes of each part of a run's peak, and a description of the run it was made for."""

    weights: int
    adapter: int
    activations: int
    logits: int
    runtime: int
    loading: int
    trainable: int
    setting: str
    workspace: int = 0  # kernel workspaces, and the quantized layers' buffers for one rebuilt weight

    @property
    def training(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits + self.workspace + self.runtime

    @property
    def peak(self) -> int:
        return max(self.training, self.loading)

    def lines(self, available: int | None) -> list[str]:
        have = f"; this machine has {available / GB:.1f} GB" if available else ""
        return [
            f"memory estimate ({self.setting}):",
            f"  frozen weights         {self.weights / GB:7.2f} GB",
            f"  adapter + optimizer    {self.adapter / GB:7.2f} GB ({self.trainable:,} trainable parameters)",
            f"  activations            {self.activations / GB:7.2f} GB",
            f"  logits and loss        {self.logits / GB:7.2f} GB",
            f"  kernel workspaces      {self.workspace / GB:7.2f} GB",
            f"  runtime                {self.runtime / GB:7.2f} GB",
            f"  peak while loading     {self.loading / GB:7.2f} GB",
            f"  peak while training    {self.training / GB:7.2f} GB{have}",
        ]


def frozen_dtype(config: Any, available: int | None) -> torch.dtype:
    """The frozen base's dtype on the CPU: `model.dtype` as `precision.model_base_dtype` resolves it, except
    that `auto` keeps a 16-bit checkpoint trained in fp32 in fp32 where the run's estimated peak with fp32
    weights fits in `available` bytes (with checkpointing only if `train.gradient_checkpointing` asks), or
    where the machine's memory is unknown, or with DoRA: widening each weight for its product cost 5-10% of a
    135M model's step (512 tokens, docs/benchmarks.md), so the 16-bit base is memory's choice, made before
    checkpointing (about 30%)."""
    spec = config.model
    if getattr(config, "method", "lora") != "lora":
        return torch.float32  # full fine-tuning and the probe load float32 weights (`methods.load_for_method`)
    precision = resolve_precision(config.train.precision, torch.device("cpu"))
    if spec.quantize != "none":  # the linear layers are stored quantized whatever the rest's dtype
        return base_dtype(spec.dtype, precision)
    if spec.dtype != "auto" or precision != "fp32":
        return model_base_dtype(spec.dtype, precision, spec.name)
    # DoRA's base product under dropout, and its weight norms, read whole fp32 copies of a widened weight
    if available is None or config.lora is None or config.lora.use_dora:
        return torch.float32
    chosen = model_base_dtype(spec.dtype, precision, spec.name)
    if chosen not in NARROW_DTYPES:
        return chosen
    full = estimate_memory(config, bool(config.train.gradient_checkpointing), storage=torch.float32).peak
    return torch.float32 if full <= available else chosen


def checkpointing_decision(config: Any, available: int | None,
                           storage: torch.dtype | None = None) -> tuple[bool, str]:
    """(gradient checkpointing on, why): `train.gradient_checkpointing` when set, else on only when the
    estimated training peak without it exceeds `available` bytes (the machine's memory), with the frozen
    weights in `storage` (default: as `frozen_dtype` decides)."""
    explicit = config.train.gradient_checkpointing
    if explicit is not None:
        return explicit, f"{'on' if explicit else 'off'} (train.gradient_checkpointing)"
    storage = storage or frozen_dtype(config, available)
    peak = estimate_memory(config, checkpointing=False, storage=storage).training
    if available is None:
        return False, "off (machine memory unknown)"
    need = peak > available
    verb = "exceeds" if need else "fits in"
    return need, (f"{'on' if need else 'off'} (estimated peak without it {peak / GB:.2f} GB {verb} this machine's "
                  f"{available / GB:.1f} GB)")


def estimate_memory(config: Any, checkpointing: bool | None = None,
                    storage: torch.dtype | None = None) -> MemoryEstimate:
    """Peak memory of `loratune train` with this `RunConfig` on the CPU (weights, adapter, activations), with
    the frozen weights' dtype and gradient checkpointing as given, else as `frozen_dtype` and
    `checkpointing_decision` decide on this machine."""
    storage = storage or frozen_dtype(config, machine_memory())
    if checkpointing is None:
        checkpointing = checkpointing_decision(config, machine_memory(), storage)[0]
    spec, tc = config.model, config.train
    precision = resolve_precision(tc.precision, torch.device("cpu"))
    activation_element = 2 if precision == "bf16" else 4
    method = getattr(config, "method", "lora")
    quantized = spec.quantize != "none"
    # a 16-bit base trained in fp32 is cast to fp32 but for its plain linear weights, kept in 16 bits (`quant.widen`)
    narrow = storage in NARROW_DTYPES and precision == "fp32" and method == "lora"
    widened = narrow and not quantized
    element = activation_element if narrow else torch.finfo(storage).bits // 8
    model = model_skeleton(spec.name, spec.task, trust_remote_code=spec.trust_remote_code)
    stored = quantizable_layers(model) if quantized else widenable_layers(model) if widened else {}
    sizes = [_numel(m) for m in stored.values()]
    linear = sum(sizes)
    per_linear_weight = bytes_per_weight(spec.quantize, spec.double_quant) if quantized else 2
    total = sum(p.numel() for p in model.parameters())
    if method == "lora":
        add_adapter(model, dataclasses.replace(  # PiSSA needs real weights; the size is the same
            config.lora, init_lora_weights=True, task_type=config.lora.task_type or TASK_TYPES[spec.task]))
    else:  # float32 weights; the trainable ones are counted with their gradient and moments below
        mark_method_trainable(model, method, spec.task)
        element = 4
    trainable = trainable_parameters(model).trainable
    less = save_less(model)  # as `session.prepare` does
    intermediates = 2 if less.gated_mlps else 4

    dense = (total - linear - (trainable if method != "lora" else 0)) * element
    weights = dense + int(linear * per_linear_weight)
    largest = max(p.numel() for p in model.parameters()) * 4
    streaming = will_stream(spec.name, spec.quantize, spec.loftq_iterations)
    if streaming:
        loading = RUNTIME_BYTES + weights + 2 * largest
    else:  # transformers maps the files while loading, and their pages count as resident
        loading = RUNTIME_BYTES + total * (2 if widened else element) + max(largest, _on_disk(spec.name))

    text = model.config.get_text_config()
    hidden = text.hidden_size
    layers = text.num_hidden_layers
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    tokens = tc.batch_size * config.data.max_length
    per_token_layer = activation_element * (SAVED_PER_HIDDEN[precision] * hidden + intermediates * inner)
    one_node = precision == "fp32" and method == "lora" and not quantized and not widened
    backward = (ONE_NODE_BACKWARD_BUFFERS if one_node else BACKWARD_BUFFERS[precision]) * activation_element * inner
    saved = layers * hidden * activation_element + per_token_layer if checkpointing else layers * per_token_layer
    activations = int(tokens * (resident_per_saved() * saved + backward))
    # a quantized or widened layer's weight is rebuilt into kept buffers: values in the compute dtype, and NF4's
    # indices
    rebuilt = max(sizes, default=0) * (activation_element + (1 if spec.quantize == "nf4" else 0))
    chunk = config.loss_chunk if spec.task == "causal-lm" and split_lm(model) is not None else 0  # as batch_loss
    vocab = getattr(text, "vocab_size", 0) if spec.task != "classification" else 0
    logits = min(tokens, chunk or tokens) * vocab * (activation_element + 8)
    kept = f" (linear weights {str(storage).removeprefix('torch.')})" if widened else ""
    setting = (f"{spec.name}, quantize {spec.quantize}, {precision}{kept}, batch {tc.batch_size} x "
               f"{config.data.max_length} tokens, gradient checkpointing {'on' if checkpointing else 'off'}")
    return MemoryEstimate(weights, trainable * ADAPTER_BYTES_PER_PARAM, activations, logits, RUNTIME_BYTES,
                          loading, trainable, setting, KERNEL_BYTES + rebuilt)


def resident_per_saved() -> float:
    """`RESIDENT_PER_SAVED` for this process's malloc; another library than jemalloc counts as glibc (the larger)."""
    return RESIDENT_PER_SAVED.get(active_malloc(), RESIDENT_PER_SAVED["system"])


def _on_disk(name: str) -> int:
    """Bytes of a local model folder's safetensors files (0 when unknown)."""
    folder = Path(name).expanduser()
    return sum(f.stat().st_size for f in safetensors_files(folder)) if folder.is_dir() else 0


def _numel(module: torch.nn.Module) -> int:
    base = getattr(module, "base_layer", module)
    return base.weight.numel()


def machine_memory() -> int | None:
    """Bytes this process may use: the smaller of physical memory and a cgroup limit, when known."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            limits.append(int(value))
    return min(limits) if limits else None


def memory_warning(estimate: MemoryEstimate, available: int | None) -> str | None:
    """A one-line warning when the estimated peak exceeds the machine's memory, else None."""
    if available is None or estimate.peak <= available:
        return None
    return (f"estimated peak memory {estimate.peak / GB:.1f} GB exceeds this machine's {available / GB:.1f} GB; "
            "consider model.quantize: nf4 or a smaller train.batch_size or data.max_length "
            "(see `loratune inspect --config ... --memory`)")
