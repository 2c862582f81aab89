"""Attention that reads a KVQCache where it is.

Each cache segment (sinks, quantized body, residual) yields softmax partials
(m = row max, l = sum of exp(s - m), o = sum of exp(s - m) * v); the partials
merge by log-sum-exp. Quantized keys stored transposed ([D, T], grouped along
tokens) and per-token values both map onto mx.quantized_matmul with
transpose=False, so decode reads the packed codes and no full-precision copy
of the cache is made. Prefill on the CPU, where mx.quantized_matmul is slow
for many query rows, dequantizes one bounded tile of TILE_TOKENS at a time.
Queries are grouped per kv head (GQA without repeating K/V) and processed in
chunks so that no score tensor exceeds SCORE_BUDGET_BYTES.

Paths (``path()`` names the one a decode step takes; ``paths_run()`` counts
the steps each path ran): on the CPU a decode step runs as one call of the
native kernel (``mlx_kvq.cpu_kernels``: every segment, the window and a
ragged batch's counts, on every core) when it is built, and so does a
prefill chunk under the causal rule (the native prefill kernel: blocks of
queries against dequantized tiles, each row's causal limit and window by
positions, no score matrix held); on Apple GPUs the quantized body goes
through the Metal kernel; otherwise, and for prefill under a model-given
mask, the pure-MLX path above, which is the reference the kernels are held
equal to. ``MLX_KVQ_KERNELS`` chooses: ``auto`` (default), ``mlx`` (pure MLX),
``cpu`` (the native kernel; an error when it is not built), ``metal``, ``emu``.
"""

import collections
import functools
import os

import mlx.core as mx

from . import cpu_kernels
from .metal_kernels import decode as kernels
from . import quant
from .cache import Layout, Segment
from .cache_base import permute_channels

SCORE_BUDGET_BYTES = int(os.environ.get("MLX_KVQ_SCORE_BUDGET", 64 << 20))
# mx.quantized_matmul is fast for few query rows everywhere and for many rows
# on the GPU; on the CPU, prefill dequantizes key/value tiles and uses BLAS
# (measured 13x faster at 768 rows x 2048 tokens).
QMM_MAX_ROWS = 16 if mx.default_device() == mx.cpu else 1 << 30
TILE_TOKENS = 2048


def _qmm(x, q, bits, group_size, transpose):
    return mx.quantized_matmul(
        x, *q, transpose=transpose, group_size=group_size, bits=bits
    )


def _exps(scores):
    """Row max m and exp(scores - m) of scores [..., R, T]."""
    m = scores.max(axis=-1)
    e = mx.exp(scores - mx.where(mx.isinf(m), 0.0, m)[..., None])  # fully masked rows
    return m, e


def quantized_segment_partials(
    qg, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases,
    *, k_bits, v_bits, group_size, n_tokens, first_token=0, v_group_size=None, k_hi=0,
    k_lo=None,
):
    """Partials over a quantized body: channel keys [B, H, D, T] (along
    tokens), per-token values [B, H, T, D]; qg [B, H, R, D] already scaled.
    n_tokens: tokens held, one count for all rows or one per batch row;
    first_token: the first token the query sees (likewise; a window's).
    Keys split by width: the first k_hi channels at k_bits + 1 in k_*, the
    others in k_lo (codes, scales, biases); v_group_size: the values' group.

    The pure-MLX path of decode attention; the Metal decode kernel is held
    equal to it.
    """
    B, H, R, D = qg.shape
    valid = None if isinstance(n_tokens, int) else tuple(int(n) for n in n_tokens)
    length = n_tokens if valid is None else max(valid, default=0)
    if length == 0:
        return (
            mx.full((B, H, R), -mx.inf, mx.float32),
            mx.zeros((B, H, R), mx.float32),
            mx.zeros((B, H, R, v_codes.shape[-1] * 32 // v_bits), mx.float32),
        )
    keys = (k_codes, k_scales, k_biases) + (tuple(k_lo) if k_hi else ())
    seg = Segment((0,) * B if valid else 0, length, keys, (v_codes, v_scales, v_biases),
                  Layout(k_bits, group_size, True, k_hi),
                  Layout(v_bits, v_group_size or group_size, False), valid)
    firsts = mx.array(first_token).reshape(-1, 1, 1, 1)

    def mask_fn(scores, t):  # a decode step: each row sees what it holds from its first
        held = _mask_segment(scores, t, 0, None, None, R, 1, True)
        return mx.where(mx.arange(t.length) >= firsts, held, -mx.inf)

    return _segment_partials(qg, seg, mask_fn)


def _tiled(seg, R):
    """Whether a segment is read in dequantized tiles (many quantized rows)."""
    return (seg.k_layout.bits is not None or seg.v_layout.bits is not None) \
        and R > QMM_MAX_ROWS


def _segment_partials(qg, seg, mask_fn):
    """Partials of one segment, reading its store where it is."""
    lk, lv = seg.k_layout, seg.v_layout
    if _tiled(seg, qg.shape[-2]):
        # Many queries (prefill): dequantize bounded tiles and use BLAS.
        parts = []
        for a in range(0, seg.length, TILE_TOKENS):
            t = seg.view(a, min(seg.length, a + TILE_TOKENS))
            m, e = _exps(mask_fn(qg @ lk.decode(t.keys).swapaxes(-1, -2), t))
            parts.append((m, e.sum(axis=-1), e @ lv.decode(t.values)))
        return _merge_partials(parts)
    return _joint_partials(qg, [(seg, mask_fn)])


def _scores(qg, t):
    lk = t.k_layout
    if lk.bits is None:
        return qg @ t.keys.astype(qg.dtype).swapaxes(-1, -2)
    if not lk.hi:
        return _qmm(qg, t.keys, lk.bits, lk.group, transpose=not lk.transposed)
    # Outlier channels: each piece scores its own channels; the scores add.
    return sum(_qmm(qg[..., d0:d1], q, bits, lk.group, transpose=False)
               for q, (bits, d0, d1) in zip(lk.split(t.keys), lk.pieces(qg.shape[-1])))


def _joint_partials(qg, segs):
    """Partials of several segments under one softmax: their scores side by
    side (one max, exp and sum), then each segment's values where they are."""
    views = [(seg.view(0, seg.length), fn) for seg, fn in segs]
    scores = [fn(_scores(qg, t), t) for t, fn in views]
    m, e = _exps(scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=-1))
    o, col = 0.0, 0
    for t, _ in views:
        et = e if len(views) == 1 else e[..., col:col + t.length]
        lv = t.v_layout
        if lv.bits is None:
            o = o + et @ t.values.astype(et.dtype)
        else:
            o = o + _qmm(et, t.values, lv.bits, lv.group, transpose=False)
        col += t.length
    return m, e.sum(axis=-1), o


def _merge_partials(parts):
    """Merge (m, l, o) partials by log-sum-exp into one (m, l, o)."""
    m = parts[0][0]
    for p in parts[1:]:
        m = mx.maximum(m, p[0])
    m_safe = mx.where(mx.isinf(m), 0.0, m)
    l_tot, o_tot = 0.0, 0.0
    for pm, pl, po in parts:
        w = mx.exp(pm - m_safe)
        l_tot = l_tot + pl * w
        if po is not None:
            o_tot = o_tot + po * w[..., None]
    return m, l_tot, o_tot


def _merge(parts):
    """Merge partials and normalize: the attention output. Rows that see no
    token (left padding of a batch) come out 0. One partial (a decode step
    over one joint softmax) needs no rescaling."""
    single = len(parts) == 1 and parts[0][2] is not None
    _, l, o = parts[0] if single else _merge_partials(parts)
    return o / mx.where(l > 0, l, 1.0)[..., None]


def _needs_mask(seg, q0, mask, decode, L=1, window=None):
    """False when neither the causal rule, a sliding window nor a ragged
    batch can hide any of the segment's tokens. decode: the call's only
    query follows every cached token (not merely a one-row chunk of a
    longer prefill)."""
    if window is not None and (seg.ragged or seg.start <= q0 + L - 1 - window):
        return True
    if seg.ragged:
        return not decode or any(v < seg.length for v in seg.valid)
    causal_done = isinstance(mask, str) and seg.start + seg.length <= q0 + 1
    return mask is not None and not causal_done


@functools.lru_cache(maxsize=64)
def _held(valid, length):
    """[B, 1, length]: which of a segment's columns each row holds. Every
    layer of a batch holds the same counts: one array serves them all."""
    return (mx.arange(length)[None] < mx.array(valid)[:, None])[:, None, :]


@functools.lru_cache(maxsize=64)
def _held_side_by_side(counts):
    """[B, 1, 1, T]: _held of segments side by side, for SDPA's mask."""
    return mx.concatenate([_held(v, n) for v, n in counts], axis=-1)[:, None]


def _ragged_keep(seg, q0, L, decode, window=None):
    """[B, L, T] which tokens of a ragged segment each query of each
    sequence sees: those it holds, at positions up to the query's own (and
    within its window)."""
    keep = _held(seg.valid, seg.length)
    if not decode or window is not None:
        t = mx.arange(seg.length)
        k_pos = (mx.array(seg.start)[:, None] + t)[:, None, :]
        q_pos = (q0[:, None] + mx.arange(L))[:, :, None]
        if not decode:
            keep = keep & (k_pos <= q_pos)
        if window is not None:
            keep = keep & (k_pos > q_pos - window)
    return keep


@functools.lru_cache(maxsize=64)
def _position_keep(start, length, q0, L, window):
    """[L, length]: the causal rule, and the window if any, by positions, for
    keys from position `start` and queries from q0. Every layer of a step
    asks the same: one array serves them all."""
    k_pos = mx.arange(start, start + length)[None, :]
    q_pos = mx.arange(q0, q0 + L)[:, None]
    keep = k_pos <= q_pos
    return keep if window is None else keep & (k_pos > q_pos - window)


def _mask_segment(scores, seg, col0, q0, mask, rep, L, decode, window=None):
    """Apply the causal rule and the cache's window (or a model-given mask)
    to one segment's scores.

    scores: [B, H, rep*L, T]; q0: absolute position of the first of the L
    queries (per sequence, an array, for a ragged segment); col0: index of
    the segment's first token among the cached tokens.
    """
    if not _needs_mask(seg, q0, mask, decode, L, window):
        return scores
    B, H, _, T = scores.shape
    s = scores.reshape(B, H, rep, L, T)
    if seg.ragged:  # the batch cache knows each sequence's tokens and positions
        s = mx.where(_ragged_keep(seg, q0, L, decode, window)[:, None, None], s, -mx.inf)
    elif isinstance(mask, str) or mask is None:
        s = mx.where(_position_keep(seg.start, seg.length, int(q0), L, window), s, -mx.inf)
    else:
        mseg = mask[..., col0 : col0 + T]
        if mseg.ndim == 4:
            mseg = mx.expand_dims(mseg, -3)
        if mseg.dtype == mx.bool_:
            s = mx.where(mseg, s, -mx.inf)
        else:
            s = s + mseg.astype(s.dtype)
    return s.reshape(B, H, rep * L, T)


PATHS = {"native": "native CPU kernel", "metal": "Metal kernel", "mlx": "pure MLX"}
_runs = collections.Counter()
_prefill_runs = collections.Counter()


def _native_wanted() -> bool:
    """Whether decode steps should take the native CPU kernel (decided once
    per value of the kernel environment variable: every layer asks)."""
    raw = os.environ.get(kernels.ENV_VAR)
    wanted = _wanted.get(raw)
    if wanted is None:
        wanted = _wanted[raw] = _decide_native()
    return wanted


_wanted = {}


def _decide_native() -> bool:
    mode = kernels.kernel_mode()
    if mode == "cpu":
        ok, why = cpu_kernels.status()
        if not ok:
            raise RuntimeError(f"{kernels.ENV_VAR}=cpu but the native CPU kernel is not "
                               f"available: {why}; {kernels.ENV_VAR}=mlx runs the pure-MLX path")
        return True
    return mode == "auto" and not kernels.use_metal() and cpu_kernels.usable()


def path() -> str:
    """The attention path a decode step takes here: native, metal or mlx."""
    if _native_wanted():
        return "native"
    return "metal" if kernels.use_metal() else "mlx"


def describe_path() -> str:
    """One line for reports: the decode path, and why not native on a CPU."""
    p = path()
    if p == "native":
        return f"{PATHS[p]} ({cpu_kernels.threads()} threads)"
    if p == "mlx" and kernels.kernel_mode() == "auto" and not kernels.use_metal():
        return f"{PATHS[p]} (native CPU kernel {cpu_kernels.status()[1]})"
    return PATHS[p]


def paths_run() -> dict:
    """{path: decode-step layer calls} since the process started."""
    return dict(_runs)


def prefill_paths_run() -> dict:
    """{path: prefill-chunk layer calls} since the process started."""
    return dict(_prefill_runs)


def kvq_attention(queries, cache, scale, mask=None, sinks=None):
    """scaled_dot_product_attention over a KVQCache. queries: [B, Hq, L, D]."""
    B, Hq, L, D = queries.shape
    H = cache.dims[1]
    rep = Hq // H
    spec = cache.spec
    q = (queries * scale).astype(mx.float32)
    if spec.rotate_keys:
        q = quant.hadamard(q)
    if cache.k_order is not None:  # keys are stored in this channel order
        q = permute_channels(q, cache.k_order)
    segs = cache.segments()
    if L == 1 and segs and _native_wanted():
        out = _native_step(q.reshape(B, H, rep, D), cache, segs, mask, sinks)
        if out is not None:
            _runs["native"] += 1
            return _finish(out.reshape(B, Hq, 1, -1), spec, queries.dtype)
    if L > 1 and segs and _native_wanted() and (segs[0].ragged or isinstance(mask, str)):
        out = _native_prefill(q.reshape(B, H, rep, L, D), cache, segs, L, sinks)
        _prefill_runs["native"] += 1
        return _finish(out.reshape(B, Hq, L, -1), spec, queries.dtype)
    if L == 1:
        _runs["metal" if kernels.use_metal() else "mlx"] += 1
    else:
        _prefill_runs["metal" if kernels.use_metal() else "mlx"] += 1
    n_keys = sum(s.length for s in segs)
    # Rows per chunk so that one segment's scores (and exps) fit the budget.
    per_row = B * Hq * n_keys * 4 * 2
    chunk = max(1, min(L, SCORE_BUDGET_BYTES // max(per_row, 1)))
    window = cache.window
    if chunk == L and _all_16_bit(segs, mask, L) and not (
            window is not None and any(_needs_mask(s, cache.query_start(L), mask, L == 1, L,
                                                   window) for s in segs)):
        out = _fp_attention(q, segs, cache.query_start(L), mask, sinks, L)
        return _finish(out, spec, queries.dtype)
    outs = []
    for l0 in range(0, L, chunk):
        l1 = min(L, l0 + chunk)
        outs.append(
            _attend_chunk(q[:, :, l0:l1], cache, segs, l0, L, mask, rep, sinks, window)
        )
        if chunk < L:
            # Lazy evaluation would otherwise schedule every chunk's scores
            # side by side, and the budget would bound nothing.
            mx.eval(outs[-1])
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    return _finish(out, spec, queries.dtype)


def _finish(out, spec, dtype):
    if spec.rotate_values:
        out = quant.hadamard(out)
    return out.astype(dtype)


def _all_16_bit(segs, mask, L):
    """Whether one fused SDPA call can read the cache: every segment 16-bit
    (a short cache holds only sinks and residual), and a mask it can take:
    the causal rule, or per-row counts of a batch at a decode step."""
    if not segs or any(s.k_layout.bits is not None or s.v_layout.bits is not None
                       for s in segs):
        return False
    if segs[0].ragged:
        return L == 1
    return mask is None or isinstance(mask, str)


def _fp_attention(q, segs, q0, mask, sinks, L):
    """mx.fast.scaled_dot_product_attention over 16-bit segments side by side
    (in temporal order: the L queries are the last L keys). q is scaled."""
    views = [s.view(0, s.length) for s in segs]
    k, v = ([getattr(t, name) for t in views] for name in ("keys", "values"))
    k, v = (x[0] if len(x) == 1 else mx.concatenate(x, axis=2) for x in (k, v))
    if segs[0].ragged:  # each row's own tokens (a decode step)
        mask = _held_side_by_side(tuple((t.valid, t.length) for t in views))
    return mx.fast.scaled_dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), scale=1.0, mask=mask, sinks=sinks)


def _attend_chunk(q, cache, segs, l0, L, mask, rep, sinks, window=None):
    B, Hq, Lc, D = q.shape
    H = Hq // rep
    qg = q.reshape(B, H, rep * Lc, D)
    if mask is not None and not isinstance(mask, str):
        mask = mask[..., l0 : l0 + Lc, :]
    q0 = cache.query_start(L) + l0  # position of the chunk's first query
    parts, joint, col0 = [], [], 0
    for seg in segs:
        c0 = col0

        def mask_fn(scores, t, c0=c0, seg=seg):
            col = c0 if seg.ragged else c0 + t.start - seg.start
            return _mask_segment(scores, t, col, q0, mask, rep, Lc, L == 1, window)

        unmasked, window_step = _unmasked_step(seg, q0, mask, window, L, Lc)
        if (unmasked and seg.k_layout.transposed
                and cache.dims[2] == cache.dims[3] and _use_kernel(seg, D)):
            first = _window_first(seg, q0, window) if window_step else 0
            parts.append(_kernel_partials(qg, seg, first))
        elif _tiled(seg, qg.shape[-2]):
            parts.append(_segment_partials(qg, seg, mask_fn))
        else:
            joint.append((seg, mask_fn))
        col0 += seg.length
    if joint:
        parts.append(_joint_partials(qg, joint))
    if sinks is not None:
        m = mx.broadcast_to(
            sinks.astype(mx.float32).reshape(1, H, rep, 1), (B, H, rep, Lc)
        ).reshape(B, H, rep * Lc)
        parts.append((m, mx.ones_like(m), None))
    out = _merge(parts)
    return out.reshape(B, Hq, Lc, -1)


def _unmasked_step(seg, q0, mask, window, L=1, Lc=1):
    """(Whether a kernel that takes each row's token count and first visible
    token reads this segment for these Lc of L queries with no mask, whether
    the window then sets those first tokens.) A decode step needs no mask,
    ragged or not: every cached token precedes the query, and a window hides
    only the oldest."""
    window_step = window is not None and L == 1 and (
        seg.ragged or mask is None or isinstance(mask, str))
    unmasked = Lc == 1 and (seg.ragged and L == 1 and window is None or window_step
                            or not _needs_mask(seg, q0, mask, L == 1, Lc, window))
    return unmasked, window_step


def _native_segment(seg, q0, mask, window, B):
    """The native kernel's view of one segment at a decode step, or None when
    a mask it cannot express applies (a model-given mask over a non-ragged
    segment)."""
    unmasked, window_step = _unmasked_step(seg, q0, mask, window)
    if not unmasked:
        return None
    counts = tuple(seg.valid) if seg.ragged else (seg.length,) * B
    first = _window_first(seg, q0, window) if window_step else 0
    firsts = tuple(first) if isinstance(first, tuple) else (first,) * B
    return _native_part(seg, counts, firsts)


def _native_part(seg, counts, firsts):
    """One segment as decode_attention takes it: row b sees tokens
    [firsts[b], counts[b])."""
    lk, lv = seg.k_layout, seg.v_layout
    return (seg.keys, seg.values, _native_kind(lk), lk.bits, _native_kind(lv), lv.bits,
            (lk.group, lv.group), counts, firsts, lk.hi)


def _native_prefill(q, cache, segs, L, sinks):
    """A prefill chunk in one native call: [B, H, R, L, Dv] float32. Every
    segment is read whole (each row its count); the causal rule and the
    window apply by positions, as _mask_segment applies them."""
    B = q.shape[0]
    q0 = cache.query_start(L)
    q0 = q0.tolist() if hasattr(q0, "tolist") else [q0] * B
    parts, starts = [], []
    for seg in segs:
        counts = tuple(seg.valid) if seg.ragged else (seg.length,) * B
        parts.append(_native_part(seg, counts, (0,) * B))
        starts.append(tuple(seg.start) if seg.ragged else (seg.start,) * B)
    if sinks is not None:
        sinks = sinks.astype(mx.float32)
    return cpu_kernels.prefill_attention(q, parts, starts, q0, causal=True,
                                         window=cache.window or 0, sinks=sinks)


def _native_kind(layout):
    if layout.bits is None:
        return cpu_kernels.FP
    return cpu_kernels.CHANNEL if layout.transposed else cpu_kernels.TOKEN


def _native_step(qg, cache, segs, mask, sinks):
    """A decode step in one native call: [B, H, R, Dv] float32, or None."""
    B = qg.shape[0]
    if cache.window is None and segs[0].ragged:  # a batch's decode step: no mask, no window
        parts = [_native_part(seg, seg.valid, (0,) * B) for seg in segs]
        return cpu_kernels.decode_attention(qg, parts, sinks)
    q0 = cache.query_start(1)
    parts = [_native_segment(seg, q0, mask, cache.window, B) for seg in segs]
    if any(p is None for p in parts):
        return None
    if sinks is not None:
        sinks = sinks.astype(mx.float32)
    return cpu_kernels.decode_attention(qg, parts, sinks)


def _use_kernel(seg, head_dim):
    return kernels.use_metal() and kernels.supports(
        seg.k_layout.bits, seg.v_layout.bits, head_dim=head_dim,
        group_size=seg.k_layout.group, v_group_size=seg.v_layout.group, k_hi=seg.k_layout.hi,
    )


def _window_first(seg, q0, window):
    """How many of a segment's first tokens a decode query at q0 no longer
    sees through its window (per row of a ragged segment)."""
    if not seg.ragged:
        return min(seg.length, max(0, q0 - window + 1 - seg.start))
    q = q0.tolist() if hasattr(q0, "tolist") else q0
    return tuple(min(v, max(0, qb - window + 1 - sb))
                 for qb, sb, v in zip(q, seg.start, seg.valid))


def _kernel_partials(qg, seg, first=0):
    # Whole preallocated buffers: slicing transposed codes would copy them.
    hi = seg.k_layout.hi
    return kernels.metal_decode_partials(
        qg, *seg.keys[:3], *seg.values, k_bits=seg.k_layout.bits,
        v_bits=seg.v_layout.bits, group_size=seg.k_layout.group,
        v_group_size=seg.v_layout.group, k_hi=hi, k_lo=tuple(seg.keys[3:]) if hi else None,
        n_tokens=seg.valid if seg.ragged else seg.length, first_token=first,
    )
