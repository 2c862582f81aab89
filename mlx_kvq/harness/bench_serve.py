"""Benchmark: concurrent chats through the OpenAI API, the assistant against
mlx_lm.server, in one run.

Each server runs in its own subprocess on a free loopback port with the same
model (the embedded one by default) and the same BLAS; the official `openai`
client sends N short story requests (temperature 0, max_tokens each) twice:
all together (N threads started at once), in --rounds rounds that
alternate between the servers (both are up, the idle one waits on its
socket), so that drift in machine speed hits both alike; then one after
another, once each. The together ratio reported is the median of the
rounds' ratios, each round's times printed beside it.

    python -m mlx_kvq.harness.bench_serve --chats 8 --max-tokens 64 --kv k4v4 --rounds 3

With --ranks N --sharding tensor|pipeline both servers run sharded over N
local ranks (the ring backend over loopback, started as mlx.launch starts
them): the assistant with --sharding, mlx_lm.server in its distributed mode
(--pipeline for pipeline sharding), on a model mlx-lm can shard that way.
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import List, Optional

from mlx_kvq import blas, distributed
from mlx_kvq.commands.cli_types import positive_int
from mlx_kvq.models import default_model_path
from .extras import need

TOPICS = ("a lighthouse keeper", "a lost kitten", "a robot learning to paint",
          "a dragon afraid of fire", "two rival bakers", "a time-travelling mailman",
          "a garden on the moon", "a shy volcano", "a library that never closes",
          "an old violin", "a penguin in the desert", "a clock that runs backwards")
GOAL_VS_PEER, GOAL_TOGETHER = 1.0, 2.5


def prompts(n: int) -> List[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


@dataclass
class Server:
    """A server subprocess; `url` is its OpenAI base URL once it answers."""

    name: str
    cmd: List[str]
    port: int
    ranks: int = 1
    proc: Optional[subprocess.Popen] = None
    followers: List[subprocess.Popen] = field(default_factory=list)
    log: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        env = dict(os.environ)
        if blas.status.startswith("OpenBLAS"):  # the peer imports mlx itself
            env["LD_PRELOAD"] = blas.status.split("(", 1)[1].rstrip(")")
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self._dir = tempfile.TemporaryDirectory()
        rings = [{}] if self.ranks == 1 else distributed.local_ranks(self.ranks, self._dir.name)
        procs = [subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                  env={**env, **ring}) for ring in rings]
        self.proc, self.followers = procs[0], procs[1:]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not start:\n{self.log}")

    def __exit__(self, *exc):
        for p in [self.proc, *self.followers]:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._dir.cleanup()
        self._log.seek(0)
        self.log = self._log.read()[-4000:]
        self._log.close()


@dataclass
class Run:
    server: str
    rounds_s: List[float] = field(default_factory=list)  # all chats together, per round
    one_by_one_s: float = 0.0
    completion_tokens: List[int] = field(default_factory=list)
    replies: List[str] = field(default_factory=list)

    @property
    def together_s(self) -> float:
        return statistics.median(self.rounds_s)


def ask(client, model: str, prompt: str, max_tokens: int):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0.0,
        max_tokens=max_tokens)
    return r.choices[0].message.content, r.usage.completion_tokens


def together(client, model, texts, max_tokens):
    out = [None] * len(texts)
    go = threading.Barrier(len(texts))

    def one(i):
        go.wait()
        out[i] = ask(client, model, texts[i], max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t, out


def measure(servers: List[Server], model: str, n: int, max_tokens: int,
            rounds: int) -> List[Run]:
    """The servers' runs: `rounds` together-rounds alternating between them,
    then one after another, once each."""
    openai = need("openai", "the serving benchmark (mlx_kvq.harness.bench_serve)")
    clients = [openai.OpenAI(base_url=s.url, api_key="none", timeout=3600, max_retries=0)
               for s in servers]
    runs = [Run(s.name) for s in servers]
    texts = prompts(n)
    for client in clients:
        ask(client, model, "Hello", 4)  # warm-up
    for _ in range(rounds):
        for client, run in zip(clients, runs):
            seconds, out = together(client, model, texts, max_tokens)
            run.rounds_s.append(seconds)
            run.completion_tokens = [c for _, c in out]
            run.replies = [r for r, _ in out]
    for client, run in zip(clients, runs):
        t = time.perf_counter()
        for text in texts:
            ask(client, model, text, max_tokens)
        run.one_by_one_s = time.perf_counter() - t
    return runs


def format_runs(runs: List[Run], n: int) -> str:
    each = [" ".join(f"{x:.1f}" for x in r.rounds_s) for r in runs]
    w = max(len(e) for e in each) + 9
    lines = [f"{'server':<42} {'together s (rounds)':>{w}} {'one by one s':>12} "
             f"{'speedup':>7} {'tokens':>7}"]
    for r, e in zip(runs, each):
        lines.append(f"{r.server:<42} {f'{r.together_s:.1f} ({e})':>{w}} "
                     f"{r.one_by_one_s:>12.1f} {r.one_by_one_s / r.together_s:>6.2f}x "
                     f"{sum(r.completion_tokens):>7}")
    ours, peer = runs[0], runs[-1]
    ratios = [a / b for a, b in zip(ours.rounds_s, peer.rounds_s)]
    lines.append(f"{n} chats together: assistant / mlx_lm.server time "
                 f"{statistics.median(ratios):.2f}x, median of the rounds' "
                 f"{' '.join(f'{x:.2f}' for x in ratios)} (goal <= {GOAL_VS_PEER}x); "
                 f"assistant one-by-one / together {ours.one_by_one_s / ours.together_s:.2f}x "
                 f"(goal >= {GOAL_TOGETHER}x)")
    same = sum(a == b for a, b in zip(ours.replies, peer.replies))
    lines.append(f"replies identical to mlx_lm.server's: {same}/{n}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Model folder (default: the embedded model)")
    p.add_argument("--kv", default="k4v4", help="The assistant's KV spec")
    p.add_argument("--chats", type=positive_int, default=8)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--ranks", type=positive_int, default=1,
                   help="Run both servers sharded over this many local ranks")
    p.add_argument("--sharding", choices=distributed.SHARDINGS, default="tensor")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="Rounds of all chats together, alternating between the servers")
    args = p.parse_args(argv)
    model = str(args.model or default_model_path())
    ours, peers = [], []
    if args.ranks > 1:
        ours = ["--sharding", args.sharding]
        peers = ["--pipeline"] if args.sharding == "pipeline" else []
    with tempfile.TemporaryDirectory() as data:
        servers = [
            Server(f"mlx_kvq.assistant --kv {args.kv} {' '.join(ours)}".rstrip(),
                   [sys.executable, "-m", "mlx_kvq.apps.assistant", "--model", model,
                    "--kv", args.kv, "--data-dir", data, "--port", str(port := distributed.free_ports(1)),
                    "--queue-size", str(max(8, args.chats)), "--log-level", "WARNING", *ours],
                   port, args.ranks),
            Server(f"mlx_lm.server {' '.join(peers)} (full-precision batch cache)",
                   [sys.executable, "-m", "mlx_lm.server", "--model", model,
                    "--port", str(port := distributed.free_ports(1)), "--log-level", "WARNING", *peers],
                   port, args.ranks),
        ]
        with contextlib.ExitStack() as up:
            for server in servers:
                up.enter_context(server)
            runs = measure(servers, model, args.chats, args.max_tokens, args.rounds)
    where = "one process each" if args.ranks == 1 else \
        f"each over {args.ranks} local ranks ({args.sharding} sharding)"
    print(f"model {model}; servers {where}; {args.chats} chats, max_tokens "
          f"{args.max_tokens}, temperature 0; "
          f"BLAS {blas.status}; mean reply tokens "
          f"{statistics.mean(runs[0].completion_tokens):.1f}")
    print(format_runs(runs, args.chats))


if __name__ == "__main__":
    main()
