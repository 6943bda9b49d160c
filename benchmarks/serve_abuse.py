"""Server abuse: wrong keys, traversal, oversized and malformed bodies, slow clients, a flood past the queue limit
and clients that leave mid-stream, thrown at a real `loratune serve` while a trickle of well-formed requests runs
alongside. None of those may fail, each abusive request must get its 4xx in OpenAI's error shape, and the
server's resident memory after the abuse must be within 10% of its level after warm-up.

Run `python -m benchmarks.serve_abuse` (part of `make soak`); results go to benchmarks/results/serve-abuse-latest.json.
Loopback only (127.0.0.1). Every loop is bounded in count and in time, and the whole run has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

from benchmarks.common import machine, start_server, stop_server, write_result

ROOT = Path(__file__).resolve().parents[1]
KEY = "abuse-key-0123456789"
LIMITS = {"--max-body-bytes": 4096, "--max-queued": 4, "--max-batch": 2, "--max-tokens": 32,
          "--max-prompt-tokens": 40, "--max-adapters": 3, "--body-timeout": 2}
TRICKLE_PROMPTS = ["the cat sat on a mat", "hello world", "the good movie was great and the plot"]
MODELS = ["tiny", "alpha", "beta"]


# --- setup ----------------------------------------------------------------------------------------------------
def make_model_and_adapters(work: Path) -> tuple[str, Path, Path]:
    """The tests' tiny random Llama, the tests' two adapters under an adapter root, and a copy outside it."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serve")]
    import torch
    from conftest import VOCAB, _save  # the tests' word-level vocabulary, and its tokenizer saved beside the model
    from serve_tools import make_adapters
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = _save(work / "tiny", LlamaForCausalLM(config))
    root = make_adapters(model, work / "root")
    outside = work / "outside"
    shutil.copytree(root / "alpha", outside / "alpha")
    (root / "escape").symlink_to(outside / "alpha", target_is_directory=True)  # a folder link leading out
    (root / "linked").mkdir()
    (root / "linked" / "adapter_config.json").symlink_to(outside / "alpha" / "adapter_config.json")
    shutil.copy(root / "alpha" / "adapter_model.safetensors", root / "linked")
    return model, root, outside


def serve(model: str, root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    argv = ["--model", model, f"--adapter=alpha={root / 'alpha'}", f"--adapter=beta={root / 'beta'}",
            "--adapter-root", str(root), *(str(part) for item in LIMITS.items() for part in item)]
    return start_server(argv, 120, headers=auth(), log=log, LORATUNE_API_KEY=KEY)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def completion(model: str, prompt: str, tokens: int = 8, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, **extra}


# --- the tally ------------------------------------------------------------------------------------------------
class Tally:
    """Per kind: requests sent, statuses seen, and those that broke the rule (wrong status or shape)."""

    def __init__(self) -> None:
        self.expected: dict[str, str] = {}
        self.sent: Counter = Counter()
        self.seen: dict[str, Counter] = defaultdict(Counter)
        self.bad: dict[str, list[str]] = defaultdict(list)

    def record(self, kind: str, expected: set, status, body: bytes | None = None, note: str = "") -> None:
        self.expected.setdefault(kind, "/".join(str(s) for s in sorted(expected, key=str)))
        self.sent[kind] += 1
        self.seen[kind][status] += 1
        problem = None
        if status not in expected:
            problem = f"status {status}"
        elif isinstance(status, int) and 400 <= status < 500 and not error_shaped(body):
            problem = f"status {status} without OpenAI's error shape: {(body or b'')[:200]!r}"
        if problem:
            self.bad[kind].append(f"{note}: {problem}")


def error_shaped(body: bytes | None) -> bool:
    try:
        error = json.loads(body)["error"]
    except (TypeError, ValueError, KeyError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and bool(error["message"])


async def send(client: httpx.AsyncClient, tally: Tally, kind: str, expected: set, method: str, path: str,
               note: str = "", **options) -> None:
    try:
        response = await asyncio.wait_for(client.request(method, path, **options), 30)
        tally.record(kind, expected, response.status_code, response.content, note)
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        tally.record(kind, expected, type(exc).__name__, note=note)


async def bounded(coroutines, width: int) -> None:
    gate = asyncio.Semaphore(width)

    async def one(coroutine):
        async with gate:
            await coroutine

    await asyncio.gather(*(one(c) for c in coroutines))


# --- the well-formed trickle ----------------------------------------------------------------------------------
class Trickle:
    """Well-formed greedy requests, one at a time, whose answers must equal the warm-up's. A 429 is retried
    after a short wait (as the official client does), at most 50 times, and counted."""

    def __init__(self, url: str, reference: dict) -> None:
        self.url, self.reference = url, reference
        self.sent = self.failed = self.retried = 0
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def run(self, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=auth(), timeout=30) as client:
            index = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                model, prompt = MODELS[index % 3], TRICKLE_PROMPTS[index % len(TRICKLE_PROMPTS)]
                index += 1
                self.sent += 1
                problem = await self._one(client, model, prompt)
                if problem:
                    self.failed += 1
                    self.failures.append(f"{model} {prompt!r}: {problem}")
                await asyncio.sleep(0.1)

    async def _one(self, client: httpx.AsyncClient, model: str, prompt: str) -> str | None:
        for _ in range(50):
            try:
                response = await client.post("/v1/completions", json=completion(model, prompt))
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
            if response.status_code == 429:
                self.retried += 1
                await asyncio.sleep(0.2)
                continue
            if response.status_code != 200:
                return f"status {response.status_code}: {response.text[:200]}"
            text = response.json()["choices"][0]["text"]
            return None if text == self.reference[model, prompt] else f"answer {text!r} differs from warm-up's"
        return "still 429 after 50 tries"


async def warm_up(url: str, rounds: int) -> dict:
    reference = {}
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=60) as client:
        for _ in range(rounds):
            for model in MODELS:
                for prompt in TRICKLE_PROMPTS:
                    response = await client.post("/v1/completions", json=completion(model, prompt))
                    response.raise_for_status()
                    text = response.json()["choices"][0]["text"]
                    if reference.setdefault((model, prompt), text) != text:
                        raise SystemExit(f"warm-up: {model} {prompt!r} answered differently twice")
            await client.post("/v1/completions", json=completion("alpha", "hello", 4, stream=True))
    return reference


# --- the abuse ------------------------------------------------------------------------------------------------
async def wrong_keys(client: httpx.AsyncClient, tally: Tally, count: int) -> None:
    headers = [{}, auth("wrong"), auth(KEY + "x"), auth(KEY[:-1]), {"Authorization": KEY},
               {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}, auth("é" * 8)]
    calls = []
    for i in range(count):
        header = headers[i % len(headers)]
        path, method, body = [("/v1/completions", "POST", completion("alpha", "hello")), ("/v1/models", "GET", None),
                              ("/health", "GET", None), ("/v1/adapters", "POST", {"name": "x", "path": "alpha"}),
                              ("/v1/adapters/alpha", "DELETE", None)][i % 5]
        raw = {name: value.encode() for name, value in header.items()}  # bytes: httpx refuses non-ASCII text
        calls.append(send(client, tally, "wrong or missing key", {401}, method, path, note=f"{path} {header}",
                          headers=raw, json=body))
    calls += [send(client, tally, "wrong or missing key", {401}, "POST", "/v1/completions", note="malformed body",
                   headers={"Content-Type": "application/json"}, content=b"{") for _ in range(count // 10)]
    await bounded(calls, 8)


async def traversal(client: httpx.AsyncClient, tally: Tally, root: Path, outside: Path) -> None:
    paths = ["..", "../outside/alpha", "alpha/../../outside/alpha", str(outside / "alpha"), "/etc", "/", "escape",
             "linked", "alpha/..", "./../outside", "a\x00b", "", "~", "nonexistent", "alpha/adapter_config.json",
             str(root / ".." / "outside" / "alpha"), "%2e%2e/outside", "alpha\\..\\..", "\u202e", "a" * 5000]
    names = ["..", "../x", "a/b", "", "x" * 65, "名前", "a b", "-a", "alpha\n", ".hidden", "a\x00", "tiny", "alpha",
             "beta", "con:", "a%2F..", "*"]
    calls = [send(client, tally, "traversal: adapter path", {400, 413}, "POST", "/v1/adapters", note=repr(p)[:60],
                  headers=auth(), json={"name": "new", "path": p}) for p in paths]
    calls += [send(client, tally, "traversal: adapter name", {400}, "POST", "/v1/adapters", note=repr(n),
                   headers=auth(), json={"name": n, "path": "alpha"}) for n in names]
    calls += [send(client, tally, "traversal: model name", {404}, "POST", "/v1/completions", note=repr(n),
                   headers=auth(), json=completion(n, "hello")) for n in ["../alpha", "alpha/..", str(root / "alpha"),
                                                                          "ALPHA", "alpha ", "\u0430lpha"]]
    calls += [send(client, tally, "traversal: delete name", {404}, "DELETE", f"/v1/adapters/{n}", note=n,
                   headers=auth()) for n in ["..%2F..%2Fetc", "%2E%2E", "nonexistent", "alpha%00", "tiny"]]
    await bounded(calls, 4)


async def oversized(url: str, client: httpx.AsyncClient, tally: Tally, count: int) -> None:
    limit = LIMITS["--max-body-bytes"]
    big = json.dumps(completion("alpha", "hello " * limit)).encode()

    async def chunks():
        for start in range(0, len(big), 1024):
            yield big[start:start + 1024]

    calls = []
    for _ in range(count):
        calls.append(send(client, tally, "oversized body, Content-Length", {413}, "POST", "/v1/completions",
                          headers=auth(), content=big))
        calls.append(send(client, tally, "oversized body, chunked", {413}, "POST", "/v1/completions",
                          headers=auth(), content=chunks()))
    await bounded(calls, 4)
    # a Content-Length that lies high (then the client stops): refused from the header alone
    status, body = await raw_request(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                     + KEY.encode() + b"\r\nContent-Length: 999999999999\r\n\r\n{")
    tally.record("oversized body, Content-Length", {413}, status, body, "a huge Content-Length")


async def raw_request(url: str, data: bytes, pause: float = 0.0, step: int = 0, timeout: float = 15):
    """Send `data` over a raw socket (in `step`-byte pieces with `pause` between, when given); return the status
    and body of the answer, or the reason there was none."""
    host, port = url.removeprefix("http://").split(":")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    except (OSError, asyncio.TimeoutError) as exc:
        return type(exc).__name__, None
    try:
        pieces = [data[i:i + step] for i in range(0, len(data), step)] if step else [data]
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        answer = await asyncio.wait_for(reader.read(65536), timeout)
        if not answer:
            return "closed", None
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(body) < length:
            more = await asyncio.wait_for(reader.read(65536), timeout)
            if not more:
                break
            body += more
        return status, body
    except asyncio.TimeoutError:
        return "no answer", None
    except OSError as exc:
        return type(exc).__name__, None
    finally:
        writer.close()


async def slow_clients(url: str, tally: Tally) -> None:
    body = json.dumps(completion("alpha", "hello world")).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    timeout = LIMITS["--body-timeout"]

    async def byte_by_byte():  # slow but complete: it must be answered, and meanwhile others too
        status, answer = await raw_request(url, head + body, pause=0.01, step=1, timeout=20)
        tally.record("slow client, byte by byte", {200}, status, answer)

    async def stall_mid_body():
        status, answer = await raw_request(url, head + body[:10], timeout=timeout + 10)
        tally.record("slow client, stalls mid-body", {408}, status, answer)

    async def stall_mid_headers():  # uvicorn has no header timeout: the server holds the socket until we leave
        status, answer = await raw_request(url, head[:40], timeout=timeout + 2)
        tally.record("slow client, stalls mid-headers", {"no answer"}, status, answer)

    await asyncio.gather(*[byte_by_byte() for _ in range(3)], *[stall_mid_body() for _ in range(10)],
                         *[stall_mid_headers() for _ in range(10)])


def malformed_bodies(count: int) -> list[tuple[str, bytes]]:
    good = json.dumps(completion("alpha", "hello")).encode()
    rng = random.Random(0)
    fixed = [b"", b"{", b"}", b"[", b"null", b"[]", b"42", b'"text"', b"{'model': 'alpha'}", b'{"model": alpha}',
             b'{"model": "alpha",}', b'{"model": "alpha" "prompt": "x"}', b"\xff\xfe{}", b'{"model": "\xff"}',
             b"NaN", b'{"model": "alpha", "prompt": "x", "max_tokens": NaN}', b"\x00" * 64, b"{" * 1000,
             b"[" * 2000 + b"]" * 2000, b'{"model": "alpha", "prompt": ' + b'"' + b"x" * 100,
             b'{"model": 1, "prompt": 2}', b'{"prompt": "x"}', b'{"model": "alpha", "prompt": "x", "max_tokens": -1}',
             b'{"model": "alpha", "prompt": "x", "temperature": "hot"}', b'{"model": "alpha", "prompt": {"a": 1}}',
             b'{"model": "alpha", "prompt": "x", "max_tokens": 1e999}']
    bodies = [("fixed", body) for body in fixed]
    for _ in range(20 * count):  # the good body cut short, or with one byte changed; bounded tries
        if len(bodies) >= count:
            break
        cut = rng.randrange(len(good) - 1)
        if rng.random() < 0.5:
            bodies.append(("truncated", good[:cut]))
        else:
            flipped = bytearray(good)
            flipped[cut] = rng.choice(b"{}[]\",:\\\x00\xff")
            if not parses(bytes(flipped)):  # a flip inside a string can leave valid JSON: not malformed
                bodies.append(("flipped", bytes(flipped)))
    return bodies[:count]


def parses(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


async def malformed(client: httpx.AsyncClient, tally: Tally, count: int) -> None:
    calls = []
    for _, body in malformed_bodies(count):
        calls.append(send(client, tally, "malformed JSON", {400}, "POST", "/v1/completions", note=repr(body[:40]),
                          headers={**auth(), "Content-Type": "application/json"}, content=body))
    await bounded(calls, 8)


async def flood(client: httpx.AsyncClient, tally: Tally, count: int) -> None:
    body = completion("beta", "the cat sat on a mat", LIMITS["--max-tokens"], ignore_eos=True)
    await asyncio.gather(*[send(client, tally, "flood past the queue", {200, 429}, "POST", "/v1/completions",
                                headers=auth(), json=body) for _ in range(count)])


async def leave_mid_stream(client: httpx.AsyncClient, tally: Tally, count: int) -> None:
    async def one(i: int) -> None:
        body = completion(MODELS[i % 3], "hello world", LIMITS["--max-tokens"], stream=True, ignore_eos=True)
        try:
            async with asyncio.timeout(30):
                async with client.stream("POST", "/v1/completions", headers=auth(), json=body) as response:
                    status, answer = response.status_code, None
                    if status == 200:
                        async for _ in response.aiter_bytes():
                            break  # the first chunk, then hang up
                    else:
                        answer = await response.aread()
        except (httpx.HTTPError, TimeoutError) as exc:
            status, answer = type(exc).__name__, None
        tally.record("leaves mid-stream", {200, 429}, status, answer)

    await bounded([one(i) for i in range(count)], 6)


async def wait_idle(client: httpx.AsyncClient, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        stats = (await client.get("/health", headers=auth())).json()
        if (stats.get("running", 0) == 0 and stats.get("waiting", 0) == 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


# --- the run --------------------------------------------------------------------------------------------------
async def abuse(url: str, pid: int, root: Path, outside: Path, args) -> dict:
    reference = await warm_up(url, args.warmup)
    rss_warm = rss_kib(pid)
    tally, trickle = Tally(), Trickle(url, reference)
    deadline = time.monotonic() + args.deadline
    trickling = asyncio.create_task(trickle.run(deadline))
    phases = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for name, phase in [("keys", wrong_keys(client, tally, args.keys)),
                            ("traversal", traversal(client, tally, root, outside)),
                            ("oversized", oversized(url, client, tally, args.oversized)),
                            ("slow", slow_clients(url, tally)),
                            ("malformed", malformed(client, tally, args.malformed)),
                            ("flood", flood(client, tally, args.flood)),
                            ("disconnect", leave_mid_stream(client, tally, args.disconnects))]:
            start = time.monotonic()
            remaining = deadline - start
            if remaining <= 0:
                phase.close()
                phases[name] = "skipped: past the deadline"
                continue
            try:
                await asyncio.wait_for(phase, remaining)
                phases[name] = round(time.monotonic() - start, 1)
            except asyncio.TimeoutError:
                phases[name] = "cut at the deadline"
        trickle.stop.set()
        await trickling
        idle = await wait_idle(client)
        rss_after = rss_kib(pid)
        await warm_up(url, 1)  # the server still answers as at the start
        rss_again = rss_kib(pid)
    return {"tally": tally, "trickle": trickle, "phases": phases, "idle": idle, "rss_warm_kib": rss_warm,
            "rss_after_kib": rss_after, "rss_after_rerun_kib": rss_again}


def report(outcome: dict) -> tuple[str, bool]:
    tally, trickle = outcome["tally"], outcome["trickle"]
    rows = [("kind", "sent", "expected", "seen", "wrong")]
    for kind in tally.sent:
        seen = ", ".join(f"{status}x{n}" for status, n in sorted(tally.seen[kind].items(), key=str))
        rows.append((kind, str(tally.sent[kind]), tally.expected[kind], seen, str(len(tally.bad[kind]))))
    rows.append(("well-formed trickle", str(trickle.sent), "200, same answer", f"429-retries x{trickle.retried}",
                 str(trickle.failed)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    warm, after = outcome["rss_warm_kib"], outcome["rss_after_kib"]
    change = (after - warm) / warm
    lines.append(f"server RSS: {warm / 1024:.1f} MiB after warm-up, {after / 1024:.1f} MiB after the abuse "
                 f"({change:+.1%}), {outcome['rss_after_rerun_kib'] / 1024:.1f} MiB after one more warm-up round")
    lines.append(f"phases (s): {outcome['phases']}; engine after: {outcome['idle']}")
    floods = tally.seen.get("flood past the queue", Counter())
    ok = (not any(tally.bad.values()) and trickle.failed == 0 and abs(change) <= 0.10 and floods[429] > 0
          and all(isinstance(v, float) for v in outcome["phases"].values()))
    for kind, problems in tally.bad.items():
        lines += [f"WRONG {kind}: {p}" for p in problems[:5]]
    lines += [f"TRICKLE FAILED: {f}" for f in trickle.failures[:5]]
    if floods[429] == 0:
        lines.append("WRONG: the flood never reached the queue limit (no 429)")
    lines.append("PASS" if ok else "FAIL")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--oversized", type=int, default=50)
    parser.add_argument("--malformed", type=int, default=1000)
    parser.add_argument("--flood", type=int, default=60)
    parser.add_argument("--disconnects", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3, help="rounds of well-formed requests before measuring RSS")
    parser.add_argument("--deadline", type=float, default=150, help="seconds for all the abuse together")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loratune-abuse-") as tmp:
        work = Path(tmp)
        model, root, outside = make_model_and_adapters(work)
        process, url = serve(model, root, work / "server.log")
        try:
            outcome = asyncio.run(abuse(url, process.pid, root, outside, args))
            alive = process.poll() is None
        finally:
            stop_server(process)
        log = (work / "server.log").read_text()
    text, ok = report(outcome)
    ok = ok and alive
    print(text if alive else text + "\nthe server died during the abuse")
    tally, trickle = outcome["tally"], outcome["trickle"]
    kinds = {k: {"sent": tally.sent[k], "expected": tally.expected[k], "wrong": tally.bad[k][:20],
                 "seen": {str(s): n for s, n in tally.seen[k].items()}} for k in tally.sent}
    result = {"machine": machine(), "limits": LIMITS, "kinds": kinds,
              "trickle": {"sent": trickle.sent, "failed": trickle.failed, "retried_429": trickle.retried,
                          "failures": trickle.failures[:20]},
              **{k: outcome[k] for k in ("rss_warm_kib", "rss_after_kib", "rss_after_rerun_kib", "phases", "idle")},
              "server_log_tail": log[-2000:], "seconds": round(time.monotonic() - started, 1), "pass": ok}
    write_result("serve-abuse-latest", result, text + "\n")
    print(f"{result['seconds']} s in all; results in benchmarks/results/serve-abuse-latest.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
