"""`python -m benchmarks serve`: many clients over several adapters against `loratune serve`, on loopback only.

The server runs in its own process (`loratune serve` on 127.0.0.1); the clients are asyncio tasks in this one.
Three runs of the same request list: concurrent with mixed adapters, concurrent with one adapter, and one at a
time (a bounded prefix of the list). Every request asks for exactly --new-tokens tokens (`ignore_eos`) at
temperature 0, so the runs do the same work. Every loop is bounded in count and in time.

`--soak SECONDS` runs mixed traffic instead (every adapter and the base, chat and completions, streamed or not,
`n` 1-2, log-probabilities, greedy and sampled) for that long and samples the server's resident memory: its
peak after the first minute against its peak at the end is the soak's growth.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.common import machine, proc_status, start_server, stop_server, write_result
from loratune.cli import PRECISIONS

PROMPTS = [
    "Explain what a LoRA adapter is to a new programmer.", "Write a short poem about the sea.",
    "Give three tips for learning a new language.", "Why is the sky blue?", "Describe a good breakfast.",
    "What is the capital of France, and why is it famous?", "Summarise the water cycle.",
    "How do I make a cup of tea?", "Tell me a story about a brave cat.", "What are prime numbers?",
    "List some uses of a paperclip.", "Why do we sleep?", "Explain gravity simply.",
    "What makes a good friend?", "How does a bicycle stay upright?", "Write a haiku about autumn.",
]


def make_adapters(model_name: str, root: Path, count: int) -> list[tuple[str, str]]:
    """`count` random adapters (q/k/v/o, r=8) small enough that the model still writes sentences."""
    import torch

    import loratune as lt
    from loratune.pretrained import load_model

    model, _ = load_model(model_name, "causal-lm")
    adapters = []
    for i in range(count):
        name = f"adapter{i}"
        lt.add_adapter(model, lt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "o_proj"], task_type="CAUSAL_LM"),
                       name=name)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for path, param in model.named_parameters():
                if f"lora_B.{name}." in path:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        lt.save_adapter(model, root / name, name=name)
        adapters.append((name, str(root / name)))
    return adapters


def serve_adapters(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, str, list[str]]:
    """`loratune serve` of `--model` with `--adapters` random adapters saved in `folder`: (process, URL, names)."""
    adapters = make_adapters(args.model, folder, args.adapters)
    argv = ["--model", args.model, "--max-batch", str(args.max_batch), "--max-queued", "1024",
            "--precision", args.precision]
    process, url = start_server(argv + [f"--adapter={name}={path}" for name, path in adapters])
    return process, url, [name for name, _ in adapters]


async def send(client: httpx.AsyncClient, url: str, path: str, body: dict) -> dict:
    """One request, streamed or not. It succeeded if answered 200 with its usage; `ttft` is the time to the
    first chunk with text (None if none came), `latency` to the end."""
    start = time.perf_counter()
    first = usage = None
    try:
        if body.get("stream"):
            async with client.stream("POST", url + path, json=body) as response:
                if response.status_code != 200:
                    return {"ok": False, "error": f"HTTP {response.status_code}"}
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        return {"ok": False, "error": chunk["error"]["message"]}
                    choice = (chunk.get("choices") or [{}])[0]
                    if first is None and (choice.get("delta", {}).get("content") or choice.get("text")):
                        first = time.perf_counter()
                    usage = chunk.get("usage") or usage
        else:
            response = await client.post(url + path, json=body)
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            usage = response.json().get("usage")
    except httpx.HTTPError as exc:
        return {"ok": False, "error": type(exc).__name__}
    if usage is None:
        return {"ok": False, "error": "no usage"}
    return {"ok": True, "tokens": usage["completion_tokens"], "ttft": None if first is None else first - start,
            "latency": time.perf_counter() - start}


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, new_tokens: int) -> dict:
    """A greedy streamed chat request for exactly `new_tokens` tokens; anything else counts as failed."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    result = await send(client, url, "/v1/chat/completions", body)
    if result["ok"] and (result["tokens"] != new_tokens or result["ttft"] is None):
        return {"ok": False, "error": f"{result['tokens']} tokens"}
    return result


async def run_load(url: str, requests: list[tuple[str, str]], clients: int, new_tokens: int, time_limit: float) -> dict:
    """`clients` workers take requests from the list in order; none starts after `time_limit` seconds."""
    queue = list(reversed(requests))
    results: list[dict] = []
    start = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() - start < time_limit:
            model, prompt = queue.pop()
            results.append(await one_request(client, url, model, prompt, new_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    return summarise(results, len(requests), wall)


SOAK_WINDOW_S = 60.0  # the soak's first minute: its peak is the baseline the growth is measured from
SOAK_SAMPLE_S = 5.0


def soak_traffic(models: list[str], new_tokens: int) -> Iterator[tuple[str, dict]]:
    """An endless, fixed (seeded) mix of (endpoint, body): every model, chat and completions, streamed or not,
    `n` 1-2, log-probabilities, greedy and sampled, 8 to `new_tokens` new tokens."""
    rng = random.Random(0)
    for i in itertools.count():
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": models[i % len(models)], "max_tokens": rng.randint(min(8, new_tokens), new_tokens),
                "n": rng.choice([1, 1, 2]),
                "stream": rng.random() < 0.5, "temperature": rng.choice([0, 0.8]), "seed": i}
        if rng.random() < 0.5:
            body["messages"] = [{"role": "user", "content": prompt}]
            if rng.random() < 0.3:
                body.update(logprobs=True, top_logprobs=2)
            yield "/v1/chat/completions", body
        else:
            body["prompt"] = prompt
            if rng.random() < 0.3:
                body["logprobs"] = 2
            yield "/v1/completions", body


async def run_soak(url: str, pid: int, traffic: Iterator[tuple[str, dict]], clients: int,
                   seconds: float) -> dict:
    """`clients` workers send `traffic` for `seconds` while the server's VmRSS and VmHWM are sampled."""
    results: list[dict] = []
    samples: list[dict] = []
    start = time.perf_counter()

    def sample() -> None:
        rss, peak = proc_status("VmRSS", pid), proc_status("VmHWM", pid)
        if rss is None or peak is None:
            raise SystemExit(f"soak: the server (pid {pid}) exited after {time.perf_counter() - start:.0f} s")
        samples.append({"t_s": round(time.perf_counter() - start, 1), "rss_mb": rss / 2**20, "peak_mb": peak / 2**20,
                        "requests": len(results)})

    async def sampler() -> None:
        while time.perf_counter() - start < seconds:
            sample()
            await asyncio.sleep(SOAK_SAMPLE_S)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() - start < seconds:
            path, body = next(traffic)
            results.append(await send(client, url, path, body))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(clients)))
    sample()
    baseline = max(s["peak_mb"] for s in samples if s["t_s"] <= SOAK_WINDOW_S)
    done = [r for r in results if r["ok"]]
    return {"seconds": round(time.perf_counter() - start, 1), "clients": clients, "requests": len(results),
            "completed": len(done), "errors": sorted({r["error"] for r in results if not r["ok"]}),
            "tokens": sum(r["tokens"] for r in done), "peak_after_first_minute_mb": baseline,
            "peak_at_end_mb": samples[-1]["peak_mb"], "growth": samples[-1]["peak_mb"] / baseline - 1,
            **settled_growth(samples), "samples": samples}


def settled_growth(samples: list[dict]) -> dict:
    """Resident memory between bursts: the least VmRSS of the second minute against that of the last minute
    (a peak is one burst; a leak shows in both)."""
    end = samples[-1]["t_s"]
    second = min(s["rss_mb"] for s in samples if SOAK_WINDOW_S <= s["t_s"] <= 2 * SOAK_WINDOW_S)
    last = min(s["rss_mb"] for s in samples if s["t_s"] >= end - SOAK_WINDOW_S)
    return {"settled_second_minute_mb": second, "settled_last_minute_mb": last, "settled_growth": last / second - 1}


def soak_markdown(result: dict) -> str:
    soak = result["soak"]
    args = result["args"]
    return (f"Soak: {soak['seconds']:.0f} s of mixed traffic from {soak['clients']} clients on {args['model']} "
            f"and {args['adapters']} adapters: {soak['completed']} of {soak['requests']} requests answered "
            f"({soak['tokens']} tokens); server peak RSS {soak['peak_after_first_minute_mb']:.0f} MB after the first "
            f"minute, {soak['peak_at_end_mb']:.0f} MB at the end: **{100 * soak['growth']:+.2f}%**; resident between "
            f"bursts {soak['settled_second_minute_mb']:.1f} MB in the second minute, "
            f"{soak['settled_last_minute_mb']:.1f} MB in the last: {100 * soak['settled_growth']:+.2f}%.")


def summarise(results: list[dict], asked: int, wall: float) -> dict:
    done = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in done)
    latency = sorted(r["latency"] for r in done)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")

    return {"requests": asked, "completed": len(done), "failed": len(results) - len(done),
            "not_sent": asked - len(results), "errors": sorted({r["error"] for r in results if not r["ok"]}),
            "tokens": sum(r["tokens"] for r in done), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in done) / wall if wall else 0.0,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "latency_p50_s": pct(latency, 0.5), "latency_p99_s": pct(latency, 0.99),
            "latency_mean_s": statistics.fmean(latency) if latency else float("nan")}


def markdown(result: dict) -> str:
    args = result["args"]
    lines = [f"{args['requests']} chat requests of {args['new_tokens']} new tokens on {args['model']}, greedy; "
             f"server `--max-batch {args['max_batch']} --precision {args.get('precision', 'fp32')}`; "
             f"{result['machine']['cpu_count']} CPUs.", "",
             "| run | clients | requests done / failed / not sent | tokens/s | TTFT p50 / p99 (s) | "
             "latency p50 / p99 (s) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        lines.append(f"| {name} | {run['clients']} | {run['completed']} / {run['failed']} / {run['not_sent']} | "
                     f"{run['tokens_per_s']:.1f} | {run['ttft_p50_s']:.2f} / {run['ttft_p99_s']:.2f} | "
                     f"{run['latency_p50_s']:.2f} / {run['latency_p99_s']:.2f} | {run['wall_s']:.0f} |")
    ratios = result["ratios"]
    lines += ["", f"Mixed adapters vs one at a time: **{ratios['mixed_vs_one_at_a_time']:.2f}x** tokens/s; "
                  f"mixed vs a single adapter: **{ratios['mixed_vs_single_adapter']:.2f}x**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--one-at-a-time", type=int, default=32,
                        help="how many of the requests to send one at a time (default 32, to bound the time)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                        help="the server's --precision (default: the server's default)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds per run before no new request starts")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="mixed traffic for SECONDS (at least 180) instead of the three runs; fails on peak RSS "
                             "growth of 2%% or more after the first minute, or on any failed request")
    args = parser.parse_args(argv)
    if args.soak is not None:
        if args.soak < 3 * SOAK_WINDOW_S:
            parser.error(f"--soak: at least {3 * SOAK_WINDOW_S:.0f} seconds (the first minute is the baseline)")
        return soak(args)

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        process, url, names = serve_adapters(args, Path(tmp))
        mixed = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
        single = [(names[0], prompt) for _, prompt in mixed]
        try:
            warm = [(name, PROMPTS[0]) for name in names]
            asyncio.run(run_load(url, warm, len(warm), args.new_tokens, args.time_limit))
            runs = {}
            for label, requests, clients in (("mixed adapters", mixed, args.clients),
                                             ("single adapter", single, args.clients),
                                             ("one at a time", mixed[:args.one_at_a_time], 1)):
                print(f"{label}: {len(requests)} requests, {clients} client(s)...", file=sys.stderr, flush=True)
                runs[label] = {"clients": clients, **asyncio.run(run_load(url, requests, clients, args.new_tokens,
                                                                          args.time_limit))}
                print(f"  {runs[label]['tokens_per_s']:.1f} tokens/s, {runs[label]['failed']} failed",
                      file=sys.stderr, flush=True)
        finally:
            stop_server(process)
    result = {"machine": machine(), "args": vars(args), "runs": runs,
              "ratios": {"mixed_vs_one_at_a_time": runs["mixed adapters"]["tokens_per_s"] /
                         runs["one at a time"]["tokens_per_s"],
                         "mixed_vs_single_adapter": runs["mixed adapters"]["tokens_per_s"] /
                         runs["single adapter"]["tokens_per_s"]}}
    paths = write_result(f"serve-{result['machine']['date'][:10]}", result, markdown(result))
    print(markdown(result))
    print("wrote " + ", ".join(map(str, paths)), file=sys.stderr)
    failed = sum(run["failed"] + run["not_sent"] for run in runs.values())
    return 0 if failed == 0 else 1


def soak(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as tmp:
        process, url, _ = serve_adapters(args, Path(tmp))
        try:
            models = [entry["id"] for entry in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
            traffic = soak_traffic(models, args.new_tokens)
            print(f"soak: {args.soak:.0f} s, {args.clients} clients...", file=sys.stderr, flush=True)
            result = {"machine": machine(), "args": vars(args),
                      "soak": asyncio.run(run_soak(url, process.pid, traffic, args.clients, args.soak))}
        finally:
            stop_server(process)
    paths = write_result(f"serve-soak-{result['machine']['date'][:10]}", result, soak_markdown(result))
    print(soak_markdown(result))
    print("wrote " + ", ".join(map(str, paths)), file=sys.stderr)
    return 0 if result["soak"]["growth"] < 0.02 and not result["soak"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
