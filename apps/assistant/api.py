"""The assistant's endpoints over the engine and the store (Starlette
handlers), and the bridge between the engine's worker thread and the event
loop: a request submits a job and reads its events through `job_events` (a
thread per running job waits on the job's queue and hands each event to the
loop), so no connection holds a thread. A client that disconnects while its
reply is generated, streamed or not, or while it waits in the queue, cancels
it (`cancel_on_disconnect`, or Starlette ending the stream); the chat leaves
the batch and its turn is saved as far as it got."""

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mlx_kvq.report import attention_line

from . import openai_api
from .engine import Engine, Job
from .errors import RequestError
from .guard import error_response
from .store import NotFound, Store, clean_title, title_of, validate_id

log = logging.getLogger("mlx_kvq.assistant")

DOCUMENT_SUFFIXES = ("", ".txt", ".md")
DRAIN_BYTES = 64 << 20  # an oversize body up to this is read so the client sees the 413


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


def cancel(job: Job):
    log.info("conversation %s: the client left; its %s is cancelled",
             job.conversation, job.kind)
    job.cancelled.set()


@asynccontextmanager
async def cancel_on_disconnect(request: Request, job: Job):
    """Within: a client that disconnects cancels the job (its body is read)."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel(job)

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
            raise RequestError(411, "send the body with a Content-Length header (or "
                               "chunked)")
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                raise RequestError(400, f"bad Content-Length {length!r}") from None
            if n > self.max_body:
                if n <= DRAIN_BYTES:
                    await self._drain(request.stream())
                raise self._too_large(n)
        raw, size, stream = bytearray(), 0, request.stream()
        async for chunk in stream:
            size += len(chunk)
            if size > self.max_body:
                await self._drain(stream, size)
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
    async def _drain(stream, read: int = 0):
        """Read what is sent of an oversize body (up to DRAIN_BYTES), so that
        closing the connection does not reset the 413 before the client reads it."""
        async for chunk in stream:
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

    def _stream(self, job: Job, events, first: list, send, headers=None) -> StreamingResponse:
        """Server-sent events: `first`, then `send(kind, data)` of each of the
        job's events. A client that leaves cancels the job."""
        async def body():
            ended = False
            try:
                for text in first:
                    yield text
                async for kind, data in events:
                    for text in send(kind, data.body()["error"] if kind == "error" else data):
                        yield text
                ended = True
            finally:
                if not ended:  # the client left (Starlette ends the stream then)
                    cancel(job)
                await events.aclose()
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

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
            "attention": attention_line(),
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

        return self._stream(job, events, [f"data: {json.dumps(first)}\n\n"], send, headers)


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
