"""Stopping mlx_kvq.assistant: SIGINT (Ctrl-C) or SIGTERM, right after an
answered turn or while a reply streams, ends it with status 0 and nothing on
stderr but its log (no abort at exit from MLX on the worker thread), every
answered turn saved, the interrupted one as far as it got."""

import http.client
import json
import signal

import pytest

from mlx_kvq.apps.assistant.store import Store
from mlx_kvq.harness.faults import Assistant, chat

ABORTS = ("terminate called", "Aborted", "Fatal Python error", "Traceback")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("moment", ["after", "during"])
def test_a_signal_stops_it_cleanly(tmp_path, sig, moment):
    data = tmp_path / "data"
    server = Assistant(data, "--max-tokens", "400", log_file=tmp_path / "server.log")
    try:
        answered = chat(server, "answered", "Name a fruit.", max_tokens=3)
        streamed = None
        if moment == "during":
            conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
            conn.request("POST", "/v1/chat/completions", json.dumps({
                "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": 400, "stream": True, "conversation": "streamed"}))
            streamed = conn.getresponse()
            assert streamed.status == 200
            text = ""
            while not text:  # a token has come
                text += content(streamed.readline())
        server.proc.send_signal(sig)
        if streamed is not None:  # the reply ends (cancelled), it is not cut
            lines = streamed.read().rstrip().splitlines()
            assert lines[-1] == b"data: [DONE]", lines[-3:]
            text += "".join(content(line) for line in lines)
            conn.close()
        assert server.proc.wait(timeout=90) == 0, server.log()[-2000:]
    finally:
        server.stop()
    log = server.log()
    assert not [a for a in ABORTS if a in log], log[-2000:]
    store = Store(data)
    turn = store.get("answered").messages
    assert [m["role"] for m in turn] == ["user", "assistant"]
    assert turn[1]["content"] == answered["choices"][0]["message"]["content"]
    if moment == "during":
        turn = store.get("streamed").messages
        assert [m["role"] for m in turn] == ["user", "assistant"]
        assert turn[1]["content"] == text


def content(line: bytes) -> str:
    """The text a streamed chunk carries."""
    if not line.startswith(b"data: {"):
        return ""
    choices = json.loads(line[6:])["choices"]
    return choices[0]["delta"].get("content") or "" if choices else ""
