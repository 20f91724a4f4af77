"""uvicorn's HTTP protocol with TCP_NODELAY on every connection and a deadline for each
request's headers.

TCP_NODELAY: with `--workers` > 1 each worker's listening socket is made by
serving.workers, not by asyncio (protocol number 0), and asyncio only sets TCP_NODELAY on
accepted sockets whose protocol is IPPROTO_TCP: the response body, written after its
headers, then waits for the client's delayed ACK, about 40 ms per request on a keep-alive
connection. One worker is unaffected (asyncio binds that socket). `recsys serve` selects
this class for every worker count.

Header deadline: uvicorn times out idle keep-alive connections only after a response, so a
client that connects and sends nothing, or sends its headers a byte at a time, held a
connection forever. Each request's headers must now arrive within
`RECSYS_HEADER_TIMEOUT_SECONDS` of the connection or of the previous response; otherwise
the connection is closed. A body gets the same kind of deadline: once the headers are in,
the whole body must arrive within `RECSYS_BODY_TIMEOUT_SECONDS`, or the connection is
closed (a client that declared 100 bytes and sent 4 held its connection forever).
"""

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.settings import ServiceSettings

_SETTINGS = ServiceSettings()  # read once per worker
HEADER_TIMEOUT_SECONDS = _SETTINGS.header_timeout_seconds
BODY_TIMEOUT_SECONDS = _SETTINGS.body_timeout_seconds


class NoDelayH11Protocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None
    _body_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def _reading_body(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body

    def _expire_body(self) -> None:
        self._body_deadline = None
        if self._reading_body() and not self.transport.is_closing():
            self.transport.close()  # the app's receive() then sees http.disconnect

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()
        super().data_received(data)
        if not self._waiting_for_headers():  # the headers are in: the request runs
            self._disarm()
            if self._reading_body():
                if self._body_deadline is None:
                    self._body_deadline = self.loop.call_later(
                        BODY_TIMEOUT_SECONDS, self._expire_body
                    )
            elif self._body_deadline is not None:
                self._body_deadline.cancel()
                self._body_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # between requests, uvicorn's keep-alive timeout applies
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None
        super().connection_lost(exc)
