"""From a validated request to engine jobs, and from their events to OpenAI's response shapes.

A request with `n` choices becomes `n` jobs sharing one prompt list, which the engine prefills once; choice i
samples with `seed + i`. Log-probabilities come from the engine per token (log_softmax of the model's logits)
and are laid out here in the legacy completions shape (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) or the chat shape (`content: [{token, logprob, bytes, top_logprobs}]`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from ..core.errors import AdapterNameError
from .bodies import APIError, ChatRequest, CompletionRequest, Generation, error_body, message_text, refuse_unsupported
from .registry import AdapterRegistry
from .scheduler import Engine, Event, Job, QueueFull, Sampling, TokenLogprob

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    body_seconds: float = 30.0  # a body must arrive whole within this (uvicorn has no read timeout of its own)
    max_positions: int | None = None  # the model's context length, when it has one


# --- the request ----------------------------------------------------------------------------------------------
def single_prompt(body: CompletionRequest) -> str:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: this server takes one prompt per request", param="prompt")
        prompt = prompt[0]
    if body.echo:
        raise APIError(400, "echo: not supported", param="echo")
    return prompt


def chat_ids(engine: Engine, body: ChatRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                       param="messages")
    messages = [{"role": m.role, "content": message_text(m.content, f"messages.{i}.content")}
                for i, m in enumerate(body.messages)]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that refuses a role or an order of turns
        raise APIError(400, f"messages: the chat template refused them ({exc})", param="messages") from None
    with engine.tokenizer_lock:
        return tokenizer(text, add_special_tokens=False).input_ids


def logprobs_asked(body: Generation, chat: bool) -> int | None:
    """How many alternatives each token's log-probability comes with; None: no log-probabilities.
    Completions take `logprobs: 0-5`; chat takes `logprobs: true` with `top_logprobs: 0-20`."""
    asked, top = body.logprobs, getattr(body, "top_logprobs", None)
    if not chat:
        if asked is None:
            return None
        if isinstance(asked, bool) or not isinstance(asked, int) or not 0 <= asked <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs: a whole number from 0 to {MAX_COMPLETION_LOGPROBS}", param="logprobs")
        return asked
    if asked is not None and not isinstance(asked, bool):
        raise APIError(400, "logprobs: true or false", param="logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs: a whole number from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if not asked:
        if top:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def sampling_for(body: Generation, prompt_tokens: int, limits: Limits, chat: bool) -> Sampling:
    if prompt_tokens == 0:
        raise APIError(400, "prompt: the prompt is empty", param="prompt")
    if prompt_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"prompt: {prompt_tokens} tokens, more than the server's limit of "
                            f"{limits.max_prompt_tokens}", param="messages" if chat else "prompt")
    room = limits.max_tokens if limits.max_positions is None else min(limits.max_tokens,
                                                                       limits.max_positions - prompt_tokens)
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is None:
        asked = room if chat else min(16, room)  # OpenAI's completions default is 16 tokens
    if asked > limits.max_tokens:
        raise APIError(400, f"max_tokens: {asked} is more than the server's limit of {limits.max_tokens}",
                       param="max_tokens")
    if asked > room or room < 1:
        raise APIError(400, f"max_tokens: the prompt ({prompt_tokens} tokens) plus {asked} new tokens exceed the "
                            f"model's {limits.max_positions} positions", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
    return Sampling(max_tokens=asked, temperature=body.temperature, top_p=body.top_p, stop=tuple(stop),
                    seed=body.seed, ignore_eos=body.ignore_eos, logprobs=logprobs_asked(body, chat))


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request samples with seed + i (kept in a torch generator's range)."""
    return seed if seed is None or index == 0 else (seed + index) % (1 << 64)


# --- running it -----------------------------------------------------------------------------------------------
async def generate(engine: Engine, registry: AdapterRegistry, limits: Limits, body: Generation, ids: list[int],
                   chat: bool):
    if body.model in registry.busy:
        raise APIError(404, f"model {body.model!r} is being loaded or removed", param="model",
                       code="model_not_found")
    try:
        adapter = registry.adapter_for(body.model)
    except AdapterNameError as exc:
        raise APIError(404, str(exc), "invalid_request_error", param="model", code="model_not_found") from None
    refuse_unsupported(body)
    if not 1 <= body.n <= engine.max_batch:
        raise APIError(400, f"n: from 1 to the server's --max-batch of {engine.max_batch}", param="n")
    sampling = sampling_for(body, len(ids), limits, chat)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def emitter(index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed: the server is stopping
                pass
        return emit

    jobs = [Job(ids, adapter, replace(sampling, seed=_choice_seed(sampling.seed, i)), emitter(i))
            for i in range(body.n)]  # one prompt list: the engine prefills it once
    try:
        engine.submit(*jobs)
    except QueueFull as exc:
        raise APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                       code="queue_full") from None
    tokens = _TokenText(engine) if sampling.logprobs is not None else None
    shape = (ChatShape if chat else CompletionShape)(body.model, tokens)
    if body.stream:
        return StreamingResponse(_stream(engine, jobs, events, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    choices = [_Choice() for _ in jobs]
    try:
        while any(c.finish_reason is None for c in choices):
            index, event = await events.get()
            if event.error:
                raise APIError(500, event.error, "server_error")
            choices[index].add(event)
        return shape.whole(choices, _usage(len(ids), sum(c.completion_tokens for c in choices)))
    finally:
        for job in jobs:
            engine.cancel(job)  # no-op once finished; frees the rows if this handler is cancelled


async def _stream(engine: Engine, jobs: list[Job], events: asyncio.Queue, shape) -> AsyncIterator[str]:
    """Chunks as the choices' events come; the usage (all choices together) rides on the last one."""
    try:
        for index in range(len(jobs)):
            first = shape.first(index)
            if first is not None:
                yield _sse(first)
        finished, completion_tokens = 0, 0
        while finished < len(jobs):
            index, event = await events.get()
            if event.error:
                yield _sse(error_body(event.error, "server_error"))
                break
            if event.finish_reason:
                finished, completion_tokens = finished + 1, completion_tokens + event.completion_tokens
            usage = _usage(event.prompt_tokens, completion_tokens) if event.finish_reason and finished == len(jobs) \
                else None
            if event.text or event.finish_reason:
                yield _sse(shape.chunk(index, event, usage))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            engine.cancel(job)  # the client went away (or we are done): free the rows


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class _Choice:
    """One choice's answer, gathered from its events."""

    parts: list[str] = field(default_factory=list)
    scored: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, event: Event) -> None:
        self.parts.append(event.text)
        self.scored += event.logprobs
        if event.finish_reason:
            self.finish_reason, self.completion_tokens = event.finish_reason, event.completion_tokens


# --- OpenAI's shapes ------------------------------------------------------------------------------------------
class _TokenText:
    """Tokens as text for log-probabilities: each id decoded alone (special tokens shown), under the lock the
    engine thread shares; `bytes` are that text's UTF-8."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, scored: list[TokenLogprob]) -> list[tuple[str, list[str]]]:
        with self.engine.tokenizer_lock:
            decode = self.engine.tokenizer.decode
            return [(decode([s.token]), [decode([t]) for t, _ in s.top]) for s in scored]


class CompletionShape:
    def __init__(self, model: str, tokens: _TokenText | None) -> None:
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex}", model, int(time.time())
        self.tokens = tokens

    def _envelope(self, choices: list[dict], usage: dict | None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _choice(self, index: int, text: str, finish_reason: str | None, scored: list[TokenLogprob]) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(scored), "finish_reason": finish_reason}

    def _logprobs(self, scored: list[TokenLogprob]) -> dict | None:
        """The legacy shape: the top dict holds the `logprobs` best tokens and the chosen one."""
        if self.tokens is None:
            return None
        texts = self.tokens(scored)
        return {"tokens": [text for text, _ in texts], "token_logprobs": [s.logprob for s in scored],
                "top_logprobs": [{**{t: lp for t, (_, lp) in zip(top, s.top)}, text: s.logprob}
                                 for s, (text, top) in zip(scored, texts)],
                "text_offset": [s.offset for s in scored]}

    def whole(self, choices: list[_Choice], usage: dict) -> dict:
        return self._envelope([self._choice(i, "".join(c.parts), c.finish_reason, c.scored)
                               for i, c in enumerate(choices)], usage)

    def first(self, index: int) -> None:
        return None

    def chunk(self, index: int, event: Event, usage: dict | None) -> dict:
        return self._envelope([self._choice(index, event.text, event.finish_reason, event.logprobs)], usage)


class ChatShape:
    def __init__(self, model: str, tokens: _TokenText | None) -> None:
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())
        self.tokens = tokens

    def _envelope(self, kind: str, choices: list[dict], usage: dict | None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _logprobs(self, scored: list[TokenLogprob]) -> dict | None:
        if self.tokens is None:
            return None

        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(text, s.logprob),
                             "top_logprobs": [entry(t, lp) for t, (_, lp) in zip(top, s.top)]}
                            for s, (text, top) in zip(scored, self.tokens(scored))], "refusal": None}

    def whole(self, choices: list[_Choice], usage: dict) -> dict:
        return self._envelope("chat.completion", [
            {"index": i, "message": {"role": "assistant", "content": "".join(c.parts)},
             "logprobs": self._logprobs(c.scored), "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)], usage)

    def first(self, index: int) -> dict:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return self._envelope("chat.completion.chunk", [choice], None)

    def chunk(self, index: int, event: Event, usage: dict | None) -> dict:
        delta = {"content": event.text} if event.text else {}
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(event.logprobs),
                  "finish_reason": event.finish_reason}
        return self._envelope("chat.completion.chunk", [choice], usage)
