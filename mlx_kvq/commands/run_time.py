"""Run times of long evaluations, estimated before they start: RULER lengths
and KLD windows of thousands of tokens take hours on a CPU.

A token at context c costs its share of the weights plus attention over c
keys in every layer. Both are timed on the model just before a run: a short
prefill and a few decode steps (the weights), and one layer's attention as
mlx-lm calls it (mx.fast.scaled_dot_product_attention) at a prefill chunk
over 2048 keys and at a decode step over 4096, per (query, key) and scaled
to the model's layers. On a CPU attention costs several times per key what
its flops say, so it is timed, not derived. Every scheme is taken to run as
fast as fp.
"""

import time
from dataclasses import dataclass

import mlx.core as mx

from .schemes import Scheme


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work, for one cache."""
    per_token: float  # a prefilled token's weights
    per_step: float   # a decode step's weights
    pair: float       # a (query, key) of a prefill chunk's attention, all layers
    key: float        # a key read by a decode step, all layers

    def prefill(self, n: int, start: int = 0) -> float:
        """`n` tokens fed after `start` cached ones (chunk by chunk or at once:
        each reads the keys up to its own position)."""
        return self.per_token * n + self.pair * n * (start + n / 2)

    def decode(self, steps: int, context: int) -> float:
        """`steps` decode steps after `context` tokens."""
        return steps * (self.per_step + self.key * context)


def measure(model, shape, chunk: int) -> Costs:
    """Time the model's weights and one layer's attention now (about a second)."""
    n = min(chunk, 128)
    toks = mx.array([list(range(100, 100 + n))])
    mx.eval(model(toks[:, :16], cache=Scheme("fp").make(model)))  # warm up
    cache = Scheme("fp").make(model)
    t0 = time.perf_counter()
    mx.eval(model(toks, cache=cache))
    per_token = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(4):
        mx.eval(model(mx.array([[7]]), cache=cache))
    per_step = (time.perf_counter() - t0) / 4
    return Costs(per_token, per_step,
                 pair=shape.n_layers * attention_seconds(shape, min(chunk, 256), 2048),
                 key=shape.n_layers * attention_seconds(shape, 1, 4096))


def attention_seconds(shape, queries: int, keys: int) -> float:
    """Seconds per (query, key) of one layer's attention (mlx's fused
    attention, as mlx-lm calls it) with `queries` new tokens over `keys`."""
    q = mx.random.normal((1, shape.n_heads, queries, shape.head_dim))
    k = mx.random.normal((1, shape.n_kv_heads, keys, shape.head_dim))
    v = mx.random.normal((1, shape.n_kv_heads, keys, shape.dv))
    mask = "causal" if queries > 1 else None
    mx.eval(q, k, v)
    seconds = []
    for _ in range(3):  # the first warms up
        t0 = time.perf_counter()
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask))
        seconds.append(time.perf_counter() - t0)
    return min(seconds[1:]) / (queries * keys)


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def said(seconds: float, over: str, *more: str) -> str:
    """The estimate as the commands print it, with what it assumes."""
    return (f"estimated run time {minutes(seconds)} (an estimate: a short prefill, decode "
            f"steps and one layer's attention timed now, extrapolated over the {over}, every "
            f"scheme as fast as fp{''.join(', ' + m for m in more)})")
