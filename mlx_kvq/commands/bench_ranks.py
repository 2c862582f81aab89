"""A sharded model's speed and memory per rank against one process:
`mlx_kvq.bench_ranks` (python -m mlx_kvq.commands.bench_ranks).

One command runs both sides in turn, each as its own processes: the model in
one process (mlx_kvq.load), then sharded over --ranks local ranks started by
`mlx.launch --backend ring` (distributed.load, --sharding tensor|pipeline).
Every process runs the model bench's case (bench.run_case: prefill the same
--context corpus tokens in --prefill-step-size chunks, then decode
--decode-tokens greedily) for the full-precision cache (mlx-lm's KVCache,
"fp") and every --kv spec, interleaved, --repeats rounds (best speed,
largest peak). Each rank reports its own prefill and decode tokens/s, its
peak memory per phase (reset per phase, weights included), its weights and
its KV cache bytes; the table shows every rank and the ratios to the one
process, from the same run.

Ranks on one machine share its cores, memory bandwidth and loopback
sockets: the figures say what sharding costs in collectives and
per-rank memory here, not what a link between Macs gives.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_kvq import distributed
from .bench import _corpus_tokens
from .bench_model import clear, run_case
from .cli_types import add_model, add_prefill_step_size, nonneg_int, positive_int
from .cli_types import tokens as token_count
from mlx_kvq.models import load
from .schemes import Scheme

FIELDS = ("prefill_tps", "decode_tps", "prefill_peak", "decode_peak", "kv_bytes", "weights")


def _parser():
    p = argparse.ArgumentParser(
        description="Speed and per-rank memory of a model sharded over local ranks "
        "(mlx.launch --backend ring) against one process")
    add_model(p)
    p.add_argument("--ranks", type=positive_int, default=2)
    p.add_argument("--sharding", choices=distributed.SHARDINGS, default="tensor")
    p.add_argument("--kv", nargs="+", default=["k4v4"],
                   help="mlx_kvq specs; the full-precision KVCache (fp) is always measured")
    p.add_argument("--context", type=token_count, default=1024)
    p.add_argument("--decode-tokens", type=nonneg_int, default=32)
    add_prefill_step_size(p)
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--json", default=None, help="Write the measurements as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one side's output
    return p


# -- one side (a process, or each rank) -----------------------------------------------


def worker(args):
    group = distributed.init()
    if group.size() == 1:
        model, tokenizer = load(args.model)
        shard = None
    else:
        model, tokenizer, shard = distributed.load(args.model, args.sharding, group)
    clear()
    weights = mx.get_active_memory()
    tokens, _ = _corpus_tokens(tokenizer, args.context)
    tokens = (tokens * (-(-args.context // max(len(tokens), 1))))[:args.context]
    best = {}
    for _ in range(args.repeats):
        for s in ["fp", *args.kv]:
            c = run_case(model, tokens, s, args.context, args.decode_tokens,
                         args.prefill_step_size)
            b = best.setdefault(s, c)
            for f in ("prefill_tps", "decode_tps"):
                setattr(b, f, max(getattr(b, f), getattr(c, f)))
            for f in ("prefill_peak", "decode_peak"):
                setattr(b, f, max(getattr(b, f), getattr(c, f)))
    out = {}
    for s, c in best.items():  # every rank's figures, in rank order
        mine = [int(c.prefill_tps * 1000), int(c.decode_tps * 1000), c.prefill_peak,
                c.decode_peak, c.kv_bytes, weights]
        rows = distributed.gather(mine, group)
        out[s] = [{f: (v / 1000 if f.endswith("tps") else int(v)) for f, v in zip(FIELDS, r)}
                  for r in rows]
    if group.rank() == 0:
        what = shard.describe() if shard else "one process"
        Path(args.worker).write_text(json.dumps({"shard": what, "cases": out}))


# -- both sides, the table ------------------------------------------------------------


def _argv(args, out):
    argv = ["-m", "mlx_kvq.commands.bench_ranks", "--worker", str(out), "--sharding", args.sharding,
            "--context", str(args.context), "--decode-tokens", str(args.decode_tokens),
            "--prefill-step-size", str(args.prefill_step_size), "--repeats",
            str(args.repeats), "--kv", *args.kv]
    return argv + (["--model", str(args.model)] if args.model else [])


def _side(cmd, out, what):
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if not out.is_file():
        sys.exit(f"error: {what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(out.read_text()), time.perf_counter() - t


def format_table(one, many, ranks) -> str:
    head = (f"{'scheme':<7}{'side':<13}{'prefill t/s':>12}{'x 1':>6}{'decode t/s':>11}"
            f"{'x 1':>6}{'peak prefill':>14}{'x 1':>6}{'peak decode':>13}{'x 1':>6}"
            f"{'weights':>10}{'KV':>10}{'x 1':>6}")
    lines = [head, "-" * len(head)]
    mib = 2 ** 20
    for s, (ref,) in one["cases"].items():
        rows = [("1 process", ref)] + [(f"rank {r} of {ranks}", c)
                                       for r, c in enumerate(many["cases"][s])]
        for side, c in rows:
            lines.append(
                f"{s:<7}{side:<13}{c['prefill_tps']:>12.1f}{c['prefill_tps'] / ref['prefill_tps']:>6.2f}"
                f"{c['decode_tps']:>11.2f}{c['decode_tps'] / ref['decode_tps']:>6.2f}"
                f"{c['prefill_peak'] / mib:>10.0f} MiB{c['prefill_peak'] / ref['prefill_peak']:>6.2f}"
                f"{c['decode_peak'] / mib:>9.0f} MiB{c['decode_peak'] / ref['decode_peak']:>6.2f}"
                f"{c['weights'] / mib:>6.0f} MiB{c['kv_bytes'] / mib:>6.2f} MiB"
                f"{c['kv_bytes'] / ref['kv_bytes']:>6.2f}")
    return "\n".join(lines)


def run(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    for s in args.kv:
        try:
            if Scheme(s).baseline:
                raise ValueError(f"--kv {s}: mlx_kvq specs only")
            Scheme(s).validate()
        except ValueError as e:
            p.error(str(e))
    if args.worker:
        return worker(args)
    if args.ranks < 2:
        p.error("--ranks must be at least 2 (the one-process side is always run)")
    with tempfile.TemporaryDirectory() as tmp:
        one, t1 = _side([sys.executable, *_argv(args, Path(tmp) / "one.json")],
                        Path(tmp) / "one.json", "the one-process side")
        launch = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; "
                  "main()", "--backend", "ring", "-n", str(args.ranks), "--python",
                  sys.executable, "--"]
        many, tn = _side(launch + _argv(args, Path(tmp) / "ranks.json"),
                         Path(tmp) / "ranks.json", f"the {args.ranks}-rank side")
    print(f"==== {args.ranks} local ranks (mlx.launch --backend ring, --sharding "
          f"{args.sharding}) vs one process: {args.model or 'the embedded model'}; "
          f"{args.context}-token prompt in {args.prefill_step_size}-token chunks, "
          f"{args.decode_tokens} decode tokens, best of {args.repeats} interleaved rounds; "
          f"peaks include the weights; x 1 = over the one process")
    print(f"cores: {os.cpu_count()} shared by all ranks; wall time: one process "
          f"{t1:.0f} s, {args.ranks} ranks {tn:.0f} s (loading included)")
    print(format_table(one, many, args.ranks))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"ranks": args.ranks, "sharding": args.sharding, "one_process": one,
             "sharded": many, "args": {k: v for k, v in vars(args).items() if k != "worker"}},
            indent=1))
    return one, many


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
