"""Speed and memory of one sequence: the model bench of `mlx_kvq.bench`.

For each context length, every scheme in turn (mlx_kvq
specs, mlx-lm's QuantizedKVCache as mlx<bits>, and the full-precision KVCache
as the reference) prefills the same tokens as mlx-lm does (chunks of
--prefill-step, then the last token), then decodes greedily; prefill and
decode tokens/s and the peak memory of each phase (reset per phase) are
measured. Cases are interleaved, so drift in machine speed hits all alike.
"""

import gc
import os
import threading
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_kvq.integration import prefill
from .schemes import Scheme

DEFAULT_SCHEMES = ("k4v4", "k4v2", "mlx4")


@dataclass
class ModelCase:
    scheme: str
    context: int
    prefill_tps: float
    decode_tps: float
    prefill_peak: int  # bytes, weights included
    decode_peak: int
    kv_bytes: int


def cache_bytes(cache) -> int:
    """nbytes of a model's per-layer caches."""
    return sum(c.nbytes for c in cache)


def clear():
    """Free what the last case left, so the next one's peak starts clean."""
    gc.collect()
    mx.clear_cache()


def run_case(model, tokens, scheme, context, decode_tokens, prefill_step) -> ModelCase:
    """Prefill `context` tokens into a fresh cache, then decode."""
    cache = Scheme(scheme).make(model)
    x = mx.array(tokens[:context])[None]
    clear()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    prefill(model, cache, x[0, :-1], prefill_step)
    y = model(x[:, -1:], cache=cache)[:, -1].argmax(-1)
    mx.eval(y)
    t1 = time.perf_counter()
    prefill_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    for _ in range(decode_tokens):
        y = model(y[:, None], cache=cache)[:, -1].argmax(-1)
        mx.eval(y)
    t2 = time.perf_counter()
    case = ModelCase(scheme, context, context / (t1 - t0),
                     decode_tokens / (t2 - t1) if decode_tokens else 0.0,
                     prefill_peak, mx.get_peak_memory(), cache_bytes(cache))
    del cache, y
    clear()
    return case


def bench_model(model, tokens, schemes=DEFAULT_SCHEMES, contexts=(1024, 4096, 8192),
                decode_tokens=32, prefill_step=2048, repeats=1, progress=True):
    """ModelCases for "fp" and every scheme at every context: the best
    speed and the largest peak over `repeats` interleaved rounds."""
    schemes = ["fp"] + [s for s in schemes if s != "fp"]
    if len(tokens) < max(contexts):
        reps = -(-max(contexts) // len(tokens))
        tokens = list(tokens) * reps
    best = {}
    bar = tqdm(total=len(contexts) * repeats * len(schemes), disable=not progress,
               desc="bench")
    for ctx in contexts:
        for _ in range(repeats):
            for s in schemes:
                c = run_case(model, tokens, s, ctx, decode_tokens, prefill_step)
                b = best.setdefault((s, ctx), c)
                b.prefill_tps = max(b.prefill_tps, c.prefill_tps)
                b.decode_tps = max(b.decode_tps, c.decode_tps)
                b.prefill_peak = max(b.prefill_peak, c.prefill_peak)
                b.decode_peak = max(b.decode_peak, c.decode_peak)
                bar.update(1)
    bar.close()
    return list(best.values())


def stream_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s by a streaming copy (read + write, as
    STREAM counts it) on every core: the best of `repeats`."""
    src = np.ones((mib << 20) // 8)
    dst = np.empty_like(src)
    cuts = np.linspace(0, src.size, (os.cpu_count() or 1) + 1).astype(int)

    def copy(a, b):
        np.copyto(dst[a:b], src[a:b])  # releases the GIL

    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=copy, args=ab) for ab in zip(cuts[:-1], cuts[1:])]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def step_bytes(case, weights_bytes: int) -> int:
    """Bytes a decode step reads: the weights and the whole KV cache."""
    return weights_bytes + case.kv_bytes


def format_model_table(cases, weights_bytes=0, bandwidth=None) -> str:
    """With `bandwidth` (bytes/s), the last columns are what a decode step
    reads (weights + KV) per second, and its fraction of the bandwidth."""
    ref = {c.context: c for c in cases if c.scheme == "fp"}
    head = (f"{'context':>8} {'scheme':<10}{'prefill t/s':>12}{'x fp':>7}{'decode t/s':>12}"
            f"{'x fp':>7}{'peak prefill':>14}{'x fp':>7}{'peak decode':>13}{'x fp':>7}"
            f"{'KV MiB':>9}{'x fp':>7}" + (f"{'read GB/s':>11}{'x bw':>6}" if bandwidth else ""))
    rows = [head, "-" * len(head)]

    def above(n):  # peak above the weights, which every case holds alike
        return n - weights_bytes

    for c in sorted(cases, key=lambda c: c.context):
        r = ref[c.context]
        rows.append(
            f"{c.context:>8} {c.scheme:<10}{c.prefill_tps:>12.1f}{c.prefill_tps / r.prefill_tps:>7.2f}"
            f"{c.decode_tps:>12.2f}{c.decode_tps / max(r.decode_tps, 1e-9):>7.2f}"
            f"{above(c.prefill_peak) / 2**20:>10.0f} MiB{above(c.prefill_peak) / above(r.prefill_peak):>7.2f}"
            f"{above(c.decode_peak) / 2**20:>9.0f} MiB{above(c.decode_peak) / above(r.decode_peak):>7.2f}"
            f"{c.kv_bytes / 2**20:>9.1f}{c.kv_bytes / r.kv_bytes:>7.2f}"
            + (f"{step_bytes(c, weights_bytes) * c.decode_tps / 1e9:>11.2f}"
               f"{step_bytes(c, weights_bytes) * c.decode_tps / bandwidth:>6.2f}"
               if bandwidth else "")
        )
    return "\n".join(rows)
