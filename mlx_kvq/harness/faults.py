"""Crash harness for mlx_kvq.assistant, run by the tests and by
mlx_kvq.reliability (pressure.py has the slow-client and memory harnesses).

    Assistant        the server in a subprocess on a data dir (stderr, its
                     log, to a file), also the tests' server
    kill_rounds      SIGKILL at aimed moments (prefill, decode, conversation
                     save, cache save, sidecar save, parking), restart, check:
                     every answered turn is there with its messages, every
                     conversation loads (its cache resumes, or is rebuilt with
                     a logged reason), no temporary files are left, it serves

Save and park moments are aimed at with the store's fault points
($MLX_KVQ_ASSISTANT_PAUSE, see store.py: the process hangs there and is
killed); prefill and decode ones by killing a random time after a request
starts, or after a random number of streamed tokens. It returns a dict of
figures; a fixed seed replays the same faults.
"""

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from mlx_kvq import distributed

from mlx_kvq.apps.assistant.store import PAUSE_ENV
from .extras import need

START_TIMEOUT = 180
SAVE_POINTS = ("conversation-save", "cache-save", "sidecar-save")
MOMENTS = ("prefill", "decode", *SAVE_POINTS, "park")
PREFILL_STEP = 64
TOPICS = ("rivers", "bread", "owls", "tides", "glass", "maps", "bees", "snow")


class Assistant:
    """`mlx_kvq.assistant` in a subprocess on a free loopback port."""

    def __init__(self, data_dir, *args, log_file, env: Optional[dict] = None, ranks: int = 1):
        """`ranks` > 1 (with --sharding in `args`): that many local ranks over
        the ring backend, started as mlx.launch starts them; rank 0 serves,
        `followers` are the others."""
        self.log_file = Path(log_file)
        cmd = [sys.executable, "-m", "mlx_kvq.apps.assistant", "--port", "0",
               "--data-dir", str(data_dir), *args]
        rings = [{}] if ranks == 1 else distributed.local_ranks(ranks, self.log_file.parent)
        envs = [{**os.environ, **(env or {}), **ring} for ring in rings]
        with open(self.log_file, "a") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=envs[0])
            self.followers = [subprocess.Popen(cmd, stdout=err, stderr=err, env=e)
                              for e in envs[1:]]
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout],
                         daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            m = re.search(r"serving (http://\S+/)", line)
            if m:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the assistant did not start:\n{self.log()}")
        self.url = m.group(1)
        host, port = re.match(r"http://([^:/]+):(\d+)/", self.url).groups()
        self.host, self.port = host, int(port)

    def stop(self):
        """SIGTERM to rank 0, which stops its followers."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=60)
        for p in self.followers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill(self):
        """SIGKILL: no handler runs, nothing is flushed."""
        for p in [self.proc, *self.followers]:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def threads(self) -> int:
        """Threads of the server process now (Linux)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"Threads:\s+(\d+)", status).group(1))

    def client(self):
        openai = need("openai", "an OpenAI client of the assistant (faults.Assistant.client)")
        return openai.OpenAI(base_url=self.url + "v1", api_key="unused", max_retries=0,
                             timeout=120)

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, JSON body) of a raw request; `body` bytes are sent as is."""
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            if body is not None and not isinstance(body, bytes):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(data) if data else None

    def events(self, path: str, body: dict):
        """(status, the "done" or "error" event's data, or the JSON error body)
        of a page request answered as server-sent events."""
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            conn.request("POST", path, json.dumps(body))
            resp = conn.getresponse()
            if resp.status != 200:
                return resp.status, json.loads(resp.read() or b"null")
            last, kind = None, None
            for line in resp:
                line = line.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind in ("done", "error"):
                    last = json.loads(line[6:])
                    last = {"error": last} if kind == "error" else last
            return resp.status, last
        finally:
            conn.close()

    def info(self) -> dict:
        return self.request("GET", "/api/info")[1]

    def connect(self, rcvbuf: Optional[int] = None) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before connecting, so the window stays small
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(60)
        s.connect((self.host, self.port))
        return s

    def raw_post(self, path: str, body: dict) -> bytes:
        """A whole POST request as bytes."""
        data = json.dumps(body).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "\r\n").encode() + data

    def wait_log(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if text in self.log():
                return True
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def chat(server: Assistant, cid: str, text: str, max_tokens: int, timeout=120) -> dict:
    """One turn on conversation `cid` (its history is kept by the server)."""
    status, body = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
        "conversation": cid}, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"turn on {cid} answered {status}: {body}")
    return body


# -- kill rounds ---------------------------------------------------------------


def temp_files(data_dir: Path) -> List[str]:
    return sorted(str(p.relative_to(data_dir)) for p in Path(data_dir).rglob("*")
                  if ".tmp" in p.name)


def _check_restart(server: Assistant, data_dir: Path, answered: dict, log_from: int) -> dict:
    """After a restart: answered turns present, conversations load, no
    temporary files. Returns figures for this round."""
    out = {"turns_lost": 0, "rebuilt": 0, "unexplained": [], "temp_files": temp_files(data_dir)}
    for cid, expected in answered.items():
        status, body = server.request("GET", f"/api/conversations/{cid}")
        if status != 200:
            out["turns_lost"] += len(expected) // 2
            out["unexplained"].append(f"{cid}: GET answered {status}")
            continue
        saved = [(m["role"], m["content"]) for m in body["conversation"]["messages"]]
        if saved[:len(expected)] != expected:  # a lost or changed answered turn
            same = next((i for i, (a, b) in enumerate(zip(saved, expected)) if a != b),
                        min(len(saved), len(expected)))
            out["turns_lost"] += (len(expected) - same + 1) // 2
            out["unexplained"].append(f"{cid}: saved messages differ from the answered ones")
        answered[cid] = saved  # later turns build on what is on disk
    # Every conversation loads, also those whose first turn was never answered;
    # a refused cache is logged with its reason.
    for conv in server.request("GET", "/api/conversations")[1]["conversations"]:
        cid = conv["id"]
        status, body = server.request("GET", f"/api/conversations/{cid}")
        if status != 200:
            out["unexplained"].append(f"{cid}: GET answered {status}")
        elif body["memory"]["note"]:  # the GET checked the cache
            out["rebuilt"] += 1
            if f"conversation {cid}: saved KV cache refused" not in server.log()[log_from:]:
                out["unexplained"].append(f"{cid}: cache refused without a log line")
    return out


def _aimed_turns(server: Assistant, rng: random.Random, moment: str, answered: dict,
                 max_tokens: int, timeout: float = 60.0) -> str:
    """Answer turns until the moment is reached, then kill. Returns what was hit."""
    def pick():
        if answered and rng.random() < 0.6:
            return rng.choice(sorted(answered))
        return f"k{rng.randrange(1 << 30):08x}"

    def turn(cid, text):
        body = chat(server, cid, text, max_tokens)
        reply = body["choices"][0]["message"]["content"]
        answered.setdefault(cid, []).extend([("user", text), ("assistant", reply)])

    if moment in ("prefill", "decode"):
        for _ in range(rng.randint(0, 2)):  # some answered turns first
            turn(pick(), f"Tell me about {rng.choice(TOPICS)}.")
        cid = pick()
        long_prompt = moment == "prefill"
        text = (f"Here are notes on {rng.choice(TOPICS)}. " * (60 if long_prompt else 1)
                + "Summarize them.")
        sock = server.connect()
        sock.sendall(server.raw_post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": text}], "max_tokens": 64,
            "stream": True, "conversation": cid}))
        if long_prompt:  # somewhere in the prefill
            time.sleep(rng.uniform(0.05, 0.6))
            hit = "prefill"
        else:  # after a random number of streamed tokens
            want, got, buf = rng.randint(1, 12), 0, b""
            sock.settimeout(timeout)
            while got < want:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
                got = buf.count(b'"content"') - 1  # the first chunk carries the role
            hit = "decode"
        server.kill()
        sock.close()
        return hit
    # Save and park points: the server hangs there; answer turns until it does.
    paused = f"paused at {moment}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not server.wait_log(paused, 0):
        cid = pick() if moment != "park" else f"k{rng.randrange(1 << 30):08x}"
        text = (f"Say something about {rng.choice(TOPICS)}. " * (1 if moment != "park" else 8))

        def attempt():
            try:
                turn(cid, text)
            except (OSError, RuntimeError):
                pass  # killed while it was answered: not an answered turn

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        while t.is_alive() and not server.wait_log(paused, 0.05):
            pass
        if t.is_alive():
            server.kill()
            t.join(60)
    hit = moment if server.wait_log(paused, 0) else "none"
    server.kill()
    return hit


def kill_rounds(data_dir, rounds: int, seed: int = 0, log_file=None, max_tokens: int = 3,
                args=()) -> dict:
    """SIGKILL the assistant `rounds` times at moments drawn with `seed`
    (cycling through MOMENTS), checking after each restart. Figures: rounds
    survived, answered turns, turns lost, caches rebuilt, temporary files
    left after restarts, moments hit."""
    data_dir = Path(data_dir)
    log_file = Path(log_file or data_dir.parent / "kill_rounds.log")
    rng = random.Random(seed)
    answered = {}  # cid -> [(role, content)] as the clients were answered
    # A budget just above one 600-token conversation, with a small prefill
    # step so the caches dominate it: turns on a few conversations park the
    # idle ones.
    memory = str(one_chat_memory(600, PREFILL_STEP))
    out = {"rounds": 0, "survived": 0, "answered_turns": 0, "turns_lost": 0,
           "rebuilt": 0, "temp_files_after_restart": 0, "hit": {}, "problems": []}
    moments = rng.sample(MOMENTS, len(MOMENTS))  # each in turn, in a seeded order
    for r in range(rounds + 1):  # the last start only checks
        moment = moments[r % len(moments)]
        arm = data_dir.parent / "pause"
        arm.unlink(missing_ok=True)
        env = {PAUSE_ENV: str(arm)}
        log_from = len(log_file.read_text(errors="replace")) if log_file.exists() else 0
        server = Assistant(data_dir, "--memory", memory, "--max-tokens", str(max_tokens),
                           "--prefill-step-size", str(PREFILL_STEP), *args,
                           log_file=log_file, env=env)
        try:
            if r:
                check = _check_restart(server, data_dir, answered, log_from)
                out["turns_lost"] += check["turns_lost"]
                out["rebuilt"] += check["rebuilt"]
                out["temp_files_after_restart"] += len(check["temp_files"])
                out["problems"] += check["unexplained"] + check["temp_files"]
                try:  # it serves: turns on conversations (resumed or rebuilt)
                    for cid in rng.sample(sorted(answered), min(2, len(answered))):
                        body = chat(server, cid, "One more thing.", max_tokens)
                        answered[cid] += [("user", "One more thing."), (
                            "assistant", body["choices"][0]["message"]["content"])]
                    served = True
                except (OSError, RuntimeError) as e:
                    served = False
                    out["problems"].append(f"round {r}: not served after restart: {e}")
                out["survived"] += served and not check["turns_lost"] and \
                    not check["unexplained"] and not check["temp_files"]
            if r == rounds:
                break
            if moment in SAVE_POINTS or moment == "park":  # armed after the checks
                arm.write_text(f"{moment}:{rng.randint(1, 3)}")
            hit = _aimed_turns(server, rng, moment, answered, max_tokens)
            out["hit"][hit] = out["hit"].get(hit, 0) + 1
            out["rounds"] += 1
        finally:
            server.kill()
    out["answered_turns"] = sum(len(v) // 2 for v in answered.values())
    out["conversations"] = len(answered)
    return out


def one_chat_memory(tokens: int, prefill_step: int) -> int:
    """Bytes for the embedded model with the default KV spec and one
    conversation of `tokens` (weights, prefill workspace, its cache)."""
    from mlx_kvq import shapes
    from mlx_kvq.spec import DEFAULT_PRESET, parse_spec

    from mlx_kvq.apps.assistant.budget import Budget

    return Budget(shapes.load_shape(None), parse_spec(DEFAULT_PRESET), 0,
                  prefill_step).need([tokens])
