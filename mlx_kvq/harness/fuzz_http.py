"""HTTP API fuzzing of a running mlx_kvq.assistant with Hypothesis.

Three targets, each a Hypothesis strategy of raw requests sent on their own
connection:

    chat   JSON bodies for POST /v1/chat/completions: arbitrary JSON, and
           valid requests with one field replaced by an arbitrary value
    api    the /api routes (conversations, messages, documents) with any of
           their methods, conversation ids and JSON bodies
    http   arbitrary methods, paths, header sets and body bytes

Every answer must be a well-formed HTTP response with a 2xx or 4xx status
(503 only as the documented `server_busy`), an error with the API's JSON
error body, never a 5xx or a connection dropped without an answer; after
each target a good request must still be served. Replies are kept tiny
(max_tokens at most a few), so a few hundred examples take seconds.
"""

import http.client
import json
import socket
from typing import List, Optional

from .extras import need

EVENT_STREAM = "text/event-stream"
METHODS = ["GET", "POST", "PATCH", "DELETE", "OPTIONS", "PUT", "HEAD", "TRACE"]
ROLES = ["system", "developer", "user", "assistant", "tool", "robot", ""]


def strategies(conversations: List[str]):
    """{target: strategy of (method, path, headers dict, body bytes)}."""
    st = need("hypothesis.strategies", "the HTTP fuzz harness (mlx_kvq.harness.fuzz_http)")

    json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
    any_json = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                            max_leaves=12)
    small_int = st.integers(-3, 4) | st.sampled_from([0, 10**9, 2**63]) | any_json
    content = st.text(max_size=40) | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}),
        max_size=3) | any_json
    message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content}) \
        | any_json
    cid = st.sampled_from(conversations) | st.from_regex(r"[A-Za-z0-9_-]{1,64}",
                                                        fullmatch=True) | st.text(max_size=70)
    fields = {
        "messages": st.lists(message, max_size=3) | any_json,
        "max_tokens": small_int, "max_completion_tokens": small_int,
        "temperature": st.floats(-1, 3) | any_json, "top_p": st.floats(-1, 2) | any_json,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | any_json,
        "stream": st.booleans() | any_json, "seed": small_int, "n": small_int,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})
        | any_json,
        "conversation": cid, "model": any_json,
    }
    valid = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    @st.composite
    def chat_body(draw):
        if draw(st.booleans()):
            return draw(any_json)
        body = dict(valid)
        for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3,
                                  unique=True)):
            body[name] = draw(fields[name])
        if body.get("stream") is True and not isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = 2
        return body

    def encode(body) -> bytes:
        return json.dumps(body).encode()  # NaN and Infinity as Python writes them

    chat = chat_body().map(lambda b: ("POST", "/v1/chat/completions", {}, encode(b)))

    @st.composite
    def api_request(draw):
        c = draw(cid)
        path = draw(st.sampled_from([
            "/api/conversations", f"/api/conversations/{c}",
            f"/api/conversations/{c}/messages", f"/api/conversations/{c}/documents",
            "/api/info", "/v1/models"]))
        body = draw(st.none() | any_json | st.fixed_dictionaries({}, optional={
            "title": any_json, "content": st.text(max_size=20) | any_json,
            "max_tokens": small_int, "temperature": any_json,
            "name": st.sampled_from(["a.txt", "b.md", "c.pdf", "../x.txt", ""]) | any_json,
            "text": st.text(max_size=40) | any_json}))
        data = b"" if body is None else encode(body)
        return draw(st.sampled_from(METHODS[:5])), path, {}, data

    header_name = st.sampled_from(["Content-Length", "Transfer-Encoding", "Host", "Origin",
                                   "Sec-Fetch-Site", "Content-Type", "X-Conversation-Id",
                                   "Expect", "Connection"]) | st.from_regex(
                                       r"[A-Za-z-]{1,20}", fullmatch=True)
    header_value = st.sampled_from(["-1", "0", "5", "99999999999", "abc", "chunked",
                                    "http://evil.example", "cross-site", "100-continue",
                                    ""]) | st.from_regex(r"[ -~]{0,30}", fullmatch=True)

    @st.composite
    def http_request(draw):
        method = draw(st.sampled_from(METHODS) | st.from_regex(r"[A-Z]{1,10}",
                                                               fullmatch=True))
        path = draw(st.sampled_from(["/", "/static/app.js", "/static/../server.py",
                                     "/v1/chat/completions", "/api/conversations",
                                     "/api/conversations/%2e%2e%2fetc", "//", "*"])
                    | st.from_regex(r"/[!-~]{0,40}", fullmatch=True))
        headers = draw(st.dictionaries(header_name, header_value, max_size=4))
        body = draw(st.binary(max_size=64))
        return method, path, headers, body

    return {"chat": chat, "api": api_request(), "http": http_request()}


def send(host: str, port: int, method: str, path: str, headers: dict, body: bytes,
         timeout: float = 60.0):
    """(status, headers, body bytes) of one raw request, its reply read as
    http.client reads one; status None if the connection was closed without
    a response. The connection stays open for writing: a client that closes
    its side counts as gone (its reply is cancelled)."""
    lines = [f"{method} {path} HTTP/1.1"]
    if not any(k.lower() == "host" for k in headers):
        lines.append(f"Host: {host}:{port}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding")
                        for k in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass  # answered and closed before reading it all
        reply = http.client.HTTPResponse(s, method=method)
        try:
            reply.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None, {}, b""
        try:
            data = reply.read()
        except http.client.IncompleteRead as e:
            data = e.partial
        except ConnectionResetError:
            data = b""
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, data


def problem(status, headers: dict, body: bytes, method: str) -> Optional[str]:
    """What is wrong with an answer, or None."""
    if status is None:
        return "the connection was closed without an answer"
    if status >= 500 and status != 503:
        return f"status {status}: {body[:300]!r}"
    ctype = headers.get("content-type", "")
    if status >= 400 or ctype.startswith("application/json"):
        if method == "HEAD":
            return None
        try:
            obj = json.loads(body)
        except ValueError:
            return f"status {status} with a body that is not JSON: {body[:200]!r}"
        if status >= 400 and not (isinstance(obj, dict) and isinstance(
                obj.get("error"), dict) and isinstance(obj["error"].get("message"), str)):
            return f"status {status} without the JSON error body: {body[:200]!r}"
        if status == 503 and obj["error"].get("code") != "server_busy":
            return f"503 that is not server_busy: {body[:200]!r}"
    elif ctype.startswith(EVENT_STREAM) and not body.rstrip().endswith(
            (b"data: [DONE]", b"}")):
        return f"an event stream that ends early: {body[-200:]!r}"
    return None


def run(server, examples: int, seed: int = 0, targets=("chat", "api", "http")) -> list:
    """Fuzz a running server (faults.Assistant): per target
    {"target", "examples", "failures", "first"} (the first failure, if any),
    counting "not served afterwards" as a failure too."""
    need("hypothesis", "the HTTP fuzz harness (mlx_kvq.harness.fuzz_http)")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fix_seed

    status, body = server.request("POST", "/api/conversations", {"title": "fuzz"})
    known = [body["conversation"]["id"]] if status == 201 else []
    strats = strategies(known)
    out = []
    for name in targets:
        seen, failures = [0], []

        @fix_seed(seed)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(strats[name])
        def target(req):
            seen[0] += 1
            method, path, headers, data = req
            try:
                answer = send(server.host, server.port, method, path, headers, data)
            except OSError as e:
                failures.append((req, f"{type(e).__name__}: {e}"))
                return
            why = problem(*answer, method)
            if why:
                failures.append((req, why))

        target()
        try:
            good = server.request("POST", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})[0]
        except OSError as e:
            good = type(e).__name__
        if good != 200:
            failures.append((None, f"the next good request was answered {good}"))
        out.append({"target": f"http:{name}", "examples": seen[0],
                    "failures": len(failures),
                    "first": failures and f"{failures[0][0]!r} -> {failures[0][1]}"})
    return out
