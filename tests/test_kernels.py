"""The fused Metal decode kernel, executed through the CPU emulation.

Every case runs the shipped kernel text (metal_kernels/dequant_attention.*)
through mlx_kvq.metal_kernels.emulator and compares it with the pure-MLX reference
attention.quantized_segment_partials and with a float64 numpy computation
from the raw packed codes, for uniform batches (one token count) and ragged
ones (one count per batch row), keys split by width (outlier channels one
bit wider) and values with a group of their own. Broken kernel variants
must fail the same check.
"""


import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq.metal_kernels import decode as K
from mlx_kvq.metal_kernels import emulator as metal_emu
from mlx_kvq.attention import quantized_segment_partials

RTOL = 2e-5  # float32 accumulation over up to a few thousand tokens

# (B, Hkv, rep, L, D, G, k_bits, v_bits, n_tokens, split_tokens)
CASES = [
    (1, 1, 1, 1, 64, 32, 2, 2, 32, None),        # one group
    (1, 2, 2, 1, 128, 64, 3, 3, 192, None),      # odd number of groups
    (2, 2, 4, 1, 128, 32, 4, 4, 160, None),      # B > 1, partial last block
    (1, 1, 8, 1, 256, 128, 8, 8, 640, 256),      # several splits, last one partial
    (1, 2, 4, 1, 64, 64, 5, 5, 1344, 256),       # many groups, 6 splits
    (2, 1, 8, 1, 128, 128, 6, 6, 384, 128),      # one block per split
    (1, 2, 1, 1, 256, 32, 2, 8, 0, None),        # empty cache
    (1, 1, 2, 1, 64, 32, 8, 2, 1120, 384),       # 35 groups
    (1, 2, 4, 1, 128, 64, 4, 2, 4096, None),     # k4v2 at 4K, default splits
    (1, 1, 4, 1, 256, 64, 3, 6, 448, 128),       # 7 groups, 4 splits
    (2, 2, 2, 1, 64, 32, 6, 3, 96, None),
    (1, 1, 8, 1, 128, 32, 5, 4, 288, None),
    (1, 2, 2, 1, 256, 128, 2, 5, 768, None),
    (1, 1, 1, 1, 128, 64, 8, 3, 1024, 512),
    (1, 1, 4, 5, 64, 32, 4, 4, 64, None),        # R = 20 rows: two row chunks
    (2, 1, 2, 1, 128, 64, 2, 2, 4096, 1024),     # k2v2 at 4K
]


# Ragged batches: n is one token count per batch row (same field layout).
RAGGED_CASES = [  # kernel templates shared with CASES (fewer emulator compiles)
    (2, 2, 4, 1, 128, 64, 4, 2, (192, 0), None),           # an empty row, partial block
    (3, 1, 4, 1, 64, 64, 5, 5, (448, 0, 192), 128),        # 4 splits; row 2 stops in split 1
    (4, 2, 2, 1, 256, 128, 2, 5, (0, 512, 128, 384), 256),  # B = 4, rows end at split edges
    (2, 1, 4, 5, 64, 32, 4, 4, (64, 320), None),           # R = 20 rows: two row chunks
    (3, 2, 1, 1, 128, 64, 8, 3, (128, 64, 192), None),     # no GQA, no empty row
    (2, 1, 1, 1, 256, 32, 2, 8, (0, 0), None),             # every row empty
    (2, 1, 4, 1, 256, 64, 3, 6, (704, 192), None),         # default splits (6), row 1 in 2
    (2, 2, 8, 1, 128, 128, 6, 6, (384, 128), 128),         # 3 splits
]


# Sliding windows: the query sees tokens [first, n) of each row (first need
# not be a multiple of the group; an 11th field, one int or one per row).
WINDOW_CASES = [  # kernel templates shared with CASES
    (1, 2, 2, 1, 128, 64, 3, 3, 192, None, 70),             # inside the second group
    (1, 1, 8, 1, 256, 128, 8, 8, 640, 256, 300),            # starts in the second split
    (1, 2, 4, 1, 64, 64, 5, 5, 1344, 256, 1337),            # 7 tokens left, last split
    (2, 2, 4, 1, 128, 32, 4, 4, 160, None, 160),            # nothing left: empty partials
    (3, 1, 4, 1, 64, 64, 5, 5, (448, 0, 192), 128, (129, 0, 5)),  # ragged, per-row firsts
    (2, 2, 8, 1, 128, 128, 6, 6, (384, 128), 128, (255, 1)),
]


def _case_id(c):
    B, H, rep, L, D, G, kb, vb, n, split = c[:10]
    n = n if isinstance(n, int) else "_".join(map(str, n))
    first = "" if len(c) == 10 else "-f" + (str(c[10]) if isinstance(c[10], int)
                                             else "_".join(map(str, c[10])))
    return f"B{B}H{H}r{rep}L{L}-D{D}-G{G}-k{kb}v{vb}-n{n}-s{split}{first}"


def _counts(n, B):
    return [n] * B if isinstance(n, int) else list(n)


def make_inputs(B, H, R, D, G, kb, vb, n, *, seed=0, scale_dtype=np.float16, poison=True,
                first=0):
    """A preallocated cache in which batch row b holds n (or n[b]) valid
    tokens; with ``poison`` the rest of its capacity holds NaN, so any read
    past a row's count poisons the result (without, it holds finite data,
    which a masking reference needs: it reads up to the largest count).
    Tokens before ``first`` (a window's hidden ones) hold large values in
    their own groups' range: reading one shifts the result."""
    rng = np.random.default_rng(seed)
    counts = _counts(n, B)
    cap = max(counts) + 2 * G
    kt = rng.standard_normal((B, H, D, cap)).astype(scale_dtype)
    v = rng.standard_normal((B, H, cap, D)).astype(scale_dtype)
    kt += rng.standard_normal((1, 1, D, 1)).astype(scale_dtype)  # per-channel offsets
    for b, fb in enumerate(_counts(first, B)):
        kt[b, ..., :fb] = 3.0
        v[b, :, :fb] = 8.0
    if poison:
        for b, nb in enumerate(counts):
            kt[b, ..., nb:] = np.nan
            v[b, :, nb:] = np.nan
    k_codes, k_scales, k_biases = mx.quantize(mx.array(kt), group_size=G, bits=kb)
    v_codes, v_scales, v_biases = mx.quantize(mx.array(v), group_size=G, bits=vb)
    qg = (rng.standard_normal((B, H, R, D)) * (2.0 / np.sqrt(D))).astype(np.float32)
    return mx.array(qg), k_codes, k_scales, k_biases, v_codes, v_scales, v_biases


def truth_partials(qg, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, kb, vb, G, n,
                   first=0):
    """float64 partials from the packed codes (mx.quantize's LSB-first bit
    stream) over tokens [first, n); n, first: one int, or one per batch row."""
    if not isinstance(n, int) or not isinstance(first, int):
        B = qg.shape[0]
        ns = [n] * B if isinstance(n, int) else n
        fs = [first] * B if isinstance(first, int) else first
        rows = [
            truth_partials(*(x[b : b + 1] for x in (qg, k_codes, k_scales, k_biases, v_codes,
                                                   v_scales, v_biases)), kb, vb, G, nb, fb)
            for b, (nb, fb) in enumerate(zip(ns, fs))
        ]
        return tuple(np.concatenate([r[i] for r in rows], axis=0) for i in range(3))

    if n == first:
        return _softmax_partials(qg, None, None, n, first)
    kd = _deq(k_codes, k_scales, k_biases, kb, G, n)
    vd = _deq(v_codes[:, :, :n], v_scales[:, :, :n], v_biases[:, :, :n], vb, G, qg.shape[-1])
    return _softmax_partials(qg, kd, vd, n, first)


def _deq(codes, scales, biases, bits, G, count):
    """float64 values of packed codes (mx.quantize's LSB-first bit stream),
    the first `count` along the last axis."""
    stream = np.unpackbits(np.array(codes).view(np.uint8), axis=-1, bitorder="little")
    c = stream.reshape(*stream.shape[:-1], -1, bits) @ (1 << np.arange(bits))
    s = np.repeat(np.array(scales).astype(np.float64), G, axis=-1)
    b = np.repeat(np.array(biases).astype(np.float64), G, axis=-1)
    return c[..., :count] * s[..., :count] + b[..., :count]


def _softmax_partials(qg, kd, vd, n, first):
    """float64 (m, l, o) of qg over keys kd [B, H, D, >=n] and values vd
    [B, H, n, D], tokens [first, n)."""
    q = np.array(qg).astype(np.float64)
    B, H, R, D = q.shape
    if n == first:
        return np.full((B, H, R), -np.inf), np.zeros((B, H, R)), np.zeros((B, H, R, D))
    kd, vd = kd[..., first:n], vd[:, :, first:]
    s = q @ kd
    m = s.max(-1)
    p = np.exp(s - m[..., None])
    return m, p.sum(-1), p @ vd


def max_errors(got, want):
    """(m abs err / (1+|m|), l rel err, o err relative to the row's max |o|)."""
    m, l, o = (np.array(x).astype(np.float64) for x in got)
    wm, wl, wo = (np.asarray(x, dtype=np.float64) for x in want)
    if not (np.isfinite(l).all() and np.isfinite(o).all()):
        return np.inf, np.inf, np.inf
    empty = np.isneginf(wm)
    if not np.array_equal(np.isneginf(m), empty):
        return np.inf, np.inf, np.inf
    em = np.where(empty, 0.0, np.abs(np.where(empty, 0, m) - np.where(empty, 0, wm)) / (1 + np.abs(np.where(empty, 0, wm))))
    el = np.abs(l - wl) / np.maximum(np.abs(wl), 1e-30)
    el = np.where(empty, np.abs(l), el)
    scale = np.maximum(np.abs(wo).max(-1, keepdims=True), 1e-30)
    eo = np.where(empty[..., None], np.abs(o), np.abs(o - wo) / scale)
    return float(em.max()), float(el.max()), float(eo.max())


def run_case(case, *, seed=0, scale_dtype=np.float16):
    """(kernel, reference, float64) partials. The kernel and the float64
    oracle read the NaN-poisoned cache; for a ragged batch the reference,
    which masks the tokens between a row's count and the largest, reads the
    same cache without poison."""
    B, H, rep, L, D, G, kb, vb, n, split = case[:10]
    first = case[10] if len(case) > 10 else 0
    R = rep * L
    args = make_inputs(B, H, R, D, G, kb, vb, n, seed=seed, scale_dtype=scale_dtype,
                       first=first)
    ref_args = args if isinstance(n, int) else make_inputs(
        B, H, R, D, G, kb, vb, n, seed=seed, scale_dtype=scale_dtype, poison=False, first=first)
    got = K.metal_decode_partials(*args, k_bits=kb, v_bits=vb, group_size=G, n_tokens=n,
                                  first_token=first, split_tokens=split, backend="emu")
    ref = quantized_segment_partials(*ref_args, k_bits=kb, v_bits=vb, group_size=G, n_tokens=n,
                                     first_token=first)
    mx.eval(*got, *ref)
    assert got[0].shape == (B, H, R) and got[1].shape == (B, H, R) and got[2].shape == (B, H, R, D)
    return got, ref, truth_partials(*args, kb, vb, G, n, first)


def check_case(case):
    """Run a case; the kernel must match the MLX path and the float64 oracle."""
    got, ref, truth = run_case(case)
    err_ref = max_errors(got, ref)
    err_truth = max_errors(got, truth)
    assert max(err_ref) < RTOL, f"kernel vs quantized_segment_partials: m/l/o errors {err_ref}"
    assert max(err_truth) < RTOL, f"kernel vs float64: m/l/o errors {err_truth}"
    return got


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case):
    check_case(case)


def test_case_matrix_covers_the_contract():
    bits = {c[6] for c in CASES}, {c[7] for c in CASES}
    assert bits[0] == bits[1] == set(K.SUPPORTED_BITS)
    assert {c[4] for c in CASES} == set(K.SUPPORTED_HEAD_DIMS)
    assert {c[5] for c in CASES} == set(K.SUPPORTED_GROUP_SIZES)
    assert {c[2] for c in CASES} >= {1, 2, 4, 8}
    assert any(c[0] > 1 for c in CASES)
    ns = [(c[8], c[5]) for c in CASES]
    assert any(n == 0 for n, _ in ns) and any(n == g for n, g in ns)
    assert any((n // g) % 2 == 1 and n > g for n, g in ns)
    assert any(c[2] * c[3] > K.MAX_ROWS for c in CASES)


@pytest.mark.parametrize("case", RAGGED_CASES, ids=_case_id)
def test_ragged_kernel_matches_reference(case):
    got = check_case(case)
    # Rows without tokens: exactly the empty partials.
    for b, nb in enumerate(case[8]):
        if nb == 0:
            assert np.all(np.isneginf(np.array(got[0][b])))
            assert not np.array(got[1][b]).any() and not np.array(got[2][b]).any()


@pytest.mark.parametrize("case", WINDOW_CASES, ids=_case_id)
def test_window_kernel_matches_reference(case):
    """A sliding window hides each row's oldest tokens (any count, not only
    whole groups); a row with none left gets the empty partials."""
    got = check_case(case)
    B, n, first = case[0], case[8], case[10]
    for b, (nb, fb) in enumerate(zip(_counts(n, B), _counts(first, B))):
        if nb == fb:
            assert np.all(np.isneginf(np.array(got[0][b])))


def test_first_tokens_are_validated():
    args = make_inputs(2, 1, 1, 64, 32, 4, 4, 64)
    run = lambda f: K.metal_decode_partials(*args, k_bits=4, v_bits=4, group_size=32,
                                            n_tokens=(64, 32), first_token=f, backend="emu")
    with pytest.raises(ValueError, match=r"first_token=40 \(batch row 1\) must be within"):
        run((3, 40))
    with pytest.raises(ValueError, match="first_token has 3 per-row counts"):
        run((0, 0, 0))


def test_ragged_case_matrix_covers_the_contract():
    assert {c[6] for c in RAGGED_CASES} == {c[7] for c in RAGGED_CASES} == set(K.SUPPORTED_BITS)
    assert {c[4] for c in RAGGED_CASES} == set(K.SUPPORTED_HEAD_DIMS)
    assert {c[5] for c in RAGGED_CASES} == set(K.SUPPORTED_GROUP_SIZES)
    assert {c[0] for c in RAGGED_CASES} == {2, 3, 4} and {c[2] for c in RAGGED_CASES} >= {1, 2, 4, 8}
    assert all(len(c[8]) == c[0] and len(set(c[8])) > 1 for c in RAGGED_CASES if any(c[8]))
    assert any(0 in c[8] and max(c[8]) > 0 for c in RAGGED_CASES)
    assert any(not any(c[8]) for c in RAGGED_CASES)
    # Several splits, with some row's (non-zero) count ending before the last split begins.
    assert any(c[9] and 0 < n <= (-(-max(c[8]) // c[9]) - 1) * c[9]
               for c in RAGGED_CASES for n in c[8])
    assert any(c[2] * c[3] > K.MAX_ROWS for c in RAGGED_CASES)


def test_ragged_counts_are_validated():
    args = make_inputs(3, 1, 1, 64, 32, 4, 4, (64, 0, 32))  # capacity 128 tokens
    run = lambda n: K.metal_decode_partials(*args, k_bits=4, v_bits=4, group_size=32,
                                            n_tokens=n, backend="emu")
    with pytest.raises(ValueError, match="2 per-row counts but the batch has 3 rows"):
        run((64, 32))
    with pytest.raises(ValueError, match=r"n_tokens=48 \(batch row 1\) must be a non-negative multiple of 32"):
        run((64, 48, 0))
    with pytest.raises(ValueError, match=r"n_tokens=-32 \(batch row 2\)"):
        run([64, 0, -32])
    with pytest.raises(ValueError, match=r"n_tokens=160 \(batch row 0\).*capacity of 128"):
        run((160, 0, 0))
    with pytest.raises(ValueError, match=r"n_tokens=160 must be"):
        run(160)
    with pytest.raises(TypeError, match="sequence of 3 ints"):
        run((64.0, 0, 32))


def test_float32_scales():
    got, ref, _ = run_case((1, 2, 2, 1, 128, 64, 4, 4, 256, 128), scale_dtype=np.float32)
    assert max(max_errors(got, ref)) < RTOL


# ----------------------------------------------------- the checker has teeth
_BARRIER = "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);"


def _without_barrier(body, index):
    pos = -1
    for _ in range(index + 1):
        pos = body.index(_BARRIER, pos + 1)
    return body[:pos] + body[pos + len(_BARRIER):]


_ROW_COUNT = "const int n_tokens = lengths[bh / uint(n_kv_heads)];"
_RAGGED_BROKEN = {
    # every row uses row 0's count
    "row0_count": "const int n_tokens = lengths[0];",
    # every row uses the largest count
    "max_count": """int n_tokens = 0;
for (uint b = 0; b < threadgroups_per_grid.y / uint(n_kv_heads); ++b) {
  n_tokens = metal::max(n_tokens, lengths[b]);
}""",
}


_FIRST = "const int t_first = starts[bh / uint(n_kv_heads)];"
_WINDOW_BROKEN = {
    # the window is ignored: every held token is read
    "starts_ignored": "const int t_first = 0;",
    # whole groups only: the hidden tokens of a partly hidden group are read
    "starts_by_group": "const int t_first = starts[bh / uint(n_kv_heads)] / GROUP * GROUP;",
}


def _broken(variant):
    header, body = K.kernel_sources()
    if variant in _WINDOW_BROKEN:
        new = body.replace(_FIRST, _WINDOW_BROKEN[variant])
        assert new != body
        return header, new
    if variant == "bit_offset":
        new = header.replace("const uint bit = idx * BITS;", "const uint bit = idx * BITS + 1;")
        assert new != header
        return new, body
    if variant == "straddle_ignored":  # drops the second word of 3/5/6-bit codes
        new = header.replace("shift + BITS > 32u", "shift + BITS > 64u")
        assert new != header
        return new, body
    if variant in _RAGGED_BROKEN:
        new = body.replace(_ROW_COUNT, _RAGGED_BROKEN[variant])
        assert new != body
        return header, new
    index = {"no_q_barrier": 0, "no_max_barrier": 1, "no_p_barrier": 2, "no_reduce_barrier": 3}[variant]
    assert body.count(_BARRIER) == 4
    return header, _without_barrier(body, index)


_BROKEN_UNIFORM = (2, 2, 4, 1, 64, 32, 3, 5, 320, None)
_BROKEN_RAGGED = (3, 2, 4, 1, 64, 32, 3, 5, (192, 0, 320), 128)  # 3 splits


@pytest.mark.parametrize(
    "variant",
    ["bit_offset", "straddle_ignored", "no_q_barrier", "no_max_barrier", "no_p_barrier",
     "no_reduce_barrier", *_RAGGED_BROKEN, *_WINDOW_BROKEN],
)
def test_broken_kernel_is_caught(variant, monkeypatch):
    header, body = _broken(variant)
    kernel = metal_emu.metal_kernel("kvq_broken", K._INPUTS, K._OUTPUTS, body, header)
    monkeypatch.setattr(K, "_decode_kernel", lambda backend: kernel)
    # A uniform batch cannot tell the raggedness variants from the kernel, nor
    # a cache without a window the window variants.
    cases = [_BROKEN_RAGGED] if variant in _RAGGED_BROKEN else \
        [_BROKEN_RAGGED + ((129, 0, 37),)] if variant in _WINDOW_BROKEN else \
        [_BROKEN_UNIFORM, _BROKEN_RAGGED]
    for case in cases:
        got, ref, truth = run_case(case)
        err = max(max(max_errors(got, ref)), max(max_errors(got, truth)))
        assert err > 100 * RTOL, f"{variant} not caught on {_case_id(case)}"


# Keys split by width (the first hi channels at kb + 1) and values with a
# group of their own: (B, H, rep, D, G, Gv, kb, vb, hi, n, split).
SPLIT_CASES = [
    (1, 2, 4, 64, 32, 64, 3, 3, 16, 192, None),
    (2, 1, 2, 128, 64, 32, 2, 3, 32, (256, 64), 128),  # ragged, 2 splits
    (1, 1, 8, 128, 32, 128, 4, 3, 8, 320, None),
    (1, 2, 1, 256, 64, 64, 2, 2, 48, 128, None),
]


def run_split_case(case, seed=0):
    """(kernel, reference, float64) partials of split keys; rows past their
    count hold NaN for the kernel and the oracle, finite data for the
    reference (it masks up to the largest count)."""
    B, H, rep, D, G, Gv, kb, vb, hi, n, split = case
    counts = _counts(n, B)
    rng = np.random.default_rng(seed)
    cap = max(counts) + 2 * max(G, 128)
    kt = rng.standard_normal((B, H, D, cap)).astype(np.float16)
    kt += rng.standard_normal((1, 1, D, 1)).astype(np.float16)
    v = rng.standard_normal((B, H, cap, D)).astype(np.float16)
    qg = mx.array((rng.standard_normal((B, H, rep, D)) * (2.0 / np.sqrt(D))).astype(np.float32))
    out = []
    for poison in (True, False):
        k2, v2 = kt.copy(), v.copy()
        if poison:
            for b, nb in enumerate(counts):
                k2[b, ..., nb:] = np.nan
                v2[b, :, nb:] = np.nan
        top = mx.quantize(mx.array(k2[:, :, :hi]), group_size=G, bits=kb + 1)
        rest = mx.quantize(mx.array(k2[:, :, hi:]), group_size=G, bits=kb)
        out.append((top, rest, mx.quantize(mx.array(v2), group_size=Gv, bits=vb)))
    top, rest, vals = out[0]
    rtop, rrest, rvals = out[0] if isinstance(n, int) else out[1]
    kw = dict(k_bits=kb, v_bits=vb, group_size=G, v_group_size=Gv, k_hi=hi, n_tokens=n)
    got = K.metal_decode_partials(qg, *top, *vals, k_lo=rest, split_tokens=split,
                                  backend="emu", **kw)
    ref = quantized_segment_partials(qg, *rtop, *rvals, k_lo=rrest, **kw)
    mx.eval(*got, *ref)
    truth = []
    for b, nb in enumerate(counts):
        row = lambda x: x[b:b + 1]  # noqa: E731
        kd = np.concatenate([_deq(*map(row, top), kb + 1, G, nb),
                             _deq(*map(row, rest), kb, G, nb)], axis=2)
        vd = _deq(*(row(x)[:, :, :nb] for x in vals), vb, Gv, D)
        truth.append(_softmax_partials(row(qg), kd, vd, nb, 0))
    return got, ref, tuple(np.concatenate([t[i] for t in truth]) for i in range(3))


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}H{}r{}-D{}-G{}-Gv{}-k{}v{}-hi{}-n{}".format(
    *c[:9], c[9] if isinstance(c[9], int) else "_".join(map(str, c[9]))))
def test_split_keys_and_value_groups_match_reference(case):
    got, ref, truth = run_split_case(case)
    assert max(max_errors(got, ref)) < RTOL, max_errors(got, ref)
    assert max(max_errors(got, truth)) < RTOL, max_errors(got, truth)


def test_split_inputs_are_validated():
    """Split keys without their other part, or values read with a group
    their scales do not hold, are refused with what would work."""
    B, H, rep, D, G, Gv, kb, vb, hi, n, _ = SPLIT_CASES[0]
    qg = mx.zeros((B, H, rep, D))
    top = mx.quantize(mx.zeros((B, H, hi, 256)), group_size=G, bits=kb + 1)
    rest = mx.quantize(mx.zeros((B, H, D - hi, 256)), group_size=G, bits=kb)
    vals = mx.quantize(mx.zeros((B, H, 256, D)), group_size=Gv, bits=vb)
    kw = dict(k_bits=kb, v_bits=vb, group_size=G, k_hi=hi, n_tokens=n, backend="emu")
    with pytest.raises(ValueError, match="need both k_hi > 0 and k_lo"):
        K.metal_decode_partials(qg, *top, *vals, v_group_size=Gv, **kw)
    with pytest.raises(ValueError, match="pass the values' group"):
        K.metal_decode_partials(qg, *top, *vals, k_lo=rest, **kw)  # values' group omitted


@pytest.mark.parametrize("variant", ["narrow_at_wide_width", "values_at_key_group"])
def test_broken_split_kernel_is_caught(variant, monkeypatch):
    """The narrower channels read at the outlier channels' width, or values
    dequantized with the keys' group, must not pass."""
    header, body = K.kernel_sources()
    old, new = {"narrow_at_wide_width": ("kvq_unpack<KBITS>(kl_codes", "kvq_unpack<K_WIDE>(kl_codes"),
                "values_at_key_group": ("const uint vg = d0 / VGROUP;", "const uint vg = d0 / GROUP;")
                }[variant]
    assert body.count(old) == 1
    kernel = metal_emu.metal_kernel("kvq_broken", K._INPUTS, K._OUTPUTS, body.replace(old, new),
                                    header)
    monkeypatch.setattr(K, "_decode_kernel", lambda backend: kernel)
    got, ref, truth = run_split_case(SPLIT_CASES[1])
    assert max(max(max_errors(got, ref)), max(max_errors(got, truth))) > 100 * RTOL


def test_broken_ragged_variants_pass_uniform_batches(monkeypatch):
    """The raggedness variants are only wrong when the rows' counts differ."""
    for variant in _RAGGED_BROKEN:
        header, body = _broken(variant)
        kernel = metal_emu.metal_kernel("kvq_broken", K._INPUTS, K._OUTPUTS, body, header)
        monkeypatch.setattr(K, "_decode_kernel", lambda backend: kernel)
        got, ref, _ = run_case(_BROKEN_RAGGED[:8] + ((192, 192, 192), 128))
        assert max(max_errors(got, ref)) < RTOL


# ----------------------------------------------------------- the emulation
def test_emulator_signature_and_attributes():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = inp[i] * scale + float(inp_shape[1]) + float(threads_per_threadgroup.x);
    """
    k = metal_emu.metal_kernel("sig", ["inp", "scale"], ["out"], src)
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    (out,) = k(inputs=[x, np.float32(2.0)], grid=(64, 1, 1), threadgroup=(32, 1, 1),
               output_shapes=[(64,)], output_dtypes=[mx.float32])
    np.testing.assert_array_equal(np.array(out), x.ravel() * 2 + 32 + 32)


def test_emulator_reports_divergent_simd_op():
    src = """
        float v = 1.0f;
        if (thread_index_in_simdgroup < 16) v = metal::simd_sum(v);
        out[thread_position_in_grid.x] = v;
    """
    k = metal_emu.metal_kernel("diverge", ["inp"], ["out"], src)
    with pytest.raises(RuntimeError, match="deadlock"):
        k(inputs=[np.zeros(32, np.float32)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
          output_shapes=[(32,)], output_dtypes=[mx.float32], timeout=0.5)


# ------------------------------------------------------------ dispatching
def test_dispatch_env(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.kernel_mode() == "auto"
    assert K.use_metal() == mx.metal.is_available()
    monkeypatch.setenv(K.ENV_VAR, "mlx")
    assert K.use_metal() is False
    monkeypatch.setenv(K.ENV_VAR, "emu")
    assert K.use_metal() is True
    monkeypatch.setenv(K.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=K.ENV_VAR):
        K.use_metal()
    monkeypatch.setenv(K.ENV_VAR, "metal")
    if mx.metal.is_available():
        assert K.use_metal() is True
    else:
        with pytest.raises(RuntimeError, match="Metal is not available"):
            K.use_metal()
        monkeypatch.setenv(K.ENV_VAR, "auto")
        with pytest.raises(RuntimeError, match="needs a Metal GPU"):
            K.metal_decode_partials(*make_inputs(1, 1, 1, 64, 32, 4, 4, 32), k_bits=4, v_bits=4,
                                    group_size=32, n_tokens=32)


def test_supports():
    assert K.supports(4, 2) and K.supports(3, 6, head_dim=128, group_size=64)
    assert not K.supports(None, 4) and not K.supports(4, 7) and not K.supports(1, 4)
    assert not K.supports(4, 4, head_dim=96) and not K.supports(4, 4, head_dim=64, group_size=128)
    assert K.supports(3, 3, head_dim=64, group_size=32, v_group_size=64, k_hi=16)
    assert not K.supports(8, 4, k_hi=8) and not K.supports(3, 3, head_dim=64, k_hi=64)
    assert not K.supports(3, 3, head_dim=64, group_size=32, v_group_size=48)
