"""Attention that reads a KVQCache where it is.

Each cache segment (sinks, quantized body, residual) yields softmax partials
(m = row max, l = sum of exp(s - m), o = sum of exp(s - m) * v); the partials
merge by log-sum-exp. Quantized keys stored transposed ([D, T], grouped along
tokens) and per-token values both map onto mx.quantized_matmul with
transpose=False, so no full-precision copy of the cache is ever made.
Queries are grouped per kv head (GQA without repeating K/V) and processed in
chunks so that no score tensor exceeds SCORE_BUDGET_BYTES.
"""

import os

import mlx.core as mx

from . import quant

SCORE_BUDGET_BYTES = int(os.environ.get("MLX_KVQ_SCORE_BUDGET", 64 << 20))


def _qmm(x, q, bits, group_size, transpose):
    return mx.quantized_matmul(
        x, *q, transpose=transpose, group_size=group_size, bits=bits
    )


def _partials(scores, values, v_bits, group_size):
    """Softmax partials of one segment: scores [..., R, T] -> (m, l, o)."""
    m = scores.max(axis=-1)
    m_safe = mx.where(mx.isinf(m), 0.0, m)  # fully masked rows
    e = mx.exp(scores - m_safe[..., None])
    l = e.sum(axis=-1)
    if v_bits is None:
        o = e @ values.astype(e.dtype)
    else:
        o = _qmm(e, values, v_bits, group_size, transpose=False)
    return m, l, o


def quantized_segment_partials(
    qg, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases,
    *, k_bits, v_bits, group_size, n_tokens,
):
    """Partials over the quantized body: channel keys [B, H, D, T] (along
    tokens), per-token values [B, H, T, D]; qg [B, H, R, D] already scaled.

    The reference the Metal decode kernel is held equal to.
    """
    B, H, R, D = qg.shape
    if n_tokens == 0:
        return (
            mx.full((B, H, R), -mx.inf, mx.float32),
            mx.zeros((B, H, R), mx.float32),
            mx.zeros((B, H, R, v_codes.shape[-1] * 32 // v_bits), mx.float32),
        )
    w = quant.packed_width(n_tokens, k_bits)
    g = n_tokens // group_size
    kq = (k_codes[..., :w], k_scales[..., :g], k_biases[..., :g])
    vq = tuple(x[..., :n_tokens, :] for x in (v_codes, v_scales, v_biases))
    scores = _qmm(qg, kq, k_bits, group_size, transpose=False)
    return _partials(scores, vq, v_bits, group_size)


def _segment_scores(qg, seg, group_size):
    if seg.k_bits is None:
        return qg @ seg.keys.astype(qg.dtype).swapaxes(-1, -2)
    return _qmm(qg, seg.keys, seg.k_bits, group_size, transpose=not seg.keys_transposed)


def _merge(parts):
    """Merge (m, l, o) partials by log-sum-exp; returns normalized output."""
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
    return o_tot / l_tot[..., None]


def _mask_segment(scores, seg, col0, q_pos, mask, rep, L):
    """Apply the causal rule (or a model-given mask) to one segment's scores.

    scores: [B, H, rep*L, T]; q_pos: absolute positions of the L queries;
    col0: index of the segment's first token among the cached tokens.
    """
    if mask is None or (isinstance(mask, str) and seg.start + seg.length - 1 <= q_pos[0]):
        return scores
    B, H, _, T = scores.shape
    s = scores.reshape(B, H, rep, L, T)
    if isinstance(mask, str):
        k_pos = mx.arange(seg.start, seg.start + seg.length)
        keep = k_pos[None, :] <= q_pos[:, None]
        s = mx.where(keep, s, -mx.inf)
    else:
        mseg = mask[..., col0 : col0 + T]
        if mseg.ndim == 4:
            mseg = mx.expand_dims(mseg, -3)
        if mseg.dtype == mx.bool_:
            s = mx.where(mseg, s, -mx.inf)
        else:
            s = s + mseg.astype(s.dtype)
    return s.reshape(B, H, rep * L, T)


def kvq_attention(queries, cache, scale, mask=None, sinks=None):
    """scaled_dot_product_attention over a KVQCache. queries: [B, Hq, L, D]."""
    B, Hq, L, D = queries.shape
    H = cache.dims[1]
    rep = Hq // H
    spec = cache.spec
    q = (queries * scale).astype(mx.float32)
    if spec.rotate:
        q = quant.hadamard(q)
    segs = cache.segments()
    n_keys = sum(s.length for s in segs)
    # Rows per chunk so that one segment's scores (and exps) fit the budget.
    per_row = B * Hq * n_keys * 4 * 2
    chunk = max(1, min(L, SCORE_BUDGET_BYTES // max(per_row, 1)))
    outs = []
    for l0 in range(0, L, chunk):
        l1 = min(L, l0 + chunk)
        outs.append(
            _attend_chunk(q[:, :, l0:l1], cache, segs, l0, L, mask, rep, sinks)
        )
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    if spec.rotate:
        out = quant.hadamard(out)
    return out.astype(queries.dtype)


def _attend_chunk(q, cache, segs, l0, L, mask, rep, sinks):
    B, Hq, Lc, D = q.shape
    H = Hq // rep
    qg = q.reshape(B, H, rep * Lc, D)
    q_pos = mx.arange(cache.offset - L + l0, cache.offset - L + l0 + Lc)
    if mask is not None and not isinstance(mask, str):
        mask = mask[..., l0 : l0 + Lc, :]
    G = cache.spec.group_size
    parts, col0 = [], 0
    for seg in segs:
        unmasked = mask is None or (
            isinstance(mask, str) and seg.start + seg.length <= cache.offset - L + l0
        )
        if Lc == 1 and unmasked and seg.keys_transposed and _use_kernel(seg):
            parts.append(_kernel_partials(qg, seg, G))
        else:
            scores = _segment_scores(qg, seg, G)
            scores = _mask_segment(scores, seg, col0, q_pos, mask, rep, Lc)
            parts.append(_partials(scores, seg.values, seg.v_bits, G))
        col0 += seg.length
    if sinks is not None:
        m = mx.broadcast_to(
            sinks.astype(mx.float32).reshape(1, H, rep, 1), (B, H, rep, Lc)
        ).reshape(B, H, rep * Lc)
        parts.append((m, mx.ones_like(m), None))
    out = _merge(parts)
    return out.reshape(B, Hq, Lc, -1)


def _use_kernel(seg):
    from . import kernels

    return kernels.use_metal() and kernels.supports(seg.k_bits, seg.v_bits)


def _kernel_partials(qg, seg, group_size):
    from . import kernels

    return kernels.metal_decode_partials(
        qg, *seg.keys, *seg.values, k_bits=seg.k_bits, v_bits=seg.v_bits,
        group_size=group_size, n_tokens=seg.length,
    )
