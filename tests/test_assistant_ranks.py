"""The assistant sharded over local ranks (--sharding, the ring backend):
rank 0 serves and the other ranks replay its work on their shares (ranks.py).
Concurrent chats, a document, a multi-turn conversation resumed after a
restart from every rank's saved share: the same replies as one process, each
rank holding its share of every cache; a lost rank stops the server with an
error instead of hanging it."""

import http.client
import json
import shutil
import signal
import threading
import time

import pytest

from conftest import save_model_folder
from mlx_kvq import distributed
from mlx_kvq.harness.faults import Assistant

pytestmark = pytest.mark.skipif(shutil.which("mlx.launch") is None,
                                reason="mlx (distributed) without mlx.launch")
VOCAB = 49152  # the real tokenizer's ids
# name: (arch, overrides, sharding, KV spec). Pipeline ranks run one process's
# operations: equal at k4v4. Tensor ranks sum partial products in another
# order, which can flip a 4-bit rounding that these chaotic random-weight
# models amplify within a few tokens of a 700-token context (test_distributed
# measures it): compared at k8v8.
MODELS = {
    "tensor": ("llama", dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB),
               "tensor", "k8v8"),
    "pipeline": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4,
                               vocab_size=VOCAB), "pipeline", "k4v4"),
}
QUESTIONS = ["Tell me about the sea", "Name a color", "What do owls eat?",
             "Describe a river at night"]
# Asked alone (prompts prefilled together in other arrangements round
# differently): its command to the other ranks takes two all_sums.
LONG = "Describe a river at night. " + "The water runs dark and slow. " * 40
DOCUMENT = " ".join(f"Line {i}: the tide comes in over the flats and goes out again."
                    for i in range(40))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    out = {}
    for name, (arch, over, _, _) in MODELS.items():
        out[name] = root / name
        save_model_folder(out[name], arch, over)
    return out


def _start(name, folders, data, log, ranks=1, peer_timeout=20):
    _, _, sharding, kv = MODELS[name]
    args = ["--model", str(folders[name]), "--kv", kv, "--max-tokens", "10",
            "--prefill-step-size", "64"]
    if ranks > 1:
        args += ["--sharding", sharding, "--peer-timeout", str(peer_timeout)]
    return Assistant(data, *args, log_file=log, ranks=ranks)


def _chat(server, text, cid=None, max_tokens=10, stop=None, forget=False):
    """(reply, usage); `forget`: delete the conversation after it."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}
    if stop:
        body["stop"] = [stop]
    if cid:
        body["conversation"] = cid
    status, out = server.request("POST", "/v1/chat/completions", body)
    assert status == 200, out
    if forget:
        assert server.request("DELETE", f"/api/conversations/{out['conversation']}")[0] == 200
    return out["choices"][0]["message"]["content"], out["usage"]


def _session(server):
    """Concurrent chats, then a conversation: a document and two turns.
    What came back, and the conversation's memory panel."""
    out, go = {}, threading.Barrier(len(QUESTIONS))

    def one(i):
        go.wait()
        out[i] = _chat(server, QUESTIONS[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    # Deleted, so that the next prompt cannot start from a copy of its cache.
    replies = [out[i] for i in range(len(QUESTIONS))] + [_chat(server, LONG, forget=True)]
    # Cut by a stop string from its middle: the ranks ran on, the reply ends there.
    full = replies[-1][0]
    stopped = _chat(server, LONG, stop=full[len(full) // 2:len(full) // 2 + 3])
    assert full.startswith(stopped[0]) and len(stopped[0]) < len(full), (full, stopped)
    replies.append(stopped)
    status, body = server.request("POST", "/api/conversations", {"title": "tides"})
    cid = body["conversation"]["id"]
    status, done = server.events(f"/api/conversations/{cid}/documents",
                                 {"name": "tides.txt", "text": DOCUMENT})
    assert status == 200 and "error" not in done, done
    turns = [_chat(server, q, cid) for q in ("What comes in?", "And then?")]
    memory = server.request("GET", f"/api/conversations/{cid}")[1]["memory"]
    return replies, turns, memory, cid


@pytest.mark.parametrize("name", list(MODELS))
def test_two_ranks_answer_as_one_process(folders, tmp_path, name):
    sharding = MODELS[name][2]
    one = _start(name, folders, tmp_path / "one", tmp_path / "one.log")
    try:
        ref = _session(one)
        ref_resumed = _chat(one, "Once more?", ref[3])
    finally:
        one.stop()
    assert len({r for (r, _) in ref[0]}) == len(QUESTIONS) + 2 and all(r for r, _ in ref[0])

    data, log = tmp_path / "two", tmp_path / "two.log"
    two = _start(name, folders, data, log, ranks=2)
    try:
        assert two.info()["sharding"] == {"sharding": sharding, "ranks": 2}
        got = _session(two)
        # A client that leaves mid-stream: every rank drops the chat from the
        # batch, keeps its cache, and the conversation goes on from it.
        conn = http.client.HTTPConnection(two.host, two.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": "Tell me a long story"}],
            "conversation": "left", "max_tokens": 2000, "stream": True}))
        resp = conn.getresponse()
        resp.read(300)
        resp.close()
        conn.close()
        assert two.wait_log("cancelled", 30)
        after = _chat(two, "And then?", "left")
        assert after[1]["prompt_tokens_details"]["cached_tokens"] > 10
    finally:
        two.stop()
    assert got[0] == ref[0]  # each concurrent chat: text and usage
    assert got[1] == ref[1]  # the turns after the document, from its cache
    assert got[1][0][1]["prompt_tokens_details"]["cached_tokens"] > len(DOCUMENT) // 8
    mem, ref_mem = got[2], ref[2]
    assert mem["tokens"] == ref_mem["tokens"] and mem["cache_bytes"] == ref_mem["cache_bytes"]
    rows = mem["ranks"]
    assert [r["rank"] for r in rows] == [0, 1]
    assert sum(r["nbytes"] for r in rows) == ref_mem["cache_bytes"]
    if sharding == "tensor":  # every layer, half the kv heads
        assert [r["what"] for r in rows] == ["kv heads 0-1 of every layer",
                                             "kv heads 2-3 of every layer"]
        assert rows[0]["nbytes"] == rows[1]["nbytes"] == ref_mem["cache_bytes"] // 2
    else:  # mlx-lm gives rank 0 the last layers
        assert sorted(r["what"] for r in rows) == ["layers 0-1", "layers 2-3"]
    assert all(r["peak"] > 0 for r in rows)
    assert (data / "ranks" / "1" / "conversations" / got[3] / "cache.safetensors").is_file()
    assert not any(x in two.log() for x in ("Traceback", " ERROR", "error: rank"))

    # A restart resumes the conversation from every rank's saved share.
    two = _start(name, folders, data, log, ranks=2)
    try:
        resumed = _chat(two, "Once more?", got[3])
        assert two.request("DELETE", f"/api/conversations/{got[3]}")[0] == 200
        deadline = time.monotonic() + 10  # the follower hears of it at the next beat
        follower_copy = data / "ranks" / "1" / "conversations" / got[3]
        while follower_copy.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not follower_copy.exists()
    finally:
        two.stop()
    assert resumed == ref_resumed
    assert resumed[1]["prompt_tokens_details"]["cached_tokens"] > len(DOCUMENT) // 8
    assert [p.returncode for p in [two.proc, *two.followers]] == [0, 0], two.log()[-3000:]


@pytest.mark.parametrize("how", ["SIGKILL", pytest.param("SIGSTOP", marks=pytest.mark.slow)])
def test_a_lost_rank_stops_the_server(folders, tmp_path, how):
    """Rank 1 dies (its sockets close) or freezes (they stay open and silent)
    while a chat decodes: the chat is answered 503 naming the lost rank, and
    rank 0 exits with an error instead of hanging."""
    two = _start("tensor", folders, tmp_path / "data", tmp_path / "two.log", ranks=2,
                 peer_timeout=5)
    try:
        _chat(two, "Warm up")
        status = {}

        def long_chat():
            body = {"messages": [{"role": "user", "content": "Tell me a long story"}],
                    "max_tokens": 2000, "temperature": 0}
            status["chat"] = two.request("POST", "/v1/chat/completions", body)

        t = threading.Thread(target=long_chat)
        t.start()
        time.sleep(2.0)  # decoding
        t0 = time.monotonic()
        two.followers[0].send_signal(getattr(signal, how))
        two.proc.wait(timeout=60)
        took = time.monotonic() - t0
        t.join(30)
    finally:
        two.kill()
    assert two.proc.returncode == distributed.EXIT_LOST, two.log()[-2000:]
    assert took < 15  # the watchdog's 5 s, or at once
    code, body = status["chat"]
    assert code == 503 and body["error"]["code"] == "rank_lost", body
    assert "rank 1" in body["error"]["message"]
    assert "error: rank 0 of 2" in two.log() and "rank 1" in two.log()
