"""mlx_kvq.assistant: serve the chat page and an OpenAI-compatible API locally.

    GET  /                                      the chat page
    GET  /v1/models, POST /v1/chat/completions  OpenAI-compatible API
    GET  /api/info                              model, KV scheme, budget
    GET, POST /api/conversations                list, create
    GET, PATCH, DELETE /api/conversations/<id>  messages and memory, rename, delete
    POST /api/conversations/<id>/messages       a turn, as server-sent events
    POST /api/conversations/<id>/documents      add a document (prefilled), as events

Only requests whose Host header names this server are served (DNS
rebinding), and browser requests only from its own page unless
--allow-origin says otherwise.

Slow and hostile clients cannot hold the server: a request's line, headers
and body must arrive within --read-timeout seconds in all, however slowly
they trickle (one that does not gets 408 and is closed), a
reply write that cannot progress for --write-timeout seconds drops the
client and cancels its generation, and at most --max-connections
connections are served at once: more are answered 503 at once and closed.
A client that disconnects while its reply is generated, streamed or not,
cancels it; the chat leaves the batch and its turn is saved as far as it got.
"""

import argparse
import io
import ipaddress
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mlx_kvq import distributed, units
from mlx_kvq.commands.cli_types import (add_model, add_prefill_step_size, add_sharding, nonneg_int,
                                        positive_int, seconds)
from mlx_kvq.models import data_home
from mlx_kvq.spec import DEFAULT_PRESET, PRESETS, parse_spec

from . import openai_api, ranks
from .engine import Engine, Job, Settings
from .errors import RequestError, busy
from .store import NotFound, Store, clean_title, title_of, validate_id

log = logging.getLogger("mlx_kvq.assistant")

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
DOCUMENT_SUFFIXES = ("", ".txt", ".md")
DRAIN_BYTES = 64 << 20  # an oversize body up to this is read so the client sees the 413
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"", "0.0.0.0", "::"}
HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?")

ROUTES = [
    (r"/", {"GET": "page"}),
    (r"/static/([A-Za-z0-9_.-]+)", {"GET": "static"}),
    (r"/v1/models", {"GET": "models"}),
    (r"/v1/chat/completions", {"POST": "chat_completions"}),
    (r"/api/info", {"GET": "info"}),
    (r"/api/conversations", {"GET": "list_conversations", "POST": "create_conversation"}),
    (r"/api/conversations/([^/]+)", {"GET": "get_conversation",
                                     "PATCH": "rename_conversation",
                                     "DELETE": "delete_conversation"}),
    (r"/api/conversations/([^/]+)/messages", {"POST": "post_message"}),
    (r"/api/conversations/([^/]+)/documents", {"POST": "post_document"}),
]


def host_allowed(header: str, bound: str, port: int) -> bool:
    """Whether a Host header names this server."""
    m = HOST_RE.fullmatch(header.strip().lower())
    if not m or int(m.group(2) or 80) != port:
        return False
    name = m.group(1).strip("[]")
    if bound in WILDCARD:
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in {"localhost", socket.gethostname().lower(),
                            socket.getfqdn().lower()}
    return name in (LOOPBACK if bound in LOOPBACK else {bound.lower()})


class Deadline(io.RawIOBase):
    """A socket's reading side with a deadline for a whole request: each read
    waits only for what is left of it, so bytes trickling in one at a time
    cannot hold a connection past it."""

    def __init__(self, sock: socket.socket, write_timeout: float):
        self.sock, self.write_timeout = sock, write_timeout
        self.deadline = None  # time.monotonic() by which the request must be in
        self.received = 0  # bytes of this request so far

    def readable(self) -> bool:
        return True

    def start(self, seconds: float):
        self.deadline, self.received = time.monotonic() + seconds, 0

    def readinto(self, buf) -> int:
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise socket.timeout("the request did not arrive in time")
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buf)
        finally:  # writes get their own timeout
            self.sock.settimeout(self.write_timeout)
        self.received += n
        return n


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of connects is not dropped

    def __init__(self, host: str, port: int, engine: Engine, store: Store,
                 allow_origins=(), max_body: int = 4 << 20, max_connections: int = 64,
                 read_timeout: float = 30.0, write_timeout: float = 30.0):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.host, self.engine, self.store = host, engine, store
        self.allow_origins = set(allow_origins)
        self.max_body = max_body
        self.max_connections = max_connections
        self.read_timeout, self.write_timeout = read_timeout, write_timeout
        self.connections = 0  # being served now
        self.refused = 0  # refused because max_connections were being served
        self._count = threading.Lock()
        self.started = int(time.time())
        self.static = {p.name: (p.read_bytes(), CONTENT_TYPES[p.suffix])
                       for p in STATIC.iterdir() if p.suffix in CONTENT_TYPES}

    def process_request(self, request, client_address):
        with self._count:
            full = self.connections >= self.max_connections
            self.connections += not full
            self.refused += full
        if full:
            self._refuse(request)
        else:
            super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count:
                self.connections -= 1

    def _refuse(self, sock: socket.socket):
        """Answer 503 without waiting for anything (this is the accept loop)."""
        body = json.dumps(busy(
            f"the server is serving its limit of {self.max_connections} connections "
            "(--max-connections); try again shortly").body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\n"
                "Connection: close\r\n\r\n").encode()
        sock.setblocking(False)
        try:
            try:  # what already arrived, so that closing does not reset the reply
                sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                pass
            sock.send(head + body)
        except OSError:
            pass
        self.shutdown_request(sock)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in WILDCARD else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_port}/"


class Handler(BaseHTTPRequestHandler):
    server_version = "mlx_kvq.assistant"

    def setup(self):
        super().setup()
        self.reader = Deadline(self.connection, self.server.write_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.connection.settimeout(self.server.write_timeout)

    def handle_one_request(self):
        self.reader.start(self.server.read_timeout)
        self._cors, self._sent = None, False
        self.requestline, self.request_version, self.command = "", "HTTP/1.0", None
        super().handle_one_request()  # a read that times out closes the connection
        if self.close_connection and not self._sent and self.reader.received and (
                self.reader.deadline <= time.monotonic()):
            self._fail(RequestError(408, "the request did not arrive within "
                                    f"{self.server.read_timeout:g} s (--read-timeout)",
                                    code="request_timeout"))

    def send_error(self, code, message=None, explain=None):
        """Errors of the HTTP layer (bad request line or headers, unknown
        method) in the API's JSON shape."""
        if code == 501:  # a method no route has
            code, message = 405, f"{self.command} is not allowed"
        self.close_connection = True
        self._fail(RequestError(code, message or self.responses.get(code, ("error",))[0]))

    def version_string(self):
        return self.server_version

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------

    def _dispatch(self, method: str):
        self._cors, self._sent = None, False
        try:
            self._check_host()
            self._check_origin(method)
            if method == "OPTIONS":
                return self._head(204, length=0)
            name, args = self._route(method)
            getattr(self, name)(*args)
        except RequestError as e:
            log.info("%s %s -> %d: %s", method, self.path[:200], e.status, e.message)
            self._fail(e)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as e:
            log.exception("%s %s failed", method, self.path[:200])
            self._fail(RequestError(500, f"internal error: {type(e).__name__}: {e}"))

    def _fail(self, e: RequestError):
        if self._sent:  # mid-stream: nothing sensible can follow
            self.close_connection = True
            return
        try:
            self._send_json(e.status, e.body())
        except OSError:
            self.close_connection = True

    def _check_host(self):
        host = self.headers.get("Host")
        if not host or not host_allowed(host, self.server.host, self.server.server_port):
            raise RequestError(403, f"Host {host!r} does not name this server; it answers "
                               f"at {self.server.url}", code="bad_host")

    def _check_origin(self, method: str):
        origin = self.headers.get("Origin")
        site = self.headers.get("Sec-Fetch-Site")
        if origin == f"http://{self.headers['Host']}":
            return
        if origin is None and (site in (None, "same-origin", "none") or (
                method == "GET" and self.headers.get("Sec-Fetch-Mode") == "navigate")):
            return
        allowed = self.server.allow_origins
        if "*" in allowed or origin in allowed:
            self._cors = origin or "*"
            return
        raise RequestError(403, f"cross-origin request from {origin or site!r} refused; "
                           "start the server with --allow-origin ORIGIN to allow it",
                           code="cross_origin")

    def _route(self, method: str):
        path = urlsplit(self.path).path
        for pattern, methods in ROUTES:
            m = re.fullmatch(pattern, path)
            if m:
                if method not in methods:
                    raise RequestError(405, f"{method} is not allowed on {path}")
                return methods[method], [unquote(g) for g in m.groups()]
        raise RequestError(404, f"no such endpoint: {path}")

    def _head(self, status: int, ctype=None, length=None, extra=None):
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        if self._cors:
            self.send_header("Access-Control-Allow-Origin", self._cors)
            self.send_header("Vary", "Origin")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE")
            self.send_header("Access-Control-Allow-Headers",
                             "Authorization, Content-Type, X-Conversation-Id")
            self.send_header("Access-Control-Expose-Headers", "X-Conversation-Id")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self._sent = True

    def _send_json(self, status: int, obj, extra=None):
        body = json.dumps(obj).encode()
        self._head(status, "application/json", len(body), extra)
        self.wfile.write(body)

    def _write(self, text: str):
        self.wfile.write(text.encode())
        self.wfile.flush()

    def _event(self, kind: str, data):
        self._write(f"event: {kind}\ndata: {json.dumps(data)}\n\n")

    def _read_json(self, optional: bool = False) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None and optional:
            return {}
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n > self.server.max_body:
            self._discard(n)
            raise RequestError(413, f"the request body is {n} bytes, over the limit of "
                               f"{self.server.max_body} (--max-body-bytes)",
                               code="request_too_large")
        try:
            raw = self.rfile.read(n)
        except socket.timeout:
            self.close_connection = True
            raise RequestError(408, f"the request body did not arrive within "
                               f"{self.server.read_timeout:g} s (--read-timeout)",
                               code="request_timeout") from None
        if len(raw) < n:
            raise RequestError(400, "the request body is shorter than its Content-Length")
        if not raw.strip() and optional:
            return {}
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}",
                               code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object",
                               code="invalid_json")
        return body

    def _discard(self, n: int):
        self.close_connection = True
        # A client that only sent headers gets its 413 soon.
        self.reader.deadline = min(self.reader.deadline, time.monotonic() + 2.0)
        left = min(n, DRAIN_BYTES)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (socket.timeout, ConnectionError):
            pass

    def _conversation(self, cid: str):
        try:
            validate_id(cid)
        except ValueError as e:
            raise RequestError(400, str(e), param="conversation") from None
        if not self.server.store.exists(cid):
            raise RequestError(404, f"no conversation {cid}")

    def _begin(self, job: Job) -> dict:
        """Queue a job and wait until it starts; its refusal raises here, before
        any response is sent, so it gets its own status code."""
        self.server.engine.submit(job)
        for kind, data in self._events(job):
            if kind == "error":
                raise data
            if kind == "start":
                return data

    def _pump(self, job: Job, send):
        """Forward a started job's events; a client that leaves, or does not
        take a write within --write-timeout, cancels the job."""
        try:
            for kind, data in self._events(job):
                send(kind, data.body()["error"] if kind == "error" else data)
        except (ConnectionError, socket.timeout) as e:
            log.info("conversation %s: the client left (%s); its reply is cancelled",
                     job.conversation, type(e).__name__)
            job.cancelled.set()
            self.close_connection = True

    def _events(self, job: Job):
        """The job's events; a client that disconnects meanwhile cancels it."""
        return job.stream(self.server.engine.alive, gone=self._gone)

    def _gone(self) -> bool:
        """Whether the client has closed the connection: it is readable, and
        there is nothing to read (the request was read whole)."""
        try:  # poll, not select: any descriptor number; recv waits for nothing then
            ready = select.poll()
            ready.register(self.connection, select.POLLIN)
            return bool(ready.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    # -- page -------------------------------------------------------------

    def page(self):
        self.static("index.html")

    def static(self, name: str):
        if name not in self.server.static:
            raise RequestError(404, f"no such file: {name}")
        body, ctype = self.server.static[name]
        self._head(200, ctype, len(body), PAGE_HEADERS)
        self.wfile.write(body)

    def info(self):
        engine, b = self.server.engine, self.server.engine.budget
        s = engine.settings
        self._send_json(200, {
            "model": engine.model_id, "spec": ", ".join(engine.specs),
            "scheme": engine.scheme, "budget": b.memory,
            "weights": b.shape.weight_bytes,
            "max_tokens_per_conversation": engine.token_limit()[0],
            "trained_context": b.shape.trained_context, "max_kv_size": s.max_kv_size,
            "max_tokens": s.max_tokens, "max_body_bytes": self.server.max_body,
            "queued": engine.queued(), "queue_size": s.queue_size,
            "running": engine.running(), "connections": self.server.connections,
            "max_connections": self.server.max_connections,
            "refused_connections": self.server.refused,
            "peak_memory": engine.peak_memory(),
            "sharding": engine.link and {"sharding": engine.link.shard.sharding,
                                         "ranks": engine.link.shard.size},
            "data_dir": str(self.server.store.root),
        })

    def list_conversations(self):
        convs = [c.summary() for c in self.server.store.list()]
        self._send_json(200, {"conversations": convs})

    def create_conversation(self):
        body = self._read_json(optional=True)
        try:
            conv = self.server.store.create(body.get("title"))
        except ValueError as e:
            raise RequestError(400, str(e), param="title") from None
        self._send_json(201, {"conversation": asdict(conv)})

    def get_conversation(self, cid: str):
        self._conversation(cid)
        conv = self.server.store.get(cid)
        self._send_json(200, {"conversation": asdict(conv),
                              "memory": self.server.engine.memory(cid)})

    def rename_conversation(self, cid: str):
        self._conversation(cid)
        try:
            title = clean_title(self._read_json().get("title"))
        except ValueError as e:
            raise RequestError(400, str(e), param="title") from None
        conv = self.server.store.update(cid, lambda c: setattr(c, "title", title))
        self._send_json(200, {"conversation": conv.summary()})

    def delete_conversation(self, cid: str):
        self._conversation(cid)
        try:
            self.server.store.delete(cid)
        except NotFound:
            raise RequestError(404, f"no conversation {cid}") from None
        self.server.engine.forget(cid, deleted=True)
        self._send_json(200, {"deleted": cid})

    def post_message(self, cid: str):
        self._conversation(cid)
        body, s = self._read_json(), self.server.engine.settings
        content = body.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RequestError(400, "content must be a non-empty string", param="content")
        job = Job("chat", cid, [{"role": "user", "content": content}],
                  max_tokens=openai_api.integer(body, "max_tokens", s.max_tokens, 1),
                  temperature=openai_api.number(body, "temperature", s.temp, 0.0, 2.0),
                  top_p=s.top_p)
        self._page_stream(job)

    def post_document(self, cid: str):
        self._conversation(cid)
        body = self._read_json()
        name, text = body.get("name") or "pasted text", body.get("text")
        if not isinstance(name, str) or len(name) > 200:
            raise RequestError(400, "name must be a string of at most 200 characters",
                               param="name")
        name = Path(name).name  # shown only, never a path
        if Path(name).suffix.lower() not in DOCUMENT_SUFFIXES:
            raise RequestError(400, "documents are .txt or .md files", param="name")
        if not isinstance(text, str) or not text.strip():
            raise RequestError(400, "text must be a non-empty string", param="text")
        message = {"role": "user", "content": f'Document "{name}":\n\n{text}',
                   "document": {"name": name, "chars": len(text)}}
        self._page_stream(Job("document", cid, [message]))

    def _page_stream(self, job: Job):
        start = self._begin(job)
        self._head(200, "text/event-stream")
        self._event("start", start)
        self._pump(job, self._event)

    # -- OpenAI API -------------------------------------------------------

    def models(self):
        self._send_json(200, openai_api.models_body(self.server.engine.model_id,
                                                    self.server.started))

    def chat_completions(self):
        engine = self.server.engine
        req = openai_api.parse_chat(self._read_json(), self.headers.get("X-Conversation-Id"),
                                    engine.settings)
        cid, messages, new = openai_api.resolve_conversation(self.server.store, req)
        job = Job("chat", cid, messages, max_tokens=req.max_tokens,
                  temperature=req.temperature, top_p=req.top_p, stop=req.stop,
                  seed=req.seed, title=title_of(messages) if new else None)
        start = self._begin(job)
        reply = openai_api.Reply(engine.model_id, cid)
        headers = {"X-Conversation-Id": cid}
        if not req.stream:
            text, done = [], None
            for kind, data in self._events(job):
                if kind == "error":
                    raise data
                if kind == "text":
                    text.append(data)
                done = data if kind == "done" else done
            self._send_json(200, reply.completion("".join(text), done["finish_reason"],
                                                  done["usage"], start["notice"]), headers)
            return
        self._head(200, "text/event-stream", extra=headers)
        first = reply.chunk({"role": "assistant", "content": ""})
        if start["notice"]:
            first["notice"] = start["notice"]
        self._write(f"data: {json.dumps(first)}\n\n")

        def send(kind, data):
            if kind == "progress":  # keeps the connection alive through a long prefill
                self._write(f": prefill {data['done']}/{data['total']}\n\n")
            elif kind == "text":
                self._write(f"data: {json.dumps(reply.chunk({'content': data}))}\n\n")
            elif kind == "error":
                self._write(f"data: {json.dumps({'error': data})}\n\n")
            elif kind == "done":
                last = reply.chunk({}, data["finish_reason"])
                self._write(f"data: {json.dumps(last)}\n\n")
                if req.include_usage:
                    self._write(f"data: {json.dumps(reply.usage_chunk(data['usage']))}\n\n")
                self._write("data: [DONE]\n\n")

        self._pump(job, send)


# -- CLI ----------------------------------------------------------------------


def default_data_dir() -> Path:
    """$MLX_KVQ_HOME/assistant, else $XDG_DATA_HOME/mlx_kvq/assistant, else
    ~/.local/share/mlx_kvq/assistant."""
    return data_home() / "assistant"


def port(text: str) -> int:
    n = nonneg_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return n


def setup_arg_parser():
    p = argparse.ArgumentParser(
        description="Local long-context assistant on quantized KV caches: a chat page "
        "and an OpenAI-compatible API (/v1/chat/completions).")
    add_model(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8080, help="Port (0: any free port)")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=512,
                   help="Default maximum tokens of a reply")
    p.add_argument("--temp", type=float, default=0.0, help="Default sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="Default nucleus sampling top-p")
    p.add_argument("--kv", default=None,
                   help=f"KV cache spec: a preset ({', '.join(PRESETS)}) or a label like "
                   f"k4v2-g32-r64-s4 (default: the plan baked into a calibrated model "
                   f"folder, else {DEFAULT_PRESET})")
    p.add_argument("--data-dir", default=None,
                   help=f"Where conversations and their caches live (default "
                   f"{default_data_dir()})")
    p.add_argument("--memory", default=None,
                   help="Memory budget for weights, prefill workspace and KV caches, e.g. "
                   "8GB (default: half of this machine's RAM)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="Also accept browser requests from this origin, e.g. "
                   "http://localhost:3000 (repeatable; '*' for any)")
    p.add_argument("--max-kv-size", type=positive_int, default=None,
                   help="Keep at most this many tokens per conversation (sinks plus the "
                   "most recent); allows conversations beyond the trained context")
    add_prefill_step_size(p)
    p.add_argument("--queue-size", type=positive_int, default=8,
                   help="Requests that may wait to start; more are answered 503")
    p.add_argument("--decode-concurrency", type=positive_int, default=32,
                   help="Chats answered together (continuous batching); more wait")
    p.add_argument("--prompt-concurrency", type=positive_int, default=8,
                   help="Prompts prefilled together; they share the "
                   "--prefill-step-size workspace")
    p.add_argument("--max-body-bytes", type=positive_int, default=4 << 20,
                   help="Largest request body, documents included; larger ones get 413")
    p.add_argument("--max-connections", type=positive_int, default=64,
                   help="Connections served at once (each holds a thread); more are "
                   "answered 503 at once")
    p.add_argument("--read-timeout", type=seconds, default=30.0,
                   help="Seconds a request's line, headers and body may take to arrive, "
                   "in all; a slower one gets 408 and is closed")
    p.add_argument("--write-timeout", type=seconds, default=30.0,
                   help="Seconds a reply write may wait for a client that does not read; "
                   "then the client is dropped and its generation cancelled")
    add_sharding(p, "Rank 0 serves")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        spec = parse_spec(args.kv) if args.kv else None
        if args.max_kv_size:  # too small for the spec?
            parse_spec(spec or DEFAULT_PRESET).check_max_size(args.max_kv_size)
        memory = units.parse_memory(args.memory) if args.memory else None
    except ValueError as e:
        parser.error(str(e))
    settings = Settings(model=args.model, kv=spec and str(spec), memory=memory,
                        max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
                        max_kv_size=args.max_kv_size,
                        prefill_step_size=args.prefill_step_size,
                        queue_size=args.queue_size,
                        decode_concurrency=args.decode_concurrency,
                        prompt_concurrency=args.prompt_concurrency,
                        sharding=args.sharding, peer_timeout=args.peer_timeout)
    data_dir = args.data_dir or default_data_dir()
    rank = distributed.init().rank() if args.sharding else 0
    if rank:  # a follower: no server, its share of every cache
        sys.exit(ranks.follow(Engine(settings, Store(ranks.follower_data_dir(data_dir, rank)))))
    store = Store(data_dir)
    engine = Engine(settings, store)
    try:
        engine.start()
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: a rank lost at start
        if not args.sharding:
            parser.exit(2, f"mlx_kvq.assistant: error: {e}\n")
        print(f"mlx_kvq.assistant: error: rank 0: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # see the end of main
    try:
        server = Server(args.host, args.port, engine, store, args.allow_origin,
                        args.max_body_bytes, args.max_connections, args.read_timeout,
                        args.write_timeout)
    except OSError as e:  # port in use, host not on this machine
        engine.stop()
        parser.exit(2, f"mlx_kvq.assistant: error: cannot listen on {args.host}:{args.port}: "
                    f"{e}\n")
    limit, limited_by = engine.token_limit()
    print(f"mlx_kvq.assistant: {engine.model_id}, KV cache {', '.join(engine.specs)} "
          f"({engine.scheme})\n"
          f"memory budget {units.fmt_bytes(engine.budget.memory)}: up to {limit} tokens in "
          f"a conversation ({limited_by}); {len(store.list())} conversations in "
          f"{store.root}\n"
          + (f"sharded ({args.sharding}) over {engine.link.shard.size} ranks: this rank holds "
             f"{engine.link.shard.describe().split(': ', 1)[1]}\n" if engine.link else "") +
          f"serving {server.url} (OpenAI API: {server.url}v1)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.stop()
        log.info("stopped")
    if engine.link is not None:
        # MLX's ring group, used from the worker thread, can abort in its
        # static destructors ("terminate called without an active
        # exception"); everything is saved and the followers are stopped.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
