"""Decode attention alone, at synthetic shapes: `mlx_kvq.bench --attention`.

One decode step of attention (one query per q head): kvq_attention over a
filled KVQCache (whichever path runs here: the native CPU kernel, the Metal
kernel or pure MLX) vs mx.fast.scaled_dot_product_attention over float32
and float16 K/V vs mlx-lm's quantized_scaled_dot_product_attention; the
achieved bandwidth counts the cache bytes a step must read
(sizing.decode_bytes_read for mlx_kvq, the arrays' sizes for the others).
"""

import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from tqdm import tqdm

from mlx_kvq import sizing
from mlx_kvq.attention import kvq_attention
from mlx_kvq.cache import KVQCache
from mlx_kvq.spec import parse_spec


@dataclass
class AttentionCase:
    kind: str
    context: int
    seconds: float  # median of the repeats
    bytes_read: int

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9


def _time_interleaved(fns, repeats):
    """Median seconds of each callable, timed in `repeats` rounds that each
    call every one once (a load that comes and goes touches them alike)."""
    for fn in fns:
        mx.eval(fn())  # warm up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            mx.eval(fn())
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _filled_kvq(spec, keys, values, step=4096):
    cache = KVQCache(spec)
    for a in range(0, keys.shape[2], step):
        cache.update_and_fetch(keys[:, :, a:a + step], values[:, :, a:a + step])
        mx.eval(cache.state)
    return cache


def bench_attention(contexts=(1024, 4096, 16384, 32768), specs=("k4v4", "k4v2", "k8v8"),
                    mlx_bits=(4, 8), n_heads=32, n_kv_heads=8, head_dim=128,
                    repeats=20, group_size=64, mlx_dtype=None, progress=True):
    """AttentionCases for one decode step (one query per q head) per context.

    mlx_dtype: of the queries and K/V mlx-lm's quantized attention gets;
    default float16 on the GPU, float32 on the CPU (which has no float16
    arithmetic: measured 50x slower there)."""
    if mlx_dtype is None:
        mlx_dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    H, D = n_kv_heads, head_dim
    scale = D ** -0.5
    cases = []
    bar = tqdm(total=len(contexts) * (2 + len(specs) + len(mlx_bits)),
               disable=not progress, desc="attention")
    for T in contexts:
        mx.random.seed(0)
        q = mx.random.normal((1, n_heads, 1, D))
        k = mx.random.normal((1, H, T, D))
        v = mx.random.normal((1, H, T, D))
        mx.eval(q, k, v)
        runs = []  # (kind, callable, bytes read)
        for dtype in (mx.float32, mx.float16):
            qd, kd, vd = q.astype(dtype), k.astype(dtype), v.astype(dtype)
            mx.eval(qd, kd, vd)
            runs.append((f"sdpa {_dtype_name(dtype)}",
                         lambda qd=qd, kd=kd, vd=vd: mx.fast.scaled_dot_product_attention(
                             qd, kd, vd, scale=scale, mask=None), kd.nbytes + vd.nbytes))
            bar.update(1)
        for label in specs:
            spec = parse_spec(label)
            cache = _filled_kvq(spec, k, v)
            nbytes = sizing.decode_bytes_read(spec, head_dim=D, n_tokens=T, n_kv_heads=H)
            runs.append((f"kvq {label}", lambda c=cache: kvq_attention(q, c, scale=scale),
                         nbytes))
            bar.update(1)
        qd = q.astype(mlx_dtype)
        for bits in mlx_bits:
            qk = mx.quantize(k.astype(mlx_dtype), group_size=group_size, bits=bits)
            qv = mx.quantize(v.astype(mlx_dtype), group_size=group_size, bits=bits)
            mx.eval(qd, qk, qv)
            runs.append((f"mlx-lm q{bits} {_dtype_name(mlx_dtype)}",
                         lambda qk=qk, qv=qv, bits=bits: quantized_scaled_dot_product_attention(
                             qd, qk, qv, scale=scale, mask=None, group_size=group_size,
                             bits=bits), sum(a.nbytes for a in (*qk, *qv))))
            bar.update(1)
        seconds = _time_interleaved([fn for _, fn, _ in runs], repeats)
        cases.extend(AttentionCase(kind, T, sec, nbytes)
                     for (kind, _, nbytes), sec in zip(runs, seconds))
        del k, v, runs
        mx.clear_cache()
    bar.close()
    return cases


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def format_attention_table(cases) -> str:
    """Time per step, and as a ratio to sdpa over float32 and float16 K/V
    and to the first mlx_kvq spec (all timed in the same rounds)."""
    ref = {(c.kind, c.context): c.seconds for c in cases if c.kind.startswith("sdpa")}
    first = next((c.kind for c in cases if c.kind.startswith("kvq ")), None)
    ref.update({("first", c.context): c.seconds for c in cases if c.kind == first})
    col = f"x {first[4:]}"[:12] if first else ""
    head = (f"{'context':>8} {'attention':<26}{'µs/step':>10}{'x sdpa32':>10}{'x sdpa16':>10}"
            f"{col:>13}{'MiB read':>10}{'GB/s':>8}")
    rows = [head, "-" * len(head)]
    for c in sorted(cases, key=lambda c: c.context):
        vs_first = f"{c.seconds / ref['first', c.context]:>13.2f}" if first else ""
        rows.append(f"{c.context:>8} {c.kind:<26}{c.seconds * 1e6:>10.0f}"
                    f"{c.seconds / ref['sdpa float32', c.context]:>10.2f}"
                    f"{c.seconds / ref['sdpa float16', c.context]:>10.2f}{vs_first}"
                    f"{c.bytes_read / 2**20:>10.1f}{c.gbps:>8.2f}")
    return "\n".join(rows)
