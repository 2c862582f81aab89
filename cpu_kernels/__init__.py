"""Native CPU kernels: decode and prefill attention that read the quantized
store, on every core.

MLX runs each CPU primitive (``mx.quantized_matmul`` included) as one task
on one thread, while full-precision attention's matmuls use multi-threaded
BLAS. ``decode_attention`` is one MLX primitive (C++, ``attention.cpp``)
that computes a whole decode step of a layer with its own thread pool:

* work: each (batch row, kv head) sees a run of tokens across the cache's
  segments (16-bit sinks, the quantized body, the 16-bit residual), each
  clipped per row to ``[first, count)`` (a ragged batch row holds its own
  count; a sliding window hides the first tokens); the run is cut into parts
  of about ``split_tokens`` tokens (automatic: about 4 parts per thread, at
  least 256 tokens each; a small step runs on the calling thread alone);
* a part reads only its tokens' bytes: the packed key codes and fp16
  scales/biases (per-channel keys in their stored layout, each channel row a
  contiguous stretch of tokens; per-token keys by row), scores all query
  heads of the GQA group against them, keeps an online softmax per block of
  128 tokens, and dequantizes each value row once into the outputs;
* the parts' softmax partials (m, l, o) merge by log-sum-exp with the
  learned sinks' logits, then o / l (0 for a row that sees no token).

``prefill_attention`` (``prefill.cpp``) computes a prefill chunk of a layer
the same way on other work: the queries of each (row, kv head) cut into
blocks of positions, every query head of the GQA group in one block (rows
that read the same bytes), the blocks spread over the pool's threads; a
block walks the tokens its rows may see (the causal rule and the window by
absolute positions, each row its own limits), dequantizing KB tokens of keys
into a [D, KB] tile and of values into a [KB, Dv] tile once for all its
rows, scores and accumulates with register-tiled products, and keeps an
online softmax per row (no score matrix is ever held).

Every width of the spec (2, 3, 4, 5, 6, 8 bits; 16-bit parts in float16,
bfloat16 or float32), any group dividing the head dim, any head dims
(values may differ from keys) and GQA ratio. Threads: the machine's cores,
``MLX_KVQ_THREADS`` overrides. The rotation and calibrated smoothing stay
outside, as on the pure-MLX path (``mlx_kvq.attention``), which remains the
reference and the fallback.

The extension is built by ``python -m mlx_kvq.cpu_kernels.build`` (setup.sh
runs it) against the installed MLX; ``status()`` says whether it loaded and,
if not, why.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import mlx.core as mx

__all__ = ["status", "usable", "threads", "decode_attention", "prefill_attention", "FP",
           "CHANNEL", "TOKEN"]

FP, CHANNEL, TOKEN = 0, 1, 2
DISABLE_ENV = "MLX_KVQ_NATIVE"  # "0": never load the extension


@functools.lru_cache(maxsize=1)
def _load():
    """(module, None) or (None, why it is not available)."""
    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        return None, f"disabled by {DISABLE_ENV}=0"
    from . import build

    try:
        path = build.library_path()
    except Exception as e:  # an MLX without what the key reads
        return None, f"cannot locate it: {e}"
    if not path.is_file():
        return None, ("not built for this MLX (run `python -m mlx_kvq.cpu_kernels.build`; "
                      "setup.sh does)")
    try:
        module = build.load(path)
    except Exception as e:
        return None, f"failed to load {path}: {type(e).__name__}: {e}"
    return module, None


def status() -> tuple[bool, Optional[str]]:
    """(True, None) when the native kernel is loaded, else (False, why)."""
    module, why = _load()
    return module is not None, why


def usable() -> bool:
    return _load()[0] is not None


def threads() -> int:
    """Threads the kernel's pool uses (0 when it is not loaded)."""
    module = _load()[0]
    return module.threads() if module is not None else 0


def decode_attention(q: mx.array, segments: Sequence[tuple], sinks: Optional[mx.array] = None,
                     split_tokens: int = 0, fault: int = 0) -> mx.array:
    """Attention of q [B, H, R, D] (float32, already scaled; R query heads
    per kv head) over cache segments, normalized: [B, H, R, Dv] float32.

    segments: (keys, values, k_kind, k_bits, v_kind, v_bits, group, counts,
    firsts[, k_hi]) per segment, keys/values an array (FP, [B, H, T, D]) or a
    (codes, scales, biases) triple (CHANNEL: [B, H, D, T*bits/32] codes and
    [B, H, D, T/group] scales; TOKEN: [B, H, T, D*bits/32] and
    [B, H, T, D/group]); group: one size, or (keys', values'); k_hi: per-channel
    keys split by width, six arrays: the triple of their first k_hi channels at
    k_bits + 1, then the other channels' at k_bits (outlier channels, whose
    scores add); counts/firsts: one int per batch row, row b seeing
    tokens [firsts[b], counts[b]) of the segment's buffers. sinks: [H*R]
    learned attention-sink logits. split_tokens: tokens per part (0: chosen
    from the threads). fault: a deliberately broken variant, for tests (1 a
    merge without rescaling, 2 every row with the first row's counts, 3 the
    window ignored, 4 the next group's key scales, 5 split keys' second part
    overwriting the first's scores).
    """
    module = _module()
    return module.decode_attention(q, *_flat(segments), sinks, split_tokens, fault)


def prefill_attention(q: mx.array, segments: Sequence[tuple], starts: Sequence[Sequence[int]],
                      q0: Sequence[int], causal: bool = True, window: int = 0,
                      sinks: Optional[mx.array] = None, fault: int = 0) -> mx.array:
    """Attention of a prefill chunk q [B, H, R, L, D] (float32, already
    scaled; R query heads per kv head, L positions) over cache segments,
    normalized: [B, H, R, L, Dv] float32.

    segments: as decode_attention takes them (keys split by width and
    values with a group of their own included); starts: per segment, the
    absolute position of its token 0 in each batch row; q0: each row's
    position of its first query (query i at q0[b] + i). causal: a query sees
    no later token; window: nor one `window` or more positions before its
    own (0: no window). fault: as decode_attention's 1-4 (1 skips the online
    softmax's rescaling), 5 a query that also sees the token after it, or 6
    the wider channels of keys split by width read at the narrower width.
    """
    module = _module()
    arrays, layouts, counts, firsts = _flat(segments)
    flat_starts = [int(s) for per_row in starts for s in per_row]
    return module.prefill_attention(q, arrays, layouts, counts, firsts, flat_starts,
                                    [int(x) for x in q0], causal, window, sinks, fault)


def _module():
    module, why = _load()
    if module is None:
        raise RuntimeError(f"the native CPU kernel is not available: {why}")
    return module


def _flat(segments):
    """(arrays, layouts, counts, firsts) of segments, as the extension takes them."""
    arrays, layouts, counts, firsts = [], [], [], []
    for keys, values, k_kind, k_bits, v_kind, v_bits, group, cnt, fst, *hi in segments:
        for kind, part in ((k_kind, keys), (v_kind, values)):
            arrays.extend([part] if kind == FP else part)
        k_group, v_group = group if isinstance(group, tuple) else (group, group)
        layouts.append((k_kind, k_bits or 0, v_kind, v_bits or 0, k_group, v_group,
                        hi[0] if hi else 0))
        counts.extend(cnt)
        firsts.extend(fst)
    return arrays, layouts, counts, firsts
