"""Do llama.cpp (through llama-cpp-python) and vLLM give loratune's answers for exported adapters?

`python -m benchmarks.runtimes` (what `make check-runtimes` runs). On a tiny random Llama and on SmolLM2-135M
with a freshly trained sentiment adapter: 20 prompts x 32 greedy tokens and the logits at each prompt's last
position, loratune (fp32, adapter unmerged) against llama.cpp on
- the merged GGUF (f32, f16, q8_0), and
- a base GGUF (f32) with the GGUF LoRA (f32, f16, q8_0) loaded beside it.
Token ids go in directly, so both sides see the same tokens. Exits non-zero when the f32 exports differ in any
greedy token or beyond the logit tolerance, or when an f16/q8_0 export misses the floors below.
The same f32/f16/q8_0 rows for a tiny random model of every family GGUF export supports (Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3, Phi-3 besides Llama), 20 chat conversations through llama.cpp's chat completion on the
merged SmolLM2 export (benchmarks/runtime_chat.py), and llama.cpp's own converter as the yardstick for the
merged SmolLM2 f16/q8_0 files (benchmarks/runtime_converter.py). SmolLM2's f16/q8_0 floor is 95% of greedy
choices when fed loratune's tokens (free-running too for a GGUF LoRA); a merged file must also agree within one
point of the converter's and equal its tensors byte for byte. Results: benchmarks/results/runtimes.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import loratune as lt  # noqa: E402
from benchmarks.common import machine, write_result  # noqa: E402
from benchmarks.runtime_chat import chat_failures, check_chat  # noqa: E402
from benchmarks.runtime_converter import DEFAULT_SOURCE, check_converter, converter_failures  # noqa: E402
from benchmarks.tiny_families import gguf_family_configs  # noqa: E402
from loratune.export import export, gguf_source  # noqa: E402
from loratune.export.gguf_model import write_model_gguf  # noqa: E402
from loratune.export.layout import layout_for  # noqa: E402
from loratune.pretrained import load_model  # noqa: E402

PROMPTS, NEW_TOKENS = 20, 32
#: largest |logit difference| allowed at the last prompt position for f32 exports (measured: see docs)
F32_LOGIT_TOLERANCE = 1e-3
MIN_LOW_PRECISION_AGREEMENT = 0.95

REVIEWS = ["A warm, funny film with a brilliant cast.", "Two hours of my life I will never get back.",
           "The plot made no sense and the acting was wooden.", "I laughed, I cried, I loved every minute.",
           "Beautifully shot but painfully slow.", "An instant classic; see it on the big screen.",
           "The sequel nobody asked for, and it shows.", "Sharp writing and a great soundtrack.",
           "Dull characters, predictable twists, awful ending.", "A gentle story told with real heart."]
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis briefly.",
             "List three uses of a paperclip.", "What does a compiler do?", "Give me a tip for better sleep.",
             "Why is the sky blue?", "Translate 'good morning' into Spanish.", "What is 12 times 7?",
             "Describe a cat in one sentence."]


def smollm2_prompts(tokenizer) -> list[list[int]]:
    texts = [f"Is this movie review positive or negative? Answer with one word.\n\nReview: {r}" for r in REVIEWS]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts + QUESTIONS]


def random_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(n),), generator=generator).tolist()
            for n in torch.randint(4, 16, (PROMPTS,), generator=generator)]


def torch_greedy(model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy tokens (no stop at EOS) and the logits at the prompt's last position."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        first = out.logits[0, -1].float().numpy()
        tokens, logits, past = [], out.logits[0, -1], out.past_key_values
        for _ in range(NEW_TOKENS):
            token = int(torch.argmax(logits))
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1], out.past_key_values
    return tokens, first


def llama_cpp_greedy(llm, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    tokens = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return tokens, first


def forced_argmax(llm, prompt: list[int], reference: list[int]) -> list[int]:
    """llama.cpp's greedy choice at each step when fed loratune's own tokens (no compounding of one difference)."""
    llm.reset()
    llm.eval(prompt + reference[:-1])
    return [int(np.argmax(llm.scores[len(prompt) - 1 + i])) for i in range(len(reference))]


def first_divergence(reference: list[int], candidate: list[int]) -> int | None:
    """The first generated position where the free-running tokens differ (None: identical)."""
    return next((i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b), None)


def compare(reference, candidate) -> dict:
    same = sum(a == b for ref, cand in zip(reference, candidate) for a, b in zip(ref[0], cand[0]))
    forced = sum(a == b for ref, cand in zip(reference, candidate) for a, b in zip(ref[0], cand[2]))
    diffs = [float(np.abs(ref[1] - cand[1]).max()) for ref, cand in zip(reference, candidate)]
    return {"token_agreement": same / (len(reference) * NEW_TOKENS),
            "forced_token_agreement": forced / (len(reference) * NEW_TOKENS),
            "prompts_identical": sum(ref[0] == cand[0] for ref, cand in zip(reference, candidate)),
            "max_abs_logit_diff": max(diffs), "median_abs_logit_diff": float(np.median(diffs)),
            "first_divergence": [first_divergence(ref[0], cand[0]) for ref, cand in zip(reference, candidate)]}


def without_extra_buffer_types() -> None:
    """Turn off llama.cpp's "extra buffer types" (AMX and repacked kernels) for every model loaded.

    The development machine's CPU advertises AMX, but AMX tile instructions fault in llama.cpp's worker threads
    there (SIGILL in ggml_backend_amx_mul_mat on q8_0 weights); the plain CPU kernels compute the same products.
    """
    from llama_cpp import llama_cpp as bindings

    default_params = bindings.llama_model_default_params

    def params():
        value = default_params()
        value.use_extra_bufts = False
        return value

    bindings.llama_model_default_params = params


def run_llama_cpp(path: Path, prompts, reference, lora: Path | None = None, kv_cache: str = "f32") -> list:
    """Greedy runs in llama.cpp; the KV cache is f32 so that only the exported weights' precision is measured
    (llama.cpp's default f16 cache is one more rounding, reported as its own row)."""
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

    cache_type = GGML_TYPE_F32 if kv_cache == "f32" else GGML_TYPE_F16
    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, n_batch=128, logits_all=True,
                n_threads=os.cpu_count(), seed=0, verbose=False, type_k=cache_type, type_v=cache_type)
    try:
        return [(*llama_cpp_greedy(llm, p), forced_argmax(llm, p, ref[0])) for p, ref in zip(prompts, reference)]
    finally:
        llm.close()


class LlamaCppGelu(torch.nn.Module):
    """GELU as llama.cpp's CPU backend computes it (GGML_GELU_FP16): the tanh GELU of the input rounded to f16,
    looked up in a table of f16 results; 0 at or below -10, the input itself at or above 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, table))


def as_llama_cpp_computes(model: torch.nn.Module) -> None:
    """Give a GELU family (Gemma) llama.cpp's f16-table GELU, so that the f32 rows measure the export alone:
    that table alone moves a tiny random Gemma's last-position logits by about 2.5e-3."""
    if getattr(model.config, "hidden_activation", None) == "gelu_pytorch_tanh":
        for module in model.modules():
            if hasattr(module, "act_fn"):
                module.act_fn = LlamaCppGelu()


def check_model(label: str, model_name: str, adapter: Path, prompts, work: Path, chat: bool = False,
                converter_source: Path | None = None) -> dict:
    base, tokenizer = load_model(model_name, "causal-lm")
    base_gguf = work / f"{label}-base-f32.gguf"
    write_model_gguf(base, tokenizer, layout_for(base.config), base_gguf, "f32", tokenizer_gguf=gguf_source(model_name))
    lt.load_adapter(base, adapter)
    base.eval()
    as_llama_cpp_computes(base)
    started = time.perf_counter()
    reference = [torch_greedy(base, p) for p in prompts]
    results = {"loratune_seconds": time.perf_counter() - started}
    for dtype in ("f32", "f16", "q8_0"):
        merged = work / f"{label}-merged-{dtype}.gguf"
        lora = work / f"{label}-lora-{dtype}.gguf"
        export(adapter, model_name, "gguf", merged, dtype)
        export(adapter, model_name, "gguf-lora", lora, dtype)
        for kind, path, outputs in (("merged", merged, run_llama_cpp(merged, prompts, reference)),
                                    ("base+lora", lora, run_llama_cpp(base_gguf, prompts, reference, lora=lora))):
            results[f"{kind} {dtype}"] = print_row(label, kind, dtype, compare(reference, outputs), path)
        if dtype == "f32":
            results["merged f32, f16 KV cache"] = row = compare(reference, run_llama_cpp(merged, prompts, reference,
                                                                                kv_cache="f16"))
            print(f"{label:8s} merged f32 with llama.cpp's default f16 KV cache: tokens {row['token_agreement']:7.2%}, "
                  f"logits max |diff| {row['max_abs_logit_diff']:.2e}", flush=True)
    if converter_source is not None:
        results["converter"] = check_converter(
            converter_source, adapter, model_name, lambda dtype: work / f"{label}-merged-{dtype}.gguf", work,
            lambda dtype, path: print_row(label, "converter", dtype,
                                          compare(reference, run_llama_cpp(path, prompts, reference)), path))
    if chat:
        results["chat"] = check_chat(base, tokenizer, work / f"{label}-merged-f32.gguf")
    return results


def print_row(label: str, kind: str, dtype: str, row: dict, path: Path) -> dict:
    """Print one llama.cpp agreement row; returns it with the file's size added."""
    diverged = ", ".join(f"{i}@{pos}" for i, pos in enumerate(row["first_divergence"]) if pos is not None)
    print(f"{label:8s} {kind:9s} {dtype:5s} tokens {row['token_agreement']:7.2%} "
          f"({row['prompts_identical']}/{len(row['first_divergence'])} prompts identical; "
          f"{row['forced_token_agreement']:.2%} fed loratune's tokens), last-position logits max "
          f"|diff| {row['max_abs_logit_diff']:.2e} (median {row['median_abs_logit_diff']:.2e}); "
          f"{path.stat().st_size / 1e6:.1f} MB; first divergence (prompt@token): {diverged or 'none'}", flush=True)
    return row | {"file_bytes": path.stat().st_size}


def family_configs() -> dict:
    """A 2-layer config of every family GGUF export supports (sizes shared, sliding windows past the prompts)."""
    configs = gguf_family_configs(hidden_size=64, max_positions=256, sliding_window=128, phi3_context=256,
                                  initializer_range=0.2)
    return {f"tiny-{family}": config for family, config in configs.items()}


def tiny_model(work: Path, tokenizer, label: str, config) -> tuple[str, Path]:
    """A 2-layer model of one family with SmolLM2's tokenizer, random weights (seed 0) and a random rank-8
    adapter (seed 1)."""
    from transformers import AutoModelForCausalLM

    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    # llama.cpp gives a GGUF whose name (the adapter's or model's folder) contains "phi3" Phi-3's special-token
    # rules, which fail to load ("unordered_map::at") on a vocabulary without Phi-3's tokens, like SmolLM2's here
    folder = work / label.replace("phi3", "phi-three")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lt.add_adapter(model, lt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    adapter = folder.with_name(folder.name + "-adapter")
    lt.save_adapter(model, adapter)
    return str(folder), adapter


def trained_adapter(work: Path, steps: int) -> tuple[Path, dict]:
    from loratune.train import demo_config, fit

    config = demo_config(work / "demo", [f"train.max_steps={steps}", "train.warmup_steps=3",
                                         "data.max_eval_records=32", "train.num_samples=0"])
    summary = fit(config, quiet=True)
    return work / "demo" / "adapter", summary


def vllm_check() -> dict:
    if not torch.cuda.is_available():
        message = "vLLM check skipped: vLLM serves on a CUDA GPU and this machine has none"
        print(message)
        return {"skipped": message}
    raise SystemExit("vLLM check: a GPU is present but the vLLM comparison is not written yet")


def failures(results: dict) -> list[str]:
    """f32 exports must match exactly (tokens) and closely (logits) on both models. The 95% floors for f16 and
    q8_0 apply to SmolLM2 with its trained adapter (a random tiny model's logits have near-ties everywhere, so
    its low-precision figures are reported, not judged): every such export at least 95% fed; a GGUF LoRA also
    95% free-running; a merged file, whose q8_0 products llama.cpp rounds to 8-bit activations too, as good
    as llama.cpp's own converter instead (runtime_converter.py). The chat check must agree in every conversation."""
    smollm2 = results.get("smollm2", {})
    problems = chat_failures(smollm2["chat"]) if "chat" in smollm2 else []
    problems += converter_failures("smollm2", smollm2) if "converter" in smollm2 else []
    for model in [key for key in results if key.startswith("tiny-")] + ["smollm2"]:
        for name, row in results.get(model, {}).items():
            if name in ("merged f32", "base+lora f32"):
                if row["token_agreement"] < 1 or row["max_abs_logit_diff"] > F32_LOGIT_TOLERANCE:
                    problems.append(f"{model} {name}: {row['token_agreement']:.2%} tokens, max |logit diff| "
                                    f"{row['max_abs_logit_diff']:.2e} (tolerance {F32_LOGIT_TOLERANCE})")
            elif model == "smollm2" and name.endswith(("f16", "q8_0")):
                problems += low_precision_failures(name, row)
    for dtype, row in smollm2.get("converter", {}).items():
        if isinstance(row, dict) and "forced_token_agreement" in row:
            problems += low_precision_failures(f"converter {dtype}", row)
    return problems


def low_precision_failures(name: str, row: dict) -> list[str]:
    """SmolLM2's f16/q8_0 floors: 95% fed for every export, 95% free-running for a GGUF LoRA."""
    problems = []
    if row["forced_token_agreement"] < MIN_LOW_PRECISION_AGREEMENT:
        problems.append(f"smollm2 {name}: {row['forced_token_agreement']:.2%} of greedy choices agree when fed "
                        "loratune's tokens (< 95%)")
    if name.startswith("base+lora") and row["token_agreement"] < MIN_LOW_PRECISION_AGREEMENT:
        problems.append(f"smollm2 {name}: {row['token_agreement']:.2%} of free-running greedy tokens agree (< 95%)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtimes", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of the SmolLM2 adapter (default 30)")
    parser.add_argument("--tiny-only", action="store_true", help="skip SmolLM2 (a quick smoke test)")
    parser.add_argument("--adapter", type=Path, help="a SmolLM2 adapter already trained (`loratune demo --set "
                        "train.max_steps=30` writes runs/demo/adapter) instead of training one")
    parser.add_argument("--llama-cpp-source", type=Path, default=DEFAULT_SOURCE,
                        help="llama-cpp-python's source distribution (.tar.gz, a folder holding it, or unpacked), "
                        f"whose convert_hf_to_gguf.py is the yardstick for SmolLM2's merged files (default "
                        f"{DEFAULT_SOURCE}, where `make check-runtimes` downloads it)")
    args = parser.parse_args(argv)
    import llama_cpp

    without_extra_buffer_types()
    torch.manual_seed(0)
    results: dict = {"machine": machine(), "llama_cpp_python": llama_cpp.__version__,
                     "torch_threads": torch.get_num_threads(), "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
                     "f32_logit_tolerance": F32_LOGIT_TOLERANCE}
    with tempfile.TemporaryDirectory(prefix="loratune-runtimes-") as folder:
        work = Path(folder)
        _, smol_tokenizer = load_model("smollm2-135m-instruct", "causal-lm")
        for label, config in family_configs().items():
            model_dir, adapter = tiny_model(work, smol_tokenizer, label, config)
            results[label] = check_model(label, model_dir, adapter, random_prompts(len(smol_tokenizer)), work)
        if not args.tiny_only:
            started = time.perf_counter()
            if args.adapter:
                adapter, about = args.adapter, {"given": str(args.adapter.resolve())}
            else:
                adapter, summary = trained_adapter(work, args.steps)
                about = {"steps": args.steps, "train_seconds": time.perf_counter() - started,
                         "accuracy_before": summary["before"].get("accuracy"),
                         "accuracy_after": summary["after"].get("accuracy")}
            results["smollm2"] = check_model("smollm2", "smollm2-135m-instruct", adapter,
                                             smollm2_prompts(smol_tokenizer), work, chat=True,
                                             converter_source=args.llama_cpp_source)
            results["smollm2"]["adapter"] = about
    results["vllm"] = vllm_check()
    problems = failures(results)
    paths = write_result("runtimes-tiny" if args.tiny_only else "runtimes", results, "\n".join(problems) + "\n")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    print(f"{'all runtime checks passed' if not problems else f'{len(problems)} runtime checks failed'}; "
          f"results in {paths[0]}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
