"""Continuous batching of one base model with many LoRA adapters.

One engine thread owns the model. Each iteration it applies pending adapter loads and deletions, admits the
requests that arrived since the last step (their prompts prefilled together in one left-padded forward, each
row masked and positioned as if alone, so its greedy tokens are a single-request `generate`'s; a start all
prompts share, such as a chat template's system turn, runs once per adapter before it), and then runs
one decode step for every running row together. Rows are left-padded in a shared `DynamicCache` and carry
their own positions; the per-row adapters are applied in one batched computation by
`lt.mixed_adapter_batch`. A row leaves as soon as it finishes, and padding no row needs is trimmed (the cache
gains and loses rows through `batching.kv_cache`, where every cache edit lives).

transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`) packs every request into
one flattened sequence, so there is no batch row to hang an adapter on; hence this scheduler.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

import loratune as lt
from loratune.batching import (
    common_prefix_length,
    decoder_body,
    keep_rows,
    packed_mask_obstacle,
    pad_rows,
    padding_first,
    prefix_cache,
    stack_rows,
)


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


@dataclass(frozen=True)
class Sampling:
    """What a request asks of the decoder; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens (for benchmarks), as vLLM's extension does
    logprobs: int | None = None  # report each token's log-probability and this many most likely alternatives


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log_softmax of its logits, before temperature or
    top_p), and the `top` most likely tokens with theirs."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int = 0  # characters of the answer's text before this token


@dataclass
class Event:
    """A piece of a request's answer, sent from the engine thread to whoever waits on it."""

    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" on the last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens generated since the last event


@dataclass(eq=False)
class Job:
    """One request inside the engine: its prompt, its adapter (None: the base model) and its progress."""

    prompt_ids: list[int]
    adapter: str | None
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    decoded_chars: int = 0  # length of the text decoded so far
    scored: list[TokenLogprob] = field(default_factory=list)  # log-probabilities not yet sent
    pad: int = 0  # left-padding columns of this row in the shared cache
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)


class Engine:
    """Runs jobs on `model` in a background thread; `submit`, `load_adapter` and `delete_adapter` are thread-safe."""

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queued: int = 64, prefill_tokens: int = 2048) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.prefill_tokens = prefill_tokens  # padded prompt tokens prefilled per iteration before the next decode step
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id will do
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._commands: deque[tuple[str, str, object, Future]] = deque()
        self._cache: DynamicCache | None = None
        self._length = 0  # columns in the shared cache
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._body = decoder_body(model)  # None: prompts' shared prefixes are prefilled with the rest

    # --- called from other threads ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loratune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, *jobs: Job) -> None:
        """Queue jobs, all or none (a request's `n` choices)."""
        with self._wake:
            if len(self._waiting) + len(jobs) > self.max_queued:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (limit {self.max_queued})")
            self._waiting.extend(jobs)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Free the job's row at the next step (a client went away)."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def load_adapter(self, name: str, directory: str) -> Future:
        """Load between two decode steps; the future holds None or the error."""
        return self._command("load", name, directory)

    def delete_adapter(self, name: str) -> Future:
        """Delete once no waiting or running request uses the adapter."""
        return self._command("delete", name, None)

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "queued": len(self._waiting)}

    def _command(self, kind: str, name: str, arg: object) -> Future:
        future: Future = Future()
        with self._wake:
            self._commands.append((kind, name, arg, future))
            self._wake.notify()
        return future

    # --- the engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._commands or self._running):
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    break
            try:
                self._run_commands()
                self._drop(lambda job: job.cancelled)
                self._admit()
                if self._running:
                    self._decode_step()
            except Exception as exc:  # a failed step must not take the server down: fail its rows, go on
                self._fail_running(f"generation failed: {type(exc).__name__}: {exc}")
        self._fail_running("the server is shutting down")
        for job in self._waiting:
            job.emit(Event(error="the server is shutting down"))

    def _run_commands(self) -> None:
        kept = deque()
        while True:
            with self._wake:
                if not self._commands:
                    break
                command = self._commands.popleft()
            kind, name, arg, future = command
            if kind == "delete" and self._in_use(name):
                kept.append(command)  # retry after the requests using it have finished
                continue
            try:
                if kind == "load":
                    self._load(name, str(arg))
                else:
                    lt.delete_adapter(self.model, name)
                future.set_result(None)
            except Exception as exc:  # handed to the waiting caller, who reports it
                future.set_exception(exc)
        with self._wake:
            self._commands.extendleft(reversed(kept))

    def _load(self, name: str, directory: str) -> None:
        lt.load_adapter(self.model, directory, name=name)
        try:  # refuse what a mixed batch cannot run (DoRA, modules_to_save, convolutions) now, not mid-request
            with lt.mixed_adapter_batch(self.model, [name]):
                pass
        except lt.LoratuneError:
            lt.delete_adapter(self.model, name)
            raise

    def _in_use(self, name: str) -> bool:
        with self._wake:
            waiting = list(self._waiting)
        return any(job.adapter == name for job in [*self._running, *waiting])

    def _admit(self) -> None:
        """Take the requests that arrived since the last step, up to `max_batch` rows and about `prefill_tokens`
        padded prompt tokens (always at least one), and prefill them together."""
        jobs: list[Job] = []
        width = 0
        with self._wake:
            while self._waiting and len(self._running) + len(jobs) < self.max_batch:
                job = self._waiting[0]
                grown = max(width, len(job.prompt_ids))
                if jobs and not job.cancelled and grown * (len(jobs) + 1) > self.prefill_tokens:
                    break
                self._waiting.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    width = grown
        if not jobs:
            return
        try:
            self._prefill(jobs)
        except Exception as exc:  # these requests alone fail; the running rows go on
            for job in jobs:
                job.emit(Event(error=f"generation failed: {type(exc).__name__}: {exc}"))

    def _prefill(self, jobs: list[Job]) -> None:
        """One forward for every new prompt, left-padded (`batching.pad_rows`) so each row's last prompt token is
        the last column, as in the shared cache, with a padding mask and each row's own positions from 0. Jobs
        sharing one prompt list and adapter (a request's `n` choices) run as one row whose cache row is copied.
        A prefix all prompts share runs first, once per adapter (`_prefix_rows`); the rows are then laid out
        [prefix][pads][rest], and `padding_first` moves the pads to the front afterwards."""
        row_of: dict[tuple[int, str | None], int] = {}
        firsts: list[Job] = []  # one job per row to run
        source: list[int] = []  # each job's row
        for job in jobs:
            key = (id(job.prompt_ids), job.adapter)
            if key not in row_of:
                row_of[key] = len(firsts)
                firsts.append(job)
            source.append(row_of[key])
        prompts, adapters = [job.prompt_ids for job in firsts], [job.adapter for job in firsts]
        prefix = self._shared_prefix(prompts, adapters)
        ids, mask = pad_rows(prompts, self.pad_id, prefix, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._prefix_rows(ids[:1, :prefix], adapters) if prefix else DynamicCache()
        with lt.mixed_adapter_batch(self.model, adapters):
            out = self.model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions[:, prefix:],
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        if prefix:
            cache = padding_first(cache, prefix, (1 - mask).sum(-1))
        chosen = self._choose(out.logits[:, -1].float()[torch.tensor(source)], jobs)
        live = [i for i, (job, pick) in enumerate(zip(jobs, chosen)) if not self._advance(job, *pick)]
        if not live:
            return
        width = ids.shape[1]
        trim = min(width - len(jobs[i].prompt_ids) for i in live)
        rows = [source[i] for i in live]
        if trim or rows != list(range(len(firsts))):
            cache = keep_rows(cache, torch.tensor(rows), trim)
        for i in live:
            jobs[i].pad = width - trim - len(jobs[i].prompt_ids)
        self._join([jobs[i] for i in live], cache, width - trim)

    def _shared_prefix(self, prompts: list[list[int]], adapters: list[str | None]) -> int:
        """How many leading tokens every prompt shares (`batching.common_prefix_length`: a chat template's
        system turn), worth computing once per adapter; 0 where that saves nothing (no more rows than
        adapters), where the model's decoder body cannot be found, or where padding inside a row could mean
        something else (`packed_mask_obstacle`)."""
        if len(prompts) <= len(set(adapters)) or self._body is None:
            return 0
        prefix = common_prefix_length(prompts)
        if prefix and packed_mask_obstacle(self.model.config, max(map(len, prompts))) is not None:
            return 0
        return prefix

    def _prefix_rows(self, prefix_ids: torch.Tensor, adapters: list[str | None]) -> DynamicCache:
        """The shared prefix's keys and values: one forward (`batching.prefix_cache`) with one row per adapter
        the batch uses, each row then copied to the batch rows using its adapter."""
        distinct = list(dict.fromkeys(adapters))
        with lt.mixed_adapter_batch(self.model, distinct):
            _, cache = prefix_cache(self._body, prefix_ids.expand(len(distinct), -1), len(distinct))
        return keep_rows(cache, torch.tensor([distinct.index(a) for a in adapters]), 0)

    def _join(self, jobs: list[Job], cache: DynamicCache, length: int) -> None:
        """Add prefilled rows (each `pad` set within `cache`) to the shared cache, left-padding whichever side is
        shorter."""
        if self._cache is None or not self._running:
            self._cache, self._length, self._running = cache, length, list(jobs)
            return
        grow = max(length - self._length, 0)
        shift = self._length + grow - length
        self._cache = stack_rows(self._cache, cache, grow, shift)
        for row in self._running:
            row.pad += grow
        for job in jobs:
            job.pad += shift
        self._length += grow
        self._running.extend(jobs)

    def _decode_step(self) -> None:
        rows = self._running
        tokens = torch.tensor([[job.generated[-1]] for job in rows])
        pads = torch.tensor([job.pad for job in rows])
        mask = (torch.arange(self._length + 1)[None, :] >= pads[:, None]).long()
        positions = (self._length - pads)[:, None]
        with lt.mixed_adapter_batch(self.model, [job.adapter for job in rows]):
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                             past_key_values=self._cache, use_cache=True)
        self._length += 1
        chosen = self._choose(out.logits[:, -1].float(), rows)
        finished = {id(job) for job, pick in zip(rows, chosen) if self._advance(job, *pick)}
        self._drop(lambda job: id(job) in finished)

    def _choose(self, logits: torch.Tensor, jobs: list[Job]) -> list[tuple[int, TokenLogprob | None]]:
        """Each row's next token, and its log-probabilities where the request asked for them. Greedy rows take
        the argmax; sampled rows draw from their own seeded generator. A row whose draw fails is failed and
        cancelled alone (it leaves at `_advance`): one request never fails the batch."""
        chosen = logits.argmax(dim=-1).tolist()
        for i, job in enumerate(jobs):
            if job.sampling.temperature > 0:
                try:
                    chosen[i] = _sample(logits[i], job.sampling, job.generator)
                except Exception as exc:
                    job.emit(Event(error=f"sampling failed: {type(exc).__name__}: {exc}"))
                    job.cancelled = True
        return [(token, None if job.sampling.logprobs is None else _score(logits[i], token, job.sampling.logprobs))
                for i, (job, token) in enumerate(zip(jobs, chosen))]

    def _advance(self, job: Job, token: int, score: TokenLogprob | None = None) -> bool:
        """Record a token and emit the text it completes; True when the job is finished."""
        if job.cancelled:
            return True
        eos = token in self.eos_ids and not job.sampling.ignore_eos
        if not eos:
            job.generated.append(token)
            if score is not None:
                score.offset = job.decoded_chars
                job.scored.append(score)
        with self.tokenizer_lock:
            text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
        job.decoded_chars = len(text)
        stop_at = _find_stop(text, job.sampling.stop, job.sent_chars)
        if stop_at is not None:
            reason, text = "stop", text[:stop_at]
            job.scored = [s for s in job.scored if s.offset < stop_at]  # the stop string is not part of the answer
        elif eos:
            reason = "stop"
        elif len(job.generated) >= job.sampling.max_tokens:
            reason = "length"
        else:
            reason = None
        end = len(text) if reason else _safe_end(text, job.sampling.stop, job.sent_chars)
        delta, job.sent_chars = text[job.sent_chars:end], max(end, job.sent_chars)
        if reason:
            job.emit(Event(delta, reason, len(job.prompt_ids), len(job.generated) + eos, logprobs=job.scored))
        elif delta:
            job.emit(Event(delta, logprobs=job.scored))
        if reason or delta:
            job.scored = []
        return reason is not None

    def _drop(self, leaving: Callable[[Job], bool]) -> None:
        keep = [i for i, job in enumerate(self._running) if not leaving(job)]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not self._running:
            self._cache, self._length = None, 0
            return
        trim = min(job.pad for job in self._running)
        self._cache = keep_rows(self._cache, torch.tensor(keep), trim)
        for job in self._running:
            job.pad -= trim
        self._length -= trim

    def _fail_running(self, message: str) -> None:
        for job in self._running:
            job.emit(Event(error=message))
        self._running, self._cache, self._length = [], None, 0


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Draw one token. Logits are shifted so the largest is 0 before dividing: a temperature so small that the
    quotient overflows (1e-39) gives -inf to every other token, which is the greedy limit, never NaN."""
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:  # non-finite logits: fall back to the argmax
        return int(logits.argmax())
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # the smallest set reaching top_p stays
        outside[0] = False  # the most likely token stays, however small top_p is
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _score(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits, dim=-1)
    best = logprobs.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)


def _find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the earliest stop string starts, looking only where a new one can be (text already sent has none)."""
    found = [i for i in (text.find(s, max(sent - len(s) + 1, 0)) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...], sent: int) -> int:
    """How much text can be sent now: hold back a partial character and anything that may begin a stop string."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    hold = max((size for stop in stops for size in range(1, min(len(stop), end + 1))
                if text[end - size:end] == stop[:size]), default=0)
    return max(end - hold, sent)

