"""uvicorn's HTTP protocol with TCP_NODELAY set on every connection.

With `--workers` > 1 each worker's listening socket is made by serving.workers, not by
asyncio (protocol number 0), and asyncio only sets TCP_NODELAY on accepted sockets whose
protocol is IPPROTO_TCP: the response body, written after its headers, then waits for the
client's delayed ACK, about 40 ms per request on a keep-alive connection. One worker is
unaffected (asyncio binds that socket). `recsys serve` selects this class for every
worker count."""

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)  # type: ignore[arg-type]
