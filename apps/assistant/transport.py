"""The assistant's HTTP transport: uvicorn, with the deadlines it lacks and a
shutdown that ends the generations first.

uvicorn serves every connection from one event loop (no thread per
connection), parses HTTP with h11 and applies flow control, keep-alive
timeouts and graceful shutdown. It bounds neither how long a request may
take to arrive (a connection that sends half a request and stops is kept
forever) nor how long a reply write may wait for a client that does not
read. `Protocol`, its h11 protocol, adds both as timers on the loop:

- read deadline (--read-timeout): from the connection's start, or the end
  of the previous reply, until the request's last byte; then a connection
  that sent something gets 408, and it is closed;
- write deadline (--write-timeout): while uvicorn holds a reply back
  because the client does not read (the transport is over its high-water
  mark); then the connection is aborted, which the app sees as the client
  leaving (its generation is cancelled).

It also answers what h11 cannot parse in the API's JSON error shape, not
uvicorn's plain text. `Server` stops the engine (running chats end, their
turns saved) before uvicorn waits for open replies to finish.
"""

import asyncio
import json
import logging
from http import HTTPStatus

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import RequestError

log = logging.getLogger("mlx_kvq.assistant")


class Protocol(H11Protocol):
    def __init__(self, *args, read_timeout: float, write_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout, self.write_timeout = read_timeout, write_timeout
        self._reading = self._writing = None  # asyncio.TimerHandle
        self._received = 0  # bytes of the request being read

    def connection_made(self, transport):
        super().connection_made(transport)
        self._await_request()

    def connection_lost(self, exc):
        for timer in (self._reading, self._writing):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes):
        self._received += len(data)
        super().data_received(data)

    def handle_events(self):
        super().handle_events()
        cycle = self.cycle
        if (cycle is not None and not cycle.more_body and not cycle.response_complete
                and self._reading is not None):  # the request is in
            self._reading.cancel()
            self._reading = None

    def on_response_complete(self):
        self._await_request()  # first: a pipelined request in already is handled next
        super().on_response_complete()

    def _await_request(self):
        if self._reading is not None:
            self._reading.cancel()
        self._received = 0
        self._reading = self.loop.call_later(self.read_timeout, self._read_late)

    def _read_late(self):
        self._reading = None
        if self.transport.is_closing():
            return
        if self._received:
            self._refuse(RequestError(408, "the request did not arrive within "
                                      f"{self.read_timeout:g} s (--read-timeout)",
                                      code="request_timeout"))
        else:
            self.transport.close()

    def send_400_response(self, msg: str):
        self._refuse(RequestError(400, f"not an HTTP request this server reads: {msg}",
                                  code="bad_http"))

    def _refuse(self, error: RequestError):
        """Answer `error` and close, unless a reply is on its way already."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = json.dumps(error.body()).encode()
            self.transport.write(
                f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode() + body)
        self.transport.close()

    def pause_writing(self):
        super().pause_writing()
        if self._writing is None:
            self._writing = self.loop.call_later(self.write_timeout, self._write_late)

    def resume_writing(self):
        super().resume_writing()
        if self._writing is not None:
            self._writing.cancel()
            self._writing = None

    def _write_late(self):
        self._writing = None
        log.info("a client took no reply bytes for %g s (--write-timeout); dropped",
                 self.write_timeout)
        self.transport.abort()


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None):
        await asyncio.to_thread(self.engine.stop)
        await super().shutdown(sockets)

    @property
    def connections(self) -> int:
        return len(self.server_state.connections)
