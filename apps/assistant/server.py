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
unless --allow-origin says otherwise, at most --max-connections open
connections (guard.py), bodies up to --max-body-bytes and the API over the
engine (api.py). The engine's one worker thread runs every MLX operation;
no connection holds a thread (api.py bridges the two). SIGINT and SIGTERM
stop it gracefully: the engine first (running chats end, their turns
saved), then uvicorn's open replies; the worker is joined before Python
exits.
"""

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mlx_kvq import distributed, units
from mlx_kvq.commands.cli_types import (add_model, add_prefill_step_size, add_sharding, nonneg_int,
                                        positive_int, seconds)
from mlx_kvq.models import data_home
from mlx_kvq.spec import DEFAULT_PRESET, PRESETS, parse_spec

from . import ranks, transport
from .api import Api, client_left, http_error, internal_error, request_error
from .engine import Engine, Settings
from .errors import RequestError
from .guard import Guard, url_of
from .store import Store

log = logging.getLogger("mlx_kvq.assistant")

STATIC = Path(__file__).parent / "static"


def app(api: Api, host: str, port: int, allow_origins, max_connections: int, connections):
    """The ASGI application: Guard around Starlette's routes; `connections()`
    counts the open connections."""
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
    bound = sock.getsockname()[1]
    api = Api(engine, store, args.max_body_bytes)
    server = None
    config = uvicorn.Config(
        app(api, args.host, bound, args.allow_origin, args.max_connections,
            lambda: server.connections),
        http=lambda **kw: transport.Protocol(read_timeout=args.read_timeout,
                                             write_timeout=args.write_timeout, **kw),
        lifespan="off", log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=5)
    server = transport.Server(config, engine)
    limit, limited_by = engine.token_limit()
    url = url_of(args.host, bound)
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
