"""mlx_kvq.assistant: serve the chat page and an OpenAI-compatible API locally.

    GET  /                                      the chat page
    GET  /v1/models, POST /v1/chat/completions  OpenAI-compatible API
    GET  /api/info                              model, KV scheme, budget
    GET, POST /api/conversations                list, create
    GET, PATCH, DELETE /api/conversations/<id>  messages and memory, rename, delete
    POST /api/conversations/<id>/messages       a turn, as server-sent events
    POST /api/conversations/<id>/documents      add a document (prefilled), as events

Built on Starlette (routing, requests, JSON and streamed responses, static
files, exception handlers) served by uvicorn (one event loop, h11, flow
control, keep-alive, graceful shutdown; transport.py adds the read and write
deadlines uvicorn lacks). Starlette rather than FastAPI: the API's bodies are
validated by openai_api.py with OpenAI's error messages and shape, which
FastAPI's pydantic models and 422 errors would only get in the way of.

What is the assistant's own: only requests whose Host header names this
server are served (DNS rebinding), browser requests only from its own page
unless --allow-origin says otherwise (`Guard`), bodies up to
--max-body-bytes, at most --max-connections open connections, and the API
over the engine. The engine's one worker thread runs every MLX operation; a
request submits a job and reads its events through `job_events` (a thread
per running job waits on the job's queue and hands each event to the loop),
so no connection holds a thread. A client that disconnects while its reply
is generated, streamed or not, or while it waits in the queue, cancels it;
the chat leaves the batch and its turn is saved as far as it got.
"""

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mlx_kvq import distributed, units
from mlx_kvq.commands.cli_types import (add_model, add_prefill_step_size, add_sharding, nonneg_int,
                                        positive_int, seconds)
from mlx_kvq.models import data_home
from mlx_kvq.spec import DEFAULT_PRESET, PRESETS, parse_spec

from . import openai_api, ranks, transport
from .engine import Engine, Job, Settings
from .errors import RequestError, busy
from .store import NotFound, Store, clean_title, title_of, validate_id

log = logging.getLogger("mlx_kvq.assistant")

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
CORS_HEADERS = {"Vary": "Origin", "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Conversation-Id",
                "Access-Control-Expose-Headers": "X-Conversation-Id"}
DOCUMENT_SUFFIXES = ("", ".txt", ".md")
DRAIN_BYTES = 64 << 20  # an oversize body up to this is read so the client sees the 413
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"", "0.0.0.0", "::"}
HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?")


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


def url_of(host: str, port: int) -> str:
    host = "127.0.0.1" if host in WILDCARD else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def error_response(e: RequestError, headers=None) -> JSONResponse:
    if e.status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse(e.body(), e.status, headers)


class Guard:
    """ASGI middleware: the Host and Origin checks, the connection cap, and
    the headers every response carries."""

    def __init__(self, app, host: str, port: int, allow_origins, max_connections: int,
                 connections):
        self.app, self.host, self.port = app, host, port
        self.allow_origins = set(allow_origins)
        self.max_connections, self.connections = max_connections, connections
        self.refused = 0  # requests refused because too many connections were open

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            if self.connections() > self.max_connections:
                self.refused += 1
                raise busy(f"the server holds its limit of {self.max_connections} "
                           "connections (--max-connections); try again shortly")
            self._check_host(headers)
            cors = self._check_origin(scope["method"], headers)
        except RequestError as e:
            log.info("%s %s -> %d: %s", scope["method"], scope["path"][:200], e.status,
                     e.message)
            return await error_response(e, PAGE_HEADERS)(scope, receive, send)
        extra = {**PAGE_HEADERS, **({"Access-Control-Allow-Origin": cors, **CORS_HEADERS}
                                    if cors else {})}
        if scope["method"] == "OPTIONS":
            return await Response(status_code=204, headers=extra)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _check_host(self, headers: Headers):
        host = headers.get("host")
        if not host or not host_allowed(host, self.host, self.port):
            raise RequestError(403, f"Host {host!r} does not name this server; it answers "
                               f"at {url_of(self.host, self.port)}", code="bad_host")

    def _check_origin(self, method: str, headers: Headers):
        """The origin to allow in CORS headers (None: same origin); refuses others."""
        origin, site = headers.get("origin"), headers.get("sec-fetch-site")
        if origin == f"http://{headers['host']}":
            return None
        if origin is None and (site in (None, "same-origin", "none") or (
                method == "GET" and headers.get("sec-fetch-mode") == "navigate")):
            return None
        if "*" in self.allow_origins or origin in self.allow_origins:
            return origin or "*"
        raise RequestError(403, f"cross-origin request from {origin or site!r} refused; "
                           "start the server with --allow-origin ORIGIN to allow it",
                           code="cross_origin")


async def job_events(engine: Engine, job: Job):
    """The job's (kind, data) events up to "done" or "error": a thread of its
    own waits on the job's queue (Job.stream) and hands each event to the
    event loop. The thread ends with the job (also a cancelled one)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def pump():
        for event in job.stream(engine.alive):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody reads the reply
                job.cancelled.set()

    threading.Thread(target=pump, name=f"mlx_kvq-job-{job.conversation}",
                     daemon=True).start()
    while True:
        kind, data = await events.get()
        yield kind, data
        if kind in ("done", "error"):
            return


@asynccontextmanager
async def cancel_on_disconnect(request: Request, job: Job):
    """Within: a client that disconnects cancels the job (its body is read)."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("conversation %s: the client left; its %s is cancelled",
                 job.conversation, job.kind)
        job.cancelled.set()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


class Api:
    """The endpoints, over the engine and the store."""

    def __init__(self, engine: Engine, store: Store, max_body: int):
        self.engine, self.store, self.max_body = engine, store, max_body
        self.started = int(time.time())
        self.guard = None  # set by app(): counts connections and refusals

    # -- plumbing ---------------------------------------------------------

    async def read_json(self, request: Request, optional: bool = False) -> dict:
        length = request.headers.get("content-length")
        chunked = "transfer-encoding" in request.headers
        if length is None and not chunked:
            if optional:
                return {}
            raise RequestError(411, "a Content-Length header is required")
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                raise RequestError(400, f"bad Content-Length {length!r}") from None
            if n > self.max_body:
                if n <= DRAIN_BYTES:
                    await self._drain(request)
                raise self._too_large(n)
        raw, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                await self._drain(request, size)
                raise self._too_large(size, at_least=True)
            raw += chunk
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

    def _too_large(self, n: int, at_least: bool = False) -> RequestError:
        return RequestError(413, f"the request body is {'over ' if at_least else ''}{n} "
                            f"bytes, over the limit of {self.max_body} (--max-body-bytes)",
                            code="request_too_large")

    @staticmethod
    async def _drain(request: Request, read: int = 0):
        """Read what is sent of an oversize body (up to DRAIN_BYTES), so that
        closing the connection does not reset the 413 before the client reads it."""
        async for chunk in request.stream():
            read += len(chunk)
            if read > DRAIN_BYTES:
                return

    def _conversation(self, request: Request) -> str:
        cid = request.path_params["cid"]
        try:
            validate_id(cid)
        except ValueError as e:
            raise RequestError(400, str(e), param="conversation") from None
        if not self.store.exists(cid):
            raise RequestError(404, f"no conversation {cid}")
        return cid

    async def _begin(self, request: Request, job: Job):
        """Queue a job and wait until it starts: (its start event's data, the
        rest of its events). Its refusal raises here, before any response is
        sent, so it gets its own status code."""
        self.engine.submit(job)
        events = job_events(self.engine, job)
        async with cancel_on_disconnect(request, job):
            async for kind, data in events:
                if kind == "error":
                    raise data
                if kind == "start":
                    return data, events
        raise RequestError(500, "the job ended before it started")

    def _stream(self, job: Job, events, first: list, send) -> StreamingResponse:
        """Server-sent events: `first`, then `send(kind, data)` of each of the
        job's events. A client that leaves cancels the job."""
        async def body():
            try:
                for text in first:
                    yield text
                async for kind, data in events:
                    for text in send(kind, data.body()["error"] if kind == "error" else data):
                        yield text
            finally:
                if not job.cancelled.is_set():
                    job.cancelled.set()  # a no-op once the job is done
                await events.aclose()
        return StreamingResponse(body(), media_type="text/event-stream")

    # -- page -------------------------------------------------------------

    async def info(self, request: Request):
        engine, b = self.engine, self.engine.budget
        s = engine.settings
        return JSONResponse({
            "model": engine.model_id, "spec": ", ".join(engine.specs),
            "scheme": engine.scheme, "budget": b.memory,
            "weights": b.shape.weight_bytes,
            "max_tokens_per_conversation": engine.token_limit()[0],
            "trained_context": b.shape.trained_context, "max_kv_size": s.max_kv_size,
            "max_tokens": s.max_tokens, "max_body_bytes": self.max_body,
            "queued": engine.queued(), "queue_size": s.queue_size,
            "running": engine.running(), "connections": self.guard.connections(),
            "max_connections": self.guard.max_connections,
            "refused_connections": self.guard.refused,
            "threads": threading.active_count(),
            "peak_memory": engine.peak_memory(),
            "sharding": engine.link and {"sharding": engine.link.shard.sharding,
                                         "ranks": engine.link.shard.size},
            "data_dir": str(self.store.root),
        })

    async def list_conversations(self, request: Request):
        convs = [c.summary() for c in self.store.list()]
        return JSONResponse({"conversations": convs})

    async def create_conversation(self, request: Request):
        body = await self.read_json(request, optional=True)
        try:
            conv = self.store.create(body.get("title"))
        except ValueError as e:
            raise RequestError(400, str(e), param="title") from None
        return JSONResponse({"conversation": asdict(conv)}, 201)

    async def get_conversation(self, request: Request):
        cid = self._conversation(request)
        conv = self.store.get(cid)
        memory = await asyncio.to_thread(self.engine.memory, cid)  # may hash the cache file
        return JSONResponse({"conversation": asdict(conv), "memory": memory})

    async def rename_conversation(self, request: Request):
        cid = self._conversation(request)
        try:
            title = clean_title((await self.read_json(request)).get("title"))
        except ValueError as e:
            raise RequestError(400, str(e), param="title") from None
        conv = self.store.update(cid, lambda c: setattr(c, "title", title))
        return JSONResponse({"conversation": conv.summary()})

    async def delete_conversation(self, request: Request):
        cid = self._conversation(request)
        try:
            self.store.delete(cid)
        except NotFound:
            raise RequestError(404, f"no conversation {cid}") from None
        self.engine.forget(cid, deleted=True)
        return JSONResponse({"deleted": cid})

    async def post_message(self, request: Request):
        cid = self._conversation(request)
        body, s = await self.read_json(request), self.engine.settings
        content = body.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RequestError(400, "content must be a non-empty string", param="content")
        job = Job("chat", cid, [{"role": "user", "content": content}],
                  max_tokens=openai_api.integer(body, "max_tokens", s.max_tokens, 1),
                  temperature=openai_api.number(body, "temperature", s.temp, 0.0, 2.0),
                  top_p=s.top_p)
        return await self._page_stream(request, job)

    async def post_document(self, request: Request):
        cid = self._conversation(request)
        body = await self.read_json(request)
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
        return await self._page_stream(request, Job("document", cid, [message]))

    async def _page_stream(self, request: Request, job: Job):
        start, events = await self._begin(request, job)

        def event(kind, data):
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        return self._stream(job, events, list(event("start", start)), event)

    # -- OpenAI API -------------------------------------------------------

    async def models(self, request: Request):
        return JSONResponse(openai_api.models_body(self.engine.model_id, self.started))

    async def chat_completions(self, request: Request):
        engine = self.engine
        req = openai_api.parse_chat(await self.read_json(request),
                                    request.headers.get("x-conversation-id"), engine.settings)
        cid, messages, new = openai_api.resolve_conversation(self.store, req)
        job = Job("chat", cid, messages, max_tokens=req.max_tokens,
                  temperature=req.temperature, top_p=req.top_p, stop=req.stop,
                  seed=req.seed, title=title_of(messages) if new else None)
        start, events = await self._begin(request, job)
        reply = openai_api.Reply(engine.model_id, cid)
        headers = {"X-Conversation-Id": cid}
        if not req.stream:
            text, done = [], None
            async with cancel_on_disconnect(request, job):
                async for kind, data in events:
                    if kind == "error":
                        raise data
                    if kind == "text":
                        text.append(data)
                    done = data if kind == "done" else done
            return JSONResponse(reply.completion("".join(text), done["finish_reason"],
                                                 done["usage"], start["notice"]),
                                headers=headers)
        first = reply.chunk({"role": "assistant", "content": ""})
        if start["notice"]:
            first["notice"] = start["notice"]

        def send(kind, data):
            if kind == "progress":  # keeps the connection alive through a long prefill
                yield f": prefill {data['done']}/{data['total']}\n\n"
            elif kind == "text":
                yield f"data: {json.dumps(reply.chunk({'content': data}))}\n\n"
            elif kind == "error":
                yield f"data: {json.dumps({'error': data})}\n\n"
            elif kind == "done":
                yield f"data: {json.dumps(reply.chunk({}, data['finish_reason']))}\n\n"
                if req.include_usage:
                    yield f"data: {json.dumps(reply.usage_chunk(data['usage']))}\n\n"
                yield "data: [DONE]\n\n"

        response = self._stream(job, events, [f"data: {json.dumps(first)}\n\n"], send)
        response.headers.update(headers)
        return response


async def request_error(request: Request, e: RequestError):
    log.info("%s %s -> %d: %s", request.method, request.url.path[:200], e.status, e.message)
    return error_response(e)


async def http_error(request: Request, e: HTTPException):
    """Starlette's own refusals (no route, a method the route does not take)
    in the API's shape."""
    path = request.url.path[:200]
    message = {404: f"no such endpoint: {path}",
               405: f"{request.method} is not allowed on {path}"}.get(e.status_code, e.detail)
    return error_response(RequestError(e.status_code, message), e.headers)


async def internal_error(request: Request, e: Exception):
    log.exception("%s %s failed", request.method, request.url.path[:200])
    return error_response(RequestError(500, f"internal error: {type(e).__name__}: {e}"))


async def client_left(request: Request, e: ClientDisconnect):
    return Response(status_code=400)  # nobody reads it


def app(api: Api, host: str, port: int, allow_origins=(), max_connections: int = 1000,
        connections=lambda: 0):
    """The ASGI application: Guard around Starlette's routes."""
    c = "/api/conversations"
    routes = [
        Route("/", lambda request: FileResponse(STATIC / "index.html")),
        Mount("/static", StaticFiles(directory=STATIC)),
        Route("/v1/models", api.models),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/api/info", api.info),
        Route(c, api.list_conversations),
        Route(c, api.create_conversation, methods=["POST"]),
        Route(c + "/{cid}/messages", api.post_message, methods=["POST"]),
        Route(c + "/{cid}/documents", api.post_document, methods=["POST"]),
        # :path, so that an id with a slash in it (sent as %2F) is refused as an id
        Route(c + "/{cid:path}", api.get_conversation),
        Route(c + "/{cid:path}", api.rename_conversation, methods=["PATCH"]),
        Route(c + "/{cid:path}", api.delete_conversation, methods=["DELETE"]),
    ]
    star = Starlette(routes=routes, exception_handlers={
        RequestError: request_error, HTTPException: http_error,
        ClientDisconnect: client_left, Exception: internal_error})
    api.guard = Guard(star, host, port, allow_origins, max_connections, connections)
    return api.guard


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
    p.add_argument("--max-connections", type=positive_int, default=1000,
                   help="Open connections (idle ones too; none holds a thread); a request "
                   "that arrives while more are open is answered 503")
    p.add_argument("--read-timeout", type=seconds, default=30.0,
                   help="Seconds a request's line, headers and body may take to arrive, "
                   "in all (from the connection's start or the previous reply); a late one "
                   "gets 408 and is closed")
    p.add_argument("--write-timeout", type=seconds, default=30.0,
                   help="Seconds a reply may wait for a client that does not read; then "
                   "the client is dropped and its generation cancelled")
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
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family, backlog=128)
    except OSError as e:  # port in use, host not on this machine
        engine.stop()
        parser.exit(2, f"mlx_kvq.assistant: error: cannot listen on {args.host}:{args.port}: "
                    f"{e}\n")
    port = sock.getsockname()[1]
    api = Api(engine, store, args.max_body_bytes)
    server = None
    config = uvicorn.Config(
        app(api, args.host, port, args.allow_origin, args.max_connections,
            lambda: server.connections),
        http=lambda **kw: transport.Protocol(read_timeout=args.read_timeout,
                                             write_timeout=args.write_timeout, **kw),
        lifespan="off", log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=5)
    server = transport.Server(config, engine)
    limit, limited_by = engine.token_limit()
    url = url_of(args.host, port)
    print(f"mlx_kvq.assistant: {engine.model_id}, KV cache {', '.join(engine.specs)} "
          f"({engine.scheme})\n"
          f"memory budget {units.fmt_bytes(engine.budget.memory)}: up to {limit} tokens in "
          f"a conversation ({limited_by}); {len(store.list())} conversations in "
          f"{store.root}\n"
          + (f"sharded ({args.sharding}) over {engine.link.shard.size} ranks: this rank holds "
             f"{engine.link.shard.describe().split(': ', 1)[1]}\n" if engine.link else "") +
          f"serving {url} (OpenAI API: {url}v1)", flush=True)
    # uvicorn handles SIGINT and SIGTERM while it serves (a graceful shutdown
    # that first stops the engine) and raises them again after; by then
    # they have nothing left to interrupt.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()  # the worker is joined: no MLX work is left when Python exits
        log.info("stopped")
    if engine.alive():
        log.error("the generation worker did not stop; exiting without it")
        logging.shutdown()
        os._exit(1)
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
