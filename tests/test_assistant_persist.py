"""mlx_kvq.assistant persistence: conversations continue after a restart from
their saved quantized caches; damaged or foreign cache files are refused with
a message, and their conversations keep their messages; a reply goes out
before its cache is saved."""

import json

from mlx_kvq.apps.assistant.store import PAUSE_ENV
from mlx_kvq.harness import faults

from test_assistant import Assistant, ask


def turn(server, cid, text):
    return ask(server.client(), [{"role": "user", "content": text}], max_tokens=3,
               extra_body={"conversation": cid})


def damage(data):
    """Flip bytes inside one cache, truncate another, make a third another model's."""
    folder = data / "conversations"
    path = folder / "corrupt" / "cache.safetensors"
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    path.write_bytes(raw)
    path = folder / "truncated" / "cache.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    path = folder / "foreign" / "cache.json"
    info = json.loads(path.read_text())
    info["model"] = "0123456789abcdef"
    path.write_text(json.dumps(info))


def test_reply_is_sent_before_its_cache_is_saved(tmp_path):
    """A reply goes out once its messages are saved: with the worker held at the
    cache save, the client has its answer; killed there, the restart has the
    turn, no temporary file, and the conversation goes on."""
    data, log, pause = tmp_path / "data", tmp_path / "server.log", tmp_path / "pause"
    pause.write_text("cache-save")
    server = faults.Assistant(data, log_file=log, env={PAUSE_ENV: str(pause)})
    try:
        body = faults.chat(server, "held", "Tell me about owls.", max_tokens=3)
        assert server.wait_log("paused at cache-save", 30)
    finally:
        server.kill()
    reply = body["choices"][0]["message"]["content"]

    server = Assistant(data, log_file=log)
    try:
        _, saved = server.request("GET", "/api/conversations/held")
        assert [(m["role"], m["content"]) for m in saved["conversation"]["messages"]] == [
            ("user", "Tell me about owls."), ("assistant", reply)]
        assert faults.temp_files(data) == []
        assert turn(server, "held", "And then?").usage.prompt_tokens > 0
    finally:
        server.stop()


def test_restart_resumes_and_refuses_damaged_caches(tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    topics = {"intact": "rivers", "corrupt": "hills", "truncated": "lakes",
              "foreign": "roads"}
    server = Assistant(data, log_file=log)
    try:
        first = {cid: turn(server, cid, f"Tell me about {t}.") for cid, t in topics.items()}
    finally:
        server.stop()
    damage(data)

    server = Assistant(data, log_file=log)
    try:
        _, listing = server.request("GET", "/api/conversations")
        assert {c["id"] for c in listing["conversations"]} == set(topics)
        for cid, words in [("corrupt", "damaged (sha256"), ("truncated", "truncated"),
                           ("foreign", "another model")]:
            status, body = server.request("GET", f"/api/conversations/{cid}")
            assert status == 200
            assert "refused" in body["memory"]["note"] and words in body["memory"]["note"]
            assert [m["role"] for m in body["conversation"]["messages"]] == [
                "user", "assistant"]
            assert f"conversation {cid}: saved KV cache refused" in server.log()
        _, body = server.request("GET", "/api/conversations/intact")
        mem = body["memory"]
        assert mem["note"] is None and not mem["resident"]  # parked on disk
        assert mem["tokens"] == first["intact"].usage.total_tokens

        # The intact conversation continues from its saved cache: no re-prefill.
        r = turn(server, "intact", "And then?")
        assert r.usage.prompt_tokens_details.cached_tokens >= \
            first["intact"].usage.prompt_tokens
        # A damaged one is rebuilt from its messages, and the reply says so.
        r = turn(server, "corrupt", "And then?")  # at most the template's start from another's
        assert r.usage.prompt_tokens_details.cached_tokens < first["corrupt"].usage.prompt_tokens
        assert "refused" in r.notice and "rebuilt" in r.notice
        _, body = server.request("GET", "/api/conversations/corrupt")
        assert body["memory"]["note"] is None and body["memory"]["resident"]
        assert len(body["conversation"]["messages"]) == 4
    finally:
        server.stop()

    # Another KV spec: the saved caches are refused, the conversations kept.
    # With --max-kv-size a turn may outgrow it: the reply says tokens were dropped.
    server = Assistant(data, "--kv", "k4v2", "--max-kv-size", "128", log_file=log)
    try:
        _, body = server.request("GET", "/api/conversations/intact")
        assert "KV spec k4v4-g32-r64-s4, the server runs k4v2" in body["memory"]["note"]
        assert len(body["conversation"]["messages"]) == 4
        r = turn(server, "intact", "Tell me more about rivers. " * 12)
        assert r.usage.prompt_tokens > 128
        assert "the most recent 128 tokens (--max-kv-size)" in r.notice
        assert "KV spec k4v4" in r.notice  # and the refused cache was rebuilt
    finally:
        server.stop()
