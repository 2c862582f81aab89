"""Pressure harnesses for mlx_kvq.assistant, run by the tests and by
mlx_kvq.reliability, on a server in a subprocess (faults.Assistant).

    slow_clients     half-open and slow-byte connections, a streamer that never
                     reads, clients that disconnect mid-reply, more connections
                     than --max-connections, around a good request
    half_requests    many connections that send half a request and stop, around
                     a good request: its latency, the server's threads, and when
                     the read deadline closes them
    memory_pressure  documents and turns against a budget just above the
                     weights: served or refused with the budget message, peak
                     memory within the budget

Each returns a dict of figures.
"""

import random
import re
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from .faults import Assistant, one_chat_memory


# -- slow and hostile clients ----------------------------------------------------


def _partial_headers(server: Assistant) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n").encode()


GOOD = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 4}


def _half_open(server: Assistant, count: int) -> list:
    """`count` connections that sent half a request's headers."""
    held = []
    for _ in range(count):
        s = server.connect()
        s.sendall(_partial_headers(server))
        held.append(s)
    return held


def _good_request(server: Assistant):
    """(status or the error's name, seconds) of a good chat request."""
    t = time.monotonic()
    try:
        status, _ = server.request("POST", "/v1/chat/completions", GOOD, timeout=120)
    except OSError as e:
        status = type(e).__name__
    return status, time.monotonic() - t


def _generated(log: str, cid: str) -> Optional[int]:
    m = re.findall(rf"conversation {cid}: \d+ prompt tokens \(\d+ cached\), (\d+) generated",
                   log)
    return int(m[-1]) if m else None


def _closed_by_server(sock: socket.socket, wait: float) -> Optional[bytes]:
    """What the server sent before closing within `wait` s, or None if open."""
    sock.settimeout(wait)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except socket.timeout:
        return None
    except OSError:
        return data


def slow_clients(server: Assistant, half_open: int = 50, slow: int = 3,
                 stream_tokens: int = 400, extra: int = 5, settle: float = 30.0) -> dict:
    """Half-open connections (headers never finished), slow-byte clients (a
    header or body byte a second), a streamer that never reads and a
    streamer and a plain request that disconnect mid-reply, then a good
    request; then `extra` connections beyond the server's --max-connections.
    Figures: threads held, the good request's latency, refusals, what the
    server released within `settle` s, generations stopped."""
    tag = f"{random.randrange(1 << 30):08x}"
    out = {}
    # alone (this also starts the threads a generation uses)
    out["idle_latency_s"] = _good_request(server)[1]
    base_threads = server.threads()
    stop = threading.Event()
    t0 = time.monotonic()
    held = _half_open(server, half_open)
    out["connect_s"] = time.monotonic() - t0

    def trickle(data: bytes, sent_first: bytes = b""):
        s = server.connect()
        held.append(s)
        try:
            s.sendall(sent_first)
            for b in data:
                if stop.is_set():
                    return
                s.send(bytes([b]))
                time.sleep(1.0)
        except OSError:
            return  # closed by the server

    body = server.raw_post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    head, _, payload = body.partition(b"\r\n\r\n")
    tricklers = [threading.Thread(target=trickle, daemon=True, args=(
        (head + b"\r\n\r\n" + payload,) if i % 2 == 0 else (payload, head + b"\r\n\r\n")))
        for i in range(slow)]
    for t in tricklers:
        t.start()

    stalled = server.connect(rcvbuf=4096)  # never reads
    stalled.sendall(server.raw_post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": stream_tokens, "stream": True, "conversation": f"stalled-{tag}"}))
    leaver = server.connect()  # reads the first chunk, then disconnects
    leaver.sendall(server.raw_post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": stream_tokens, "stream": True, "conversation": f"leaver-{tag}"}))
    quiet = server.connect()  # a plain request, abandoned while it is answered
    quiet.sendall(server.raw_post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": stream_tokens, "conversation": f"quiet-{tag}"}))
    leaver.settimeout(60)
    leaver.recv(4096)
    leaver.close()
    time.sleep(1.0)
    quiet.close()
    out["threads_held"] = server.threads() - base_threads

    out["good_status"], out["good_latency_s"] = _good_request(server)

    # Beyond --max-connections: a request is answered 503 at once.
    info = server.info()
    # The info request was one of the connections it counted.
    room = info.get("max_connections", 0) - info.get("connections", 1) + 1
    over = []
    for i in range(max(0, room) + extra):
        s = server.connect()
        s.sendall(_partial_headers(server) if i < room else (
            f"GET /api/info HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            "Connection: close\r\n\r\n").encode())
        over.append((s, time.monotonic()))
    refusals = []
    for s, sent in over[-extra:]:
        got = _closed_by_server(s, 1.0)
        if got is not None and got.startswith(b"HTTP/1.1 503"):
            refusals.append(time.monotonic() - sent)
    out["refused"], out["refuse_s_max"] = len(refusals), max(refusals, default=None)
    held += [s for s, _ in over]

    # The server lets go of what it held; the stalled streamer is dropped.
    deadline = time.monotonic() + settle
    released = 0
    for s in held:
        if _closed_by_server(s, max(0.01, deadline - time.monotonic())) is not None:
            released += 1
    out["held"], out["released"] = len(held), released
    stop.set()
    for s in held:
        s.close()
    stalled.close()
    while "running" in info and server.info()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    while server.threads() > base_threads and time.monotonic() < deadline:
        time.sleep(0.2)
    out["threads_after"] = server.threads() - base_threads
    while _generated(server.log(), f"stalled-{tag}") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log()
    out["leaver_generated"] = _generated(log, f"leaver-{tag}")
    out["quiet_generated"] = _generated(log, f"quiet-{tag}")
    out["stalled_generated"] = _generated(log, f"stalled-{tag}")
    out["stream_tokens"] = stream_tokens
    out["running_after"] = server.info().get("running")
    return out


def half_requests(server: Assistant, count: int = 300, settle: float = 30.0) -> dict:
    """`count` connections that send half a request's headers and stop, then a
    good chat request. Figures: the good request's status and latency, the
    server's threads and open connections while they are held (threads beyond
    those before; connections as the good request is sent: on a loaded machine
    its answer can outlast the read deadline that closes them), how many the
    server closed within `settle` s and how many of those got 408."""
    _good_request(server)
    base_threads = server.threads()
    t0 = time.monotonic()
    held = _half_open(server, count)
    out = {"connect_s": time.monotonic() - t0, "threads_held": server.threads() - base_threads,
           "open_connections": server.info()["connections"]}  # as the good request is sent
    out["good_status"], out["good_latency_s"] = _good_request(server)
    deadline = time.monotonic() + settle
    got = [_closed_by_server(s, max(0.01, deadline - time.monotonic())) for s in held]
    out["closed"] = sum(g is not None for g in got)
    out["answered_408"] = sum(bool(g) and g.startswith(b"HTTP/1.1 408") for g in got)
    out["closed_s"] = time.monotonic() - t0
    for s in held:
        s.close()
    return out


# -- memory pressure -----------------------------------------------------------------


def _vm_hwm(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) << 10


def memory_pressure(data_dir, requests: int = 24, seed: int = 0, log_file=None,
                    clients: int = 3, tokens: int = 600, prefill_step: int = 256) -> dict:
    """Documents and turns of random sizes, `clients` at a time, against a
    --memory budget for one `tokens`-token conversation (just above the
    weights). Each is answered, or refused with the budget message (or 503
    when the queue is full); MLX's peak memory must stay within the budget.
    Figures: served, refused, problems, peak vs budget, process peak RSS."""
    data_dir = Path(data_dir)
    rng = random.Random(seed)
    memory = one_chat_memory(tokens, prefill_step)
    server = Assistant(data_dir, "--memory", str(memory), "--max-tokens", "8",
                       "--prefill-step-size", str(prefill_step), "--queue-size", "4",
                       log_file=log_file or data_dir.parent / "memory_pressure.log")
    words = "The river carries silt to the sea, and the delta grows each year. "
    plan = [(rng.choice(["document", "turn"]), rng.randint(1, 120),
             f"m{rng.randrange(4)}") for _ in range(requests)]
    out = {"budget": memory, "requests": requests, "served": 0, "refused_budget": 0,
           "refused_busy": 0, "problems": []}
    lock = threading.Lock()
    try:
        for c in sorted({c for _, _, c in plan}):
            server.request("POST", "/api/conversations", {"title": c})
        ids = {conv["title"]: conv["id"] for conv in
               server.request("GET", "/api/conversations")[1]["conversations"]}

        def one(kind, size, conv):
            cid = ids[conv]
            if kind == "document":
                status, body = server.events(f"/api/conversations/{cid}/documents",
                                       {"name": "notes.txt", "text": words * size})
            else:
                status, body = server.request("POST", "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": words * (size // 4 + 1)}],
                    "max_tokens": rng.randint(1, 8), "conversation": cid})
            err = (body or {}).get("error") if isinstance(body, dict) else None
            with lock:
                if status == 200 and not err:
                    out["served"] += 1
                elif err and err.get("code") in ("kv_budget_exceeded",
                                                 "context_length_exceeded"):
                    out["refused_budget"] += 1
                    if "Not enough memory" not in err["message"] and \
                            "trained context" not in err["message"]:
                        out["problems"].append(f"refusal without the budget message: {err}")
                elif status == 503 and err and err.get("code") == "server_busy":
                    out["refused_busy"] += 1
                else:
                    out["problems"].append(f"{kind} of {size}: {status} {body}")

        pending = list(plan)
        while pending:
            batch, pending = pending[:clients], pending[clients:]
            threads = [threading.Thread(target=one, args=a) for a in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        info = server.info()
        out["peak"] = info["peak_memory"]
        out["peak_rss"] = _vm_hwm(server.proc.pid)
        out["alive"] = server.proc.poll() is None
        out["tracebacks"] = server.log().count("Traceback")
    finally:
        server.stop()
    out["over_budget"] = out["peak"] > memory
    return out
