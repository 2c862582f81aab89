"""mlx_kvq.assistant: the OpenAI-compatible API against a real server (the
embedded model, in a subprocess on a free loopback port), bad requests, the
queue, and the pure helpers."""

import http.client
import json
import pickle
import re
import threading
import time

import openai
import pytest

from mlx_kvq.apps.assistant import commands
from mlx_kvq.apps.assistant.budget import to_park
from mlx_kvq.harness.faults import Assistant
from mlx_kvq.apps.assistant.engine import StopText, common_prefix
from mlx_kvq.apps.assistant.guard import host_allowed
from mlx_kvq.apps.assistant.store import Store, validate_id
from mlx_kvq.commands.corpus import sample_text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # 750MB: the weights (513 MiB) and a few thousand tokens, so refusals are cheap.
    tmp = tmp_path_factory.mktemp("assistant")
    s = Assistant(tmp / "data", "--memory", "750MB", "--max-tokens", "6",
                  "--queue-size", "1", "--max-body-bytes", "200000",
                  log_file=tmp / "server.log")
    yield s
    s.stop()


def ask(client, messages, **kw):
    return client.chat.completions.create(model="default", messages=messages, **kw)


def test_models_and_completion(server):
    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    r = ask(client, [{"role": "user", "content": "Name a fruit."}], max_tokens=4)
    assert r.object == "chat.completion"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 4
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.conversation
    r = ask(client, [{"role": "user", "content": "Describe the sea in a sentence."}],
            max_tokens=6, stop=[" "])
    assert r.choices[0].finish_reason == "stop" and " " not in r.choices[0].message.content
    # /api/info says which attention path the decode steps ran
    from mlx_kvq import attention

    info = server.request("GET", "/api/info")[1]
    assert info["attention"] == f"decode on the {attention.describe_path()}"


def test_streaming_extends_conversation_from_cache(server):
    client = server.client()
    history = [{"role": "user", "content": "Say a word about the sea."}]
    chunks = list(ask(client, history, max_tokens=5, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    first = chunks[-1].usage
    # new: at most the chat template's start came from another conversation's cache
    assert first.prompt_tokens_details.cached_tokens < first.prompt_tokens - 5
    cid = chunks[0].conversation

    history += [{"role": "assistant", "content": text},
                {"role": "user", "content": "And one about the sky?"}]
    r = ask(client, history, max_tokens=3)
    assert r.conversation == cid  # found by its saved messages
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.prompt_tokens  # the whole first turn came from the cache
    assert r.usage.prompt_tokens - cached < 20


def test_a_new_conversation_starts_from_another_ones_cache(server):
    """A prompt that begins as another conversation's did (the same question
    asked again, as mlx_lm.server's prompt cache serves it) starts from a copy
    of that cache: all but its last token cached, the same greedy reply, and
    the first conversation's own cache untouched."""
    client = server.client()
    msgs = [{"role": "user", "content": "Name three rivers of Europe."}]
    first = ask(client, msgs, max_tokens=6, temperature=0.0)
    again = ask(client, msgs, max_tokens=6, temperature=0.0)
    assert again.conversation != first.conversation
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    history = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And of Asia?"}]
    r = ask(client, history, max_tokens=3, extra_body={"conversation": first.conversation})
    assert r.conversation == first.conversation
    assert r.usage.prompt_tokens_details.cached_tokens >= first.usage.total_tokens - 1


def test_conversation_from_page_addressable_by_api(server):
    status, body = server.request("POST", "/api/conversations", {"title": "From the page"})
    assert status == 201
    cid = body["conversation"]["id"]
    client = server.client()
    r1 = ask(client, [{"role": "user", "content": "Hello."}], max_tokens=2,
             extra_body={"conversation": cid})
    # Header form; only the new message is sent: it is appended to the history.
    r2 = ask(client, [{"role": "user", "content": "Bye."}], max_tokens=2,
             extra_headers={"X-Conversation-Id": cid})
    assert r1.conversation == r2.conversation == cid
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    status, body = server.request("GET", f"/api/conversations/{cid}")
    assert status == 200
    roles = [m["role"] for m in body["conversation"]["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    mem = body["memory"]
    assert mem["tokens"] > 0 and mem["resident"]
    assert mem["cache_bytes"] > 0 and mem["fp16_bytes"] >= mem["cache_bytes"]
    assert mem["scheme"].startswith("K 4-bit per-channel")


BAD_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": "hi"}, 400, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "between"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
    ({"messages": [{"role": "user", "content": "hi"}], "conversation": "../../etc"}, 400,
     "conversation id"),
    # Beyond the trained context (8192): refused, no --max-kv-size.
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}, 400,
     "trained context"),
]


@pytest.mark.parametrize("body,status,words", BAD_BODIES)
def test_bad_requests(server, body, status, words):
    got, reply = server.request("POST", "/v1/chat/completions", body)
    assert got == status
    assert words in reply["error"]["message"]


def test_refusals_then_good_request(server):
    # Over --max-body-bytes: 413, through the official client.
    client = server.client()
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, [{"role": "user", "content": "x" * 300_000}], max_tokens=2)
    assert e.value.status_code == 413 and "max-body-bytes" in str(e.value)
    # A huge Content-Length with no body: 413 without waiting for it.
    status, reply = server.request("POST", "/v1/chat/completions", b"",
                                   {"Content-Length": str(10**9)})
    assert status == 413
    # A turn whose cache would not fit the 750MB budget: refused before allocating,
    # saying how many tokens fit and what would make it fit.
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [{"role": "user", "content": sample_text()[:24000]}], max_tokens=4)
    msg = e.value.body["message"]
    assert e.value.body["code"] == "kv_budget_exceeded"
    assert re.search(r"at most \d+ tokens fit", msg) and "--memory" in msg
    # DNS rebinding and cross-origin browser requests.
    status, reply = server.request("GET", "/v1/models", headers={"Host": "evil.example:80"})
    assert status == 403 and reply["error"]["code"] == "bad_host"
    status, reply = server.request("GET", "/v1/models",
                                   headers={"Host": f"attacker.test:{server.port}"})
    assert status == 403
    status, reply = server.request("POST", "/api/conversations", {},
                                   headers={"Origin": "http://evil.example"})
    assert status == 403 and reply["error"]["code"] == "cross_origin"
    status, _ = server.request("GET", "/api/conversations/..%2F..%2Fetc")
    assert status == 400
    status, _ = server.request("GET", "/api/conversations/nonexistent")
    assert status == 404
    status, _ = server.request("POST", "/api/conversations/nonexistent/documents",
                               {"name": "a.pdf", "text": "x"})
    assert status == 404
    # Still serving.
    r = ask(client, [{"role": "user", "content": "Count: one, two,"}], max_tokens=2)
    assert r.usage.completion_tokens > 0
    assert "Traceback" not in server.log()


def test_chunked_bodies(server):
    """A chunked body is read as one; over --max-body-bytes it is 413."""
    def chunked(body: bytes):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        try:
            conn.request("POST", "/api/conversations", body=iter([body[:5], body[5:]]),
                         encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    status, reply = chunked(json.dumps({"title": "In chunks"}).encode())
    assert status == 201 and reply["conversation"]["title"] == "In chunks"
    status, reply = chunked(json.dumps({"title": "x" * 300_000}).encode())
    assert status == 413 and "max-body-bytes" in reply["error"]["message"]


def test_queue_full_answers_503(server):
    """--queue-size 1: one running, one waiting, the next refused."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    body = {"messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 200, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    running = conn.getresponse()
    assert running.status == 200
    running.fp.readline()  # the first chunk: it is generating, out of the queue
    waiting = threading.Thread(target=server.request, args=(
        "POST", "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}))
    waiting.start()
    try:
        deadline = time.monotonic() + 60
        while server.request("GET", "/api/info")[1]["queued"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        status, reply = server.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        assert status == 503 and "queue is full" in reply["error"]["message"]
    finally:
        running.close()  # the client leaves: its reply is cancelled, the waiting one runs
        conn.close()
        waiting.join(120)
    r = ask(server.client(), [{"role": "user", "content": "Hi"}], max_tokens=1)
    assert r.choices[0].message.content is not None


# -- pure helpers -----------------------------------------------------------------


def test_stop_text_holds_back_partial_stops():
    s = StopText(["END", "\n\n"])
    assert s.feed("Hello E") == ("Hello ", False)
    assert s.feed("N") == ("", False)
    assert s.feed("X more") == ("ENX more", False)
    assert s.feed(" text\n") == (" text", False)
    assert s.feed("\nafter") == ("", True)
    s = StopText([])
    assert s.feed("a") == ("a", False) and s.flush() == ""


def test_park_least_recently_used_first():
    resident = [("old", 30), ("mid", 30), ("new", 30)]
    assert to_park(resident, need=50, memory=200) == []
    assert to_park(resident, need=120, memory=200) == ["old"]
    assert to_park(resident, need=170, memory=200) == ["old", "mid"]
    assert to_park(resident, need=171, memory=200) == ["old", "mid", "new"]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_commands_cross_the_wire_as_themselves():
    """Every command rank 0 tells the other ranks arrives as itself, pickled
    from builtins alone (short: most fit distributed.share's one all_sum)."""
    c = commands
    told = [c.Beat(), c.Stop(), c.Forget([("a", True)]), c.Open("a", False), c.Trim("a", 3), c.Fork("b", "a", 3),
            c.Park(["a", "b"]), c.Settle("a"), c.Insert("a", [1, 2], 8, 0.0, 1.0, None),
            c.Step(64, 8), c.End(0, "a", True), c.Drop(1, False), c.Prefill("a", [5, 6])]
    assert {type(x) for x in told} == set(c.COMMANDS.values())
    for x in told:
        wire = pickle.loads(pickle.dumps(x.wire()))
        assert c.decode(wire) == x
        assert b"mlx_kvq" not in pickle.dumps(x.wire())


def test_a_follower_replays_forget_on_its_share(tmp_path):
    """A deleted conversation's files go on a follower rank too; a forgotten
    one keeps them."""
    from mlx_kvq.apps.assistant.sessions import Sessions

    store = Store(tmp_path)
    kept, deleted = store.create("kept").id, store.create("deleted").id
    engine = type("Follower", (), {"sessions": Sessions(None, store, None)})()
    commands.decode(commands.Forget([(kept, False), (deleted, True)]).wire()).replay(engine)
    assert store.exists(kept) and not store.exists(deleted)


def test_a_new_cache_copies_the_longest_idle_prefix_that_fits(tmp_path):
    """Sessions.reuse starts a cache from the idle conversation sharing the
    longest prefix held in 16 bits, not from one in use, nor one holding more
    tokens than the budget keeps for the new cache, nor one that quantized
    the prefix; the copy holds exactly the donor's first tokens and the
    donor keeps all of its own."""
    import mlx.core as mx
    from mlx_kvq import KVQCache
    from mlx_kvq.apps.assistant.sessions import Session, Sessions

    spec = "k4v4-g32-r512-s4"  # a residual that holds the prompts below in 16 bits

    class Loaded:
        def new_cache(self):
            return [KVQCache(spec)]

        def stats(self, cache):
            return {"cache_bytes": cache[0].nbytes}

    def session(tokens, kv=spec):
        c = KVQCache(kv)
        mx.random.seed(len(tokens))
        c.update_and_fetch(mx.random.normal((1, 2, len(tokens), 64)),
                           mx.random.normal((1, 2, len(tokens), 64)))
        return Session([c], list(tokens))

    quiet = type("Quiet", (), {"tell": lambda self, command: None})()
    sessions = Sessions(Loaded(), Store(tmp_path), quiet)
    base = list(range(300))
    held = {"short": session(base[:50]), "long": session(base + [7] * 20),
            "huge": session(base + [9] * 150), "quantized": session(base + [8] * 30, "k4v4")}
    assert held["quantized"].cache[0].n_body and not held["long"].cache[0].n_body
    sessions._held.update(held)
    prompt = base + [1, 2]
    new = Session(Loaded().new_cache())
    assert sessions.reuse("new", new, prompt, keep_last=True, busy={"long"}, room=400) == 50
    assert sessions.reuse("new", new, prompt, keep_last=True, room=400) == 300
    assert new.tokens == base and new.cache[0].offset == 300
    trimmed = session(base + [7] * 20)
    trimmed.cache[0].trim(20)
    for a, b in zip(tree_arrays(new.cache[0].state), tree_arrays(trimmed.cache[0].state)):
        assert mx.array_equal(a, b)
    assert held["long"].cache[0].offset == 320 and held["long"].tokens == base + [7] * 20


def tree_arrays(state):
    from mlx.utils import tree_flatten

    return [x for _, x in tree_flatten(state) if hasattr(x, "shape")]


def test_host_header_check():
    assert host_allowed("127.0.0.1:8080", "127.0.0.1", 8080)
    assert host_allowed("localhost:8080", "127.0.0.1", 8080)
    assert host_allowed("[::1]:8080", "127.0.0.1", 8080)
    assert not host_allowed("127.0.0.1:8081", "127.0.0.1", 8080)
    assert not host_allowed("evil.example:8080", "127.0.0.1", 8080)
    assert not host_allowed("127.0.0.1.evil.example:8080", "127.0.0.1", 8080)
    assert host_allowed("192.168.1.5:8080", "0.0.0.0", 8080)
    assert not host_allowed("evil.example:8080", "0.0.0.0", 8080)


def test_store_ids_and_atomic_files(tmp_path):
    store = Store(tmp_path)
    for bad in ("../x", "a/b", "", "x" * 65, ".", "..", "a b", None):
        with pytest.raises(ValueError):
            validate_id(bad)
    conv = store.create("t")
    store.update(conv.id, lambda c: c.messages.append({"role": "user", "content": "hi"}))
    folder = tmp_path / "conversations" / conv.id
    assert [p.name for p in folder.iterdir()] == ["conversation.json"]  # no temp files
    (folder / ".conversation.tmp.json").write_text("half written")
    assert Store(tmp_path).get(conv.id).messages == [{"role": "user", "content": "hi"}]
    assert not (folder / ".conversation.tmp.json").exists()
