"""Request bodies of the HTTP API (pydantic), OpenAI's error shape, and the checks that refuse by name what the
server cannot honour (tools, structured output, non-text content parts, strings that are not valid Unicode),
rather than ignoring it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- request bodies -------------------------------------------------------------------------------------------
class Body(BaseModel):
    """A request body whose every string is valid Unicode: JSON's `\\ud800` escapes can carry a lone surrogate,
    which no tokenizer or UTF-8 encoder takes."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data, "")
        return data


def _check_unicode(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError("invalid_unicode", "{where}: not valid Unicode (a lone surrogate at "
                                      "character {at})", {"where": where or "body", "at": exc.start}) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where or "body")
            _check_unicode(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}.{i}")


class Generation(Body):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what a torch generator takes
    # OpenAI fields this server cannot honour: refused by name (400), never silently ignored
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    n: int = 1
    stream: bool = False
    logprobs: Any = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate max_tokens tokens whatever the model says


class CompletionRequest(Generation):
    prompt: str | list[str]
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatRequest(Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None


class AdapterRequest(Body):
    name: str
    path: str


def refuse_unsupported(body: Generation) -> None:
    """Tools, functions and structured output change what an answer must be: refuse them rather than ignore."""
    for field in ("tools", "functions"):
        if getattr(body, field):
            raise APIError(400, f"{field}: tool and function calling are not supported", param=field)
    for field in ("tool_choice", "function_call"):
        if getattr(body, field) not in (None, "none"):
            raise APIError(400, f"{field}: tool and function calling are not supported", param=field)
    fmt = body.response_format
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text" and len(fmt) == 1):
        raise APIError(400, "response_format: only plain text answers are supported", param="response_format")


def message_text(content: str | list[dict[str, Any]], where: str) -> str:
    """A message's text: a string, or text parts joined; other parts (images, audio, files) are refused."""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = f"type {kind!r}" if kind != "text" else "a text part without a string 'text'"
            raise APIError(400, f"{where}.{j}: {shown} is not supported; this server takes text only",
                           param=f"{where}.{j}.type" if kind != "text" else f"{where}.{j}.text")
    return "".join(part["text"] for part in content)
