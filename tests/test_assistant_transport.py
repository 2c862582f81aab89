"""The assistant's transport (apps/assistant/transport.py): uvicorn's h11
protocol with a read deadline, a write deadline and JSON 400s, served
in-process around a small Starlette app (no model)."""

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from mlx_kvq.apps.assistant.transport import Protocol

READ, WRITE = 1.0, 0.5


@pytest.fixture
def served():
    """(port, the event set when the endless stream ends)."""
    ended = threading.Event()

    async def endless(request):
        async def body():
            try:
                while True:  # waits for each chunk, as a reply waits for tokens
                    await asyncio.sleep(0)
                    yield b"x" * 65536
            finally:
                ended.set()
        return StreamingResponse(body())

    async def echo(request):
        return PlainTextResponse((await request.body()).decode())

    async def slow(request):
        await asyncio.sleep(READ + 0.5)
        return PlainTextResponse("late")

    app = Starlette(routes=[Route("/endless", endless), Route("/slow", slow),
                            Route("/echo", echo, methods=["POST"])])
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_config=None, http=lambda **kw: Protocol(
        read_timeout=READ, write_timeout=WRITE, **kw))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1], ended
    server.should_exit = True
    thread.join(10)


def connect(port: int, rcvbuf=None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_request_that_does_not_arrive_in_time_gets_408(served):
    port, _ = served
    half, silent, whole = connect(port), connect(port), connect(port)
    t = time.monotonic()
    half.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    whole.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert read_all(silent) == b""  # nothing sent: closed, no answer
    reply = read_all(half)
    assert READ <= time.monotonic() - t < READ + 2
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert whole.recv(4096).startswith(b"HTTP/1.1 200 ")  # in time: answered


def test_the_deadline_is_for_arriving_not_answering(served):
    """A pipelined request that is in is answered however long it takes."""
    port, _ = served
    s = connect(port)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
              b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    replies = read_all(s)
    assert replies.count(b"HTTP/1.1 200 ") == 2 and replies.endswith(b"late"), replies


def test_what_h11_cannot_parse_gets_the_json_error(served):
    port, _ = served
    s = connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n")
    head, _, body = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "bad_http"


def test_a_client_that_does_not_read_is_dropped(served):
    port, ended = served
    s = connect(port, rcvbuf=4096)
    s.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    t = time.monotonic()
    assert ended.wait(WRITE + 5), "the reply to a client that never reads went on"
    assert time.monotonic() - t >= WRITE
    s.close()
