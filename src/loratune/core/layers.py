"""LoRA layers: a frozen `base_layer` plus, per adapter name, low-rank factors A (r x in) and B (out x r).

    forward(x) = base_layer(x) + sum over active, unmerged adapters of scaling * B(A(dropout(x)))

Attribute names (`lora_A.<name>.weight`, `lora_magnitude_vector.<name>`, ...) are chosen so that a
state-dict key with the adapter name removed is exactly PEFT's key: saving is a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loratune.core.errors import AdapterNameError, MergeError, TargetError
from loratune.core.lora_branch import add_lora_branch, fusable, lora_linear
from loratune.core.shared_input import group_of, observe, shares

try:  # GPT-2 style layer with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the core
    Conv1D = ()
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, *((Conv1D,) if Conv1D else ()))

FUSE_BASE = True  # (a switch for measuring)
QUANTIZED_MERGE = ("cannot merge into a quantized base weight in place; use loratune.quant.merge_quantized, which "
                   "dequantizes, adds the update and keeps full precision or requantizes")


class LoraLayer(nn.Module):
    """Common state of every LoRA layer; subclasses define the factors, the delta and the forward."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        # Mixed batches: (row index into stacked factors, stacked A, stacked B with scaling folded in).
        self.row_plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # --- to be provided by subclasses ---------------------------------------------------------------------
    def create(self, name: str, rank: int, scaling: float, dropout: float, init: bool | str) -> None:
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as 2-D matrices, A (r x in), B (out x r), so that delta = scaling * B @ A in (out, in)."""
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's parameters keyed by PEFT's relative key (adapter name removed)."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Drop every per-adapter entry (factors, dropout, magnitudes) held under `name`."""
        for container in self.children():
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and name in container:
                del container[name]
        self.scaling.pop(name)
        self.active = [n for n in self.active if n != name]

    def to_weight_layout(self, delta_oi: torch.Tensor) -> torch.Tensor:
        """Turn an (out, in) matrix into the shape and orientation of `base_layer.weight`."""
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads `layer.weight` (e.g. T5's dtype check)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def adapters(self) -> list[str]:
        return list(self.scaling)

    def rank(self, name: str) -> int:
        return self.factors(name)[0].shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped like the base weight."""
        a, b = self.factors(name)
        return self.to_weight_layout(self.scaling[name] * (b.float() @ a.float()))

    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """Base weight (fp32) with one adapter folded in."""
        return weight + self.delta_weight(name).to(weight.device)

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return weight - self.delta_weight(name).to(weight.device)

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Fold adapters into the base weight, in fp32, then cast back to the weight's dtype."""
        names = [n for n in names if n in self.scaling and n not in self.merged]
        if not names:
            return
        if is_quantized(self.base_layer):
            raise MergeError(QUANTIZED_MERGE)
        weight = self.base_layer.weight
        new = weight.detach().float()
        for name in names:
            new = self.merged_weight(new, name)
        new = new.to(weight.dtype)  # check after the cast: fp16 overflows there
        if safe and not torch.isfinite(new).all():
            raise MergeError(f"merging adapter(s) {names} gives non-finite weights; nothing was merged")
        with torch.no_grad():
            weight.copy_(new)
        self.merged.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        new = weight.detach().float()
        for name in reversed(self.merged):
            new = self.unmerged_weight(new, name)
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
        self.merged.clear()

    def add_dropout(self, name: str, p: float) -> None:
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def pending(self) -> list[str]:
        """Active adapters whose update is not already in the base weight."""
        if self.disabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def set_row_plan(self, row_index: torch.Tensor, names: list[str]) -> None:
        """Stack every named adapter's factors (zero-padded to the largest rank) for a mixed batch.

        Slot 0 is all zeros, for rows without an adapter; slot i+1 holds `names[i]`, or zeros where this
        layer does not have that adapter.
        """
        device = module_device(self.base_layer)
        present = [self.factors(n) if n in self.scaling else None for n in names]
        max_rank = max([f[0].shape[0] for f in present if f is not None], default=1)
        out_dim, in_dim = self.to_oi_shape()
        a_stack = torch.zeros((len(names) + 1, max_rank, in_dim), device=device)
        b_stack = torch.zeros((len(names) + 1, out_dim, max_rank), device=device)
        for slot, (name, pair) in enumerate(zip(names, present), start=1):
            if pair is not None and name not in self.merged:
                a, b = pair
                a_stack[slot, : a.shape[0]] = a.detach().float()
                b_stack[slot, :, : a.shape[0]] = b.detach().float() * self.scaling[name]
        self.row_plan = (row_index.to(device), a_stack, b_stack)

    def to_oi_shape(self) -> tuple[int, int]:
        a, b = self.factors(self.adapters[0])
        return b.shape[0], a.shape[1]


def module_device(module: nn.Module) -> torch.device:
    """Where a layer's tensors live, without reading `.weight` (a quantized layer would dequantize it)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def is_quantized(module: nn.Module) -> bool:
    """A base layer stored in a quantized format (see `loratune.quant`): frozen, and merged only by
    `merge_quantized`."""
    return getattr(module, "quantized", False) is True


def check_rows(rows: torch.Tensor, x: torch.Tensor) -> None:
    if rows.shape[0] != x.shape[0]:
        raise AdapterNameError(f"mixed_adapter_batch names {rows.shape[0]} rows but the batch has {x.shape[0]}")


def lora_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LoRA branch's input: under autocast the matmuls choose their dtype, so a cast would be a wasted
    copy; otherwise match the adapter weights (fp32 by default, whatever the base dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would do more than its class's forward: hooks of its own or for every module,
    or a forward set on the instance (as an offloading wrapper does)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in vars(module)
                or any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS))


def _input_hooked(module: nn.Module) -> bool:
    """Whether a hook may hand `module` another input than its group's (a pre-hook, or a backward hook's
    wrapping)."""
    return bool(module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _init_factors(a: torch.Tensor, b: torch.Tensor, init: bool | str, rank: int) -> None:
    """PEFT's defaults: A Kaiming-uniform and B zero, so a new adapter leaves outputs unchanged."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:  # random B too: a non-identity adapter, for tests
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)


class LoraLinear(LoraLayer):
    """LoRA for `nn.Linear` and transformers' `Conv1D` (whose weight is stored transposed, in x out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.transposed = isinstance(base_layer, Conv1D)
        self.dora_norm: dict[str, torch.Tensor] = {}

    def replace_base_layer(self, layer: nn.Module) -> None:
        """Put `layer` under the adapters in place of the current base (e.g. its quantized copy); the new
        layer's weight is read as stored: (in, out) for a `Conv1D`, (out, in) for anything else."""
        self.base_layer = layer
        self.transposed = isinstance(layer, Conv1D)

    def base_weight_oi(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.t() if self.transposed else weight

    def to_oi_shape(self) -> tuple[int, int]:
        in_dim, out_dim = layer_dims(self.base_layer)
        return out_dim, in_dim

    def set_base_weight_oi(self, weight_oi: torch.Tensor) -> None:
        """Overwrite the base weight with an (out, in) matrix, in the base layer's own storage."""
        if is_quantized(self.base_layer):
            self.base_layer.store(weight_oi)
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self.to_weight_layout(weight_oi).to(self.base_layer.weight.dtype))

    def create(self, name: str, rank: int, scaling: float, dropout: float, init: bool | str) -> None:
        out_dim, in_dim = self.to_oi_shape()
        device = module_device(self.base_layer)
        self.lora_A[name] = nn.Linear(in_dim, rank, bias=False, device=device)
        self.lora_B[name] = nn.Linear(rank, out_dim, bias=False, device=device)
        self.scaling[name] = scaling
        self.add_dropout(name, dropout)
        if init == "pissa":
            self._init_pissa(name, rank)
        else:
            _init_factors(self.lora_A[name].weight, self.lora_B[name].weight, init, rank)

    def _init_pissa(self, name: str, rank: int) -> None:
        """PiSSA: the adapter starts as the top-r singular directions of W; the base keeps the residual."""
        weight = self.base_weight_oi().detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[:rank] / self.scaling[name])
        a = root[:, None] * vh[:rank]
        b = u[:, :rank] * root[None, :]
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a)
            self.lora_B[name].weight.copy_(b)
        self.set_base_weight_oi(weight - self.scaling[name] * b @ a)

    def enable_dora(self, name: str) -> None:
        """DoRA: a learned per-output magnitude, initialised to the row norms of W + delta."""
        norm = self._weight_norm(self.base_weight_oi().float(), name)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.clone())

    @torch.no_grad()
    def _weight_norm(self, weight_oi: torch.Tensor, name: str) -> torch.Tensor:
        """Row norms of W + scaling * B @ A; DoRA treats them as constants (no gradient)."""
        return torch.linalg.norm(weight_oi + self.scaling[name] * self._delta_oi(name), dim=1)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        tensors = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return tensors

    def to_weight_layout(self, delta_oi: torch.Tensor) -> torch.Tensor:
        return delta_oi.t() if self.transposed else delta_oi

    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().merged_weight(weight, name)
        weight_oi = weight.t() if self.transposed else weight
        norm = self._weight_norm(weight_oi, name)
        self.dora_norm[name] = norm
        scale = (self.lora_magnitude_vector[name].detach().float() / norm)[:, None]
        return self.to_weight_layout(scale * (weight_oi + self.scaling[name] * self._delta_oi(name)))

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().unmerged_weight(weight, name)
        weight_oi = weight.t() if self.transposed else weight
        scale = (self.lora_magnitude_vector[name].detach().float() / self.dora_norm.pop(name))[:, None]
        return self.to_weight_layout(weight_oi / scale - self.scaling[name] * self._delta_oi(name))

    def _delta_oi(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return b.detach().float() @ a.detach().float()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = self._fused_forward(x) if not (args or kwargs) else None
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        if self.row_plan is not None:
            return result + self._mixed_batch_delta(x).to(result.dtype)
        for name in self.pending():
            lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            if name in self.lora_magnitude_vector:
                h = dropout(lora_input(x, lora_a.weight))
                result = result + self._dora_delta(h, result, name).to(result.dtype)
            else:
                p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
                result = add_lora_branch(result, x, lora_a.weight, lora_b.weight, self.scaling[name], p)
        return result

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base layer and its one pending adapter as one node (`lora_linear`), with the other layers that
        read `x` where they form a group (`shared_input`), where that computes the same: a plain frozen
        `nn.Linear` or `Conv1D` without hooks, no mixed batch, no DoRA; else None."""
        sharing = shares(x)
        group = group_of(self) if sharing else None
        if group is not None:
            kept = group.take(self, x)
            if kept is not None:
                return kept
        parts = self._node_parts(x)
        if parts is None:
            return None
        group = group_of(self) if sharing else None
        members = group.members if group is not None and parts[-1] == 0.0 else []
        if members and members[0] is self:  # the member called first runs them all
            every = [m._node_parts(x) if m is not self else parts for m in members]
            if all(m is not None and m[-1] == 0.0 for m in every) and not any(map(_input_hooked, members)):
                return group.run(self, x, members, [m[:-1] for m in every])
        out = lora_linear(x, *parts[:4], parts[4], parts[-1], transposed=parts[5])
        if sharing:
            observe(self, x)
        return out

    def _node_parts(self, x: torch.Tensor) -> tuple | None:
        """(weight, bias, A, B, scaling, transposed, dropout probability) where this layer can run as one node
        on `x`, else None."""
        base = self.base_layer
        if FUSE_BASE is False or self.row_plan is not None or type(base) not in LINEAR_TYPES or _hooked(base):
            return None
        pending = self.pending()
        if len(pending) != 1 or pending[0] in self.lora_magnitude_vector:
            return None
        name = pending[0]
        weight, bias, a, b = base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight
        if not fusable(x, weight, bias, a, b):
            return None
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return weight, bias, a, b, self.scaling[name], self.transposed, p

    def _dora_delta(self, h: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """m/||W + sBA|| * (W h + s B A h) - W x, with the norm detached as in the DoRA paper."""
        weight_oi = self.base_weight_oi()
        norm = self._weight_norm(weight_oi.float(), name)
        scale = self.lora_magnitude_vector[name] / norm
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = (result - bias if bias is not None else result).to(h.dtype)
        else:
            base = F.linear(h, weight_oi.to(h.dtype))
        lora = self.lora_B[name](self.lora_A[name](h)) * self.scaling[name]
        return (scale - 1) * base + scale * lora

    def _mixed_batch_delta(self, x: torch.Tensor) -> torch.Tensor:
        rows, a_stack, b_stack = self.row_plan
        check_rows(rows, x)
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_stack.dtype)
        h = torch.bmm(flat, a_stack[rows].transpose(1, 2))
        out = torch.bmm(h, b_stack[rows].transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class LoraEmbedding(LoraLayer):
    """LoRA for `nn.Embedding`: A (r x vocab) is looked up like an embedding table, then B maps r -> dim."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create(self, name: str, rank: int, scaling: float, dropout: float, init: bool | str) -> None:
        if init == "pissa":
            raise TargetError("init_lora_weights='pissa' supports Linear and Conv1D layers, not nn.Embedding")
        vocab, dim = self.base_layer.weight.shape
        device = self.base_layer.weight.device
        a = nn.Parameter(torch.empty(rank, vocab, device=device))
        b = nn.Parameter(torch.empty(dim, rank, device=device))
        with torch.no_grad():  # PEFT's embedding init: A zero, B normal (the product is zero either way)
            if init is False:
                nn.init.normal_(a)
            else:
                nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = a
        self.lora_embedding_B[name] = b
        self.scaling[name] = scaling
        self.add_dropout(name, dropout)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def to_weight_layout(self, delta_oi: torch.Tensor) -> torch.Tensor:
        return delta_oi.t()

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_plan is not None:
            rows, a_stack, b_stack = self.row_plan
            check_rows(rows, x)
            flat = x.reshape(x.shape[0], -1)
            h = a_stack.transpose(1, 2)[rows[:, None], flat]  # (batch, tokens, r)
            out = torch.bmm(h, b_stack[rows].transpose(1, 2))
            return result + out.reshape(*x.shape, -1).to(result.dtype)
        for name in self.pending():
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            result = result + (self._lookup(x, a.t()) @ b.t() * self.scaling[name]).to(result.dtype)
        return result


class LoraConv(LoraLayer):
    """LoRA for `nn.Conv1d`/`nn.Conv2d`: A is a conv with the base kernel and r channels, B a 1x1 conv."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise TargetError(f"grouped convolutions (groups={base_layer.groups}) are not supported by LoRA here")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create(self, name: str, rank: int, scaling: float, dropout: float, init: bool | str) -> None:
        if init == "pissa":
            raise TargetError("init_lora_weights='pissa' supports Linear and Conv1D layers, not convolutions")
        base = self.base_layer
        conv = type(base)
        device = base.weight.device
        self.lora_A[name] = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                 base.dilation, bias=False, device=device)
        self.lora_B[name] = conv(rank, base.out_channels, 1, 1, bias=False, device=device)
        self.scaling[name] = scaling
        self.add_dropout(name, dropout)
        _init_factors(self.lora_A[name].weight, self.lora_B[name].weight, init, rank)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def to_weight_layout(self, delta_oi: torch.Tensor) -> torch.Tensor:
        return delta_oi.reshape(self.base_layer.weight.shape)

    def set_row_plan(self, row_index: torch.Tensor, names: list[str]) -> None:
        raise TargetError("mixed-adapter batches support Linear, Conv1D and Embedding layers, not convolutions")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.pending():
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](lora_input(x, lora_a.weight))
            result = result + (lora_b(lora_a(h)) * self.scaling[name]).to(result.dtype)
        return result


LAYER_TYPES: tuple[tuple[type, type[LoraLayer]], ...] = (
    (nn.Linear, LoraLinear),
    *(((Conv1D, LoraLinear),) if Conv1D else ()),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv1d, LoraConv),
    (nn.Conv2d, LoraConv),
)


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    for base_type, lora_type in LAYER_TYPES:
        if type(module) is base_type or isinstance(module, base_type):
            return lora_type
    return None


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a layer LoRA can wrap, for rank checks."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    weight = module.weight  # Conv1D
    return weight.shape[0], weight.shape[1]


class ModulesToSave(nn.Module):
    """A module trained in full (e.g. a classifier head): the original stays untouched, each adapter owns a copy."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. `.weight` read by model code: answer for the module in use
            return getattr(self.current(), name)
