"""mlx_kvq.assistant under faults (mlx_kvq/harness/faults.py, pressure.py,
fuzz_http.py): slow and hostile clients, HTTP API fuzzing, SIGKILL at aimed
moments and memory pressure, in bounded forms; `pytest --slow` runs the
long ones."""

import pytest

from mlx_kvq.harness import faults, fuzz_http, pressure
from mlx_kvq.harness.reliability import SECTIONS, table

READ_TIMEOUT = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    s = faults.Assistant(tmp / "data", "--max-tokens", "4",
                         "--read-timeout", str(READ_TIMEOUT), "--write-timeout", "20",
                         "--max-connections", "400", log_file=tmp / "server.log")
    yield s
    s.stop()


def test_slow_and_hostile_clients(server):
    """50 half-open connections, 3 slow-byte clients, a streamer that never
    reads and two clients that leave mid-reply, then a good request: it is
    answered promptly; requests beyond --max-connections get 503 at once;
    the server lets go of every connection after --read-timeout, no connection
    holds a thread (only the running generations do, one each), and the
    generations of the clients that left stop."""
    r = pressure.slow_clients(server, half_open=50, slow=3, stream_tokens=400, extra=5,
                            settle=READ_TIMEOUT + 12)
    assert r["connect_s"] < 5, r  # no connect waits for a full listen backlog
    assert r["threads_held"] <= 3, r  # the stalled streamer, the leaver, the quiet one
    # Neither waits for a timeout (--write-timeout is 20 s here).
    assert r["idle_latency_s"] < 15, r
    assert r["good_status"] == 200 and r["good_latency_s"] < 15, r
    assert r["refused"] == 5 and r["refuse_s_max"] < 1, r
    assert r["released"] == r["held"], r
    assert r["threads_after"] <= 0 and r["running_after"] == 0, r
    assert r["leaver_generated"] < r["stream_tokens"], r
    assert r["quiet_generated"] < r["stream_tokens"], r
    assert "Traceback" not in server.log()


def test_half_requests_hold_no_thread(server):
    """300 connections send half a request and stop: a good chat request sent
    while all are open is answered promptly, the server holds no thread for
    them, and each is closed by the read deadline, with 408."""
    r = pressure.half_requests(server, count=300, settle=READ_TIMEOUT + 10)
    assert r["good_status"] == 200 and r["good_latency_s"] < 10, r
    assert r["threads_held"] <= 0, r
    assert r["open_connections"] >= 300, r  # all held when the good request was sent
    assert r["closed"] == r["answered_408"] == 300, r
    assert r["closed_s"] < READ_TIMEOUT + 10, r


def test_http_fuzz(server):
    """Arbitrary JSON bodies, /api requests, methods, paths and headers: every
    answer is a 2xx/4xx with the JSON error body, and the server goes on."""
    rows = fuzz_http.run(server, examples=60, seed=0)
    assert [r["target"] for r in rows] == ["http:chat", "http:api", "http:http"]
    for r in rows:
        assert r["examples"] >= 30 and r["failures"] == 0, r
    assert "Traceback" not in server.log()


def check_kills(r: dict, rounds: int):
    assert r["rounds"] == rounds and r["survived"] == rounds, r
    assert r["turns_lost"] == 0 and not r["problems"], r
    assert r["answered_turns"] >= rounds and r["temp_files_after_restart"] == 0, r
    assert "none" not in r["hit"], r  # every aimed moment was reached


def test_kill_rounds(tmp_path):
    """SIGKILL at a conversation save, a cache save and mid-decode: nothing
    answered is lost, every conversation loads, the server serves."""
    r = faults.kill_rounds(tmp_path / "data", rounds=3, seed=1, log_file=tmp_path / "log")
    check_kills(r, 3)


@pytest.mark.slow
def test_kill_rounds_long(tmp_path):
    r = faults.kill_rounds(tmp_path / "data", rounds=18, seed=7, log_file=tmp_path / "log")
    check_kills(r, 18)
    assert set(r["hit"]) == set(faults.MOMENTS), r


def test_memory_pressure(tmp_path):
    """Documents and turns against --memory just above the weights: each is
    served or refused with the budget message; the peak stays in the budget."""
    r = pressure.memory_pressure(tmp_path / "data", requests=6, seed=0,
                               log_file=tmp_path / "log")
    assert r["alive"] and not r["tracebacks"] and not r["problems"], r
    assert r["served"] >= 3 and r["refused_budget"] >= 1, r
    assert r["peak"] <= r["budget"], r


def test_report_sections_and_table():
    assert [s[0] for s in SECTIONS] == ["kill", "fuzz", "runtime-fuzz", "slow", "memory"]
    out = table([{"target": "a", "examples": 3}, {"target": "bb", "failures": 0}])
    assert out.splitlines() == ["target  examples  failures", "a       3                 ",
                                "bb                0       "]


def test_report_runs_the_runtime_fuzz_targets(capsys):
    from mlx_kvq.harness import reliability

    assert reliability.main(["--only", "runtime-fuzz", "--examples", "10"]) == 0
    out = capsys.readouterr().out
    assert "caches, specs and file loaders" in out
    assert all(t in out for t in ("cache", "spec", "loaders"))
