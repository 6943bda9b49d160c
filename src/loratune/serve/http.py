"""uvicorn's HTTP/1.1 protocol with a deadline for request headers.

uvicorn (h11) times out only an idle keep-alive connection, and cancels that timer as soon as any byte arrives:
a client that sends half its headers and stalls holds its connection forever. Here every request's headers
must be complete within `header_timeout` seconds of the connection opening or the previous response ending;
otherwise the client is answered 408 in OpenAI's error shape and the connection closed. Request bodies have
their own deadline (`--body-timeout`, in app.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

_MESSAGE = "the request headers did not arrive in time"


class HeaderTimeoutProtocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _header_deadline(self) -> None:
        """Still waiting for this request's headers (h11's client state IDLE): answer 408 and close."""
        self.header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        body = json.dumps({"error": {"message": _MESSAGE, "type": "invalid_request_error", "param": None,
                                     "code": "request_timeout"}}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def uvicorn_config(app: Any, header_timeout: float, log_level: str = "warning") -> uvicorn.Config:
    """The server's uvicorn settings: h11 with the header deadline, a short graceful shutdown."""
    protocol = functools.partial(HeaderTimeoutProtocol, header_timeout=header_timeout)
    return uvicorn.Config(app, http=protocol, log_level=log_level, timeout_graceful_shutdown=5)  # type: ignore[arg-type]
