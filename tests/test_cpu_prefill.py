"""The native CPU prefill-attention kernel (mlx_kvq.cpu_kernels.prefill_attention).

Held equal to a float64 computation from the raw packed codes on randomized
chunks: every code width for keys and values and 16-bit parts, groups 32/64,
head dims 64/128/256, GQA 1-8, batches whose rows hold different counts and
positions (empty rows, one-token rows, queries before any token), the causal
rule and windows inside a group, sinks and residuals of several fills,
per-token keys, learned sink logits, for 1, 2 and 3 threads. Tokens past a
row's count are NaN and tokens the window or the causal rule hides hold
large values, so a kernel that reads or keeps what it must not fails.
Keys split by width (outlier channels one bit wider, each part with its own
scales) and values with a group of their own are held to the same oracle.
Broken variants (no online rescaling, every row with the first row's counts,
the window ignored, a group offset off by one, a query seeing its next
token, the wider channels read at the narrower width) must fail the same
checks. Then the kernel against the pure-MLX path through real caches
(single, batched, windows, every spec width, outlier channels and value
groups).
"""

import os
import subprocess
import sys

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq import attention, cpu_kernels
from mlx_kvq.batch_cache import KVQBatchCache
from mlx_kvq.cache import Calibration, KVQCache
from mlx_kvq.cpu_kernels import CHANNEL, FP, TOKEN
from mlx_kvq.metal_kernels import decode as kernels
from test_cpu_kernels import RTOL, ATOL, WIDTHS, _fill, check_faults_fail, deq, quantized
from test_cpu_kernels import split_cases as decode_split_cases

if not cpu_kernels.usable():  # test_cpu_kernels says why, or fails when it should build
    pytest.skip(f"the native kernel is not available: {cpu_kernels.status()[1]}",
                allow_module_level=True)


def make_chunk(rng, c):
    """Segments [sinks (fp), body, residual (fp)] per row at given
    positions, and per (row, head) the float64 keys, values and positions
    of the tokens each row holds."""
    B, H, D, Dv, G, kb, vb = (c[k] for k in ("B", "H", "D", "Dv", "G", "kb", "vb"))
    held = [[([], [], []) for _ in range(H)] for _ in range(B)]
    segs, starts = [], []

    hi, Gv = c.get("hi", 0), c.get("Gv", G)

    def add(kp, vp, k_kind, v_kind, kd, vd, counts, firsts, start, split=0):
        segs.append((kp, vp, k_kind, kb if k_kind != FP else None, v_kind,
                     vb if v_kind != FP else None, (G, Gv), tuple(counts), tuple(firsts),
                     split))
        starts.append(tuple(start))
        for b in range(B):
            for h in range(H):
                t = np.arange(firsts[b], counts[b])
                held[b][h][0].append(kd[b, h, t])
                held[b][h][1].append(vd[b, h, t])
                held[b][h][2].append(start[b] + t)

    def fp_segment(counts, start):
        n = max(counts)
        ks = rng.standard_normal((B, H, n + 3, D)).astype(np.float16)
        vs = rng.standard_normal((B, H, n + 3, Dv)).astype(np.float16)
        for b in range(B):
            ks[b, :, counts[b]:] = np.nan
            vs[b, :, counts[b]:] = np.nan
        add(mx.array(ks), mx.array(vs), FP, FP, ks.astype(np.float64), vs.astype(np.float64),
            counts, (0,) * B, start)

    sinks = [min(c["sinks"], n) for n in c["counts"]]
    if max(sinks):
        fp_segment(sinks, (0,) * B)
    counts, firsts = c["counts"], c["firsts"]
    body_start = [s + gap for s, gap in zip(sinks, c["gaps"])]
    cap = (max(counts) // G + 2) * G
    k = rng.standard_normal((B, H, cap, D)) + rng.standard_normal((1, 1, 1, D))
    v = rng.standard_normal((B, H, cap, Dv))
    for b in range(B):
        k[b, :, :firsts[b]] = 3.0
        v[b, :, :firsts[b]] = 8.0
        k[b, :, -(-counts[b] // G) * G if c["k_kind"] == CHANNEL and kb else counts[b]:] = np.nan
        v[b, :, counts[b]:] = np.nan
    if kb and c["k_kind"] == CHANNEL and hi:  # the first hi channels one bit wider
        kt = k.swapaxes(-1, -2)
        top, rest = quantized(kt[:, :, :hi], kb + 1, G), quantized(kt[:, :, hi:], kb, G)
        kp = top + rest
        kd = np.concatenate([deq(top, kb + 1, G), deq(rest, kb, G)], axis=-2).swapaxes(-1, -2)
    elif kb and c["k_kind"] == CHANNEL:
        kp = quantized(k.swapaxes(-1, -2), kb, G)
        kd = deq(kp, kb, G).swapaxes(-1, -2)
    elif kb:
        kp = quantized(k, kb, G)
        kd = deq(kp, kb, G)
    else:
        kp, kd = mx.array(k.astype(np.float16)), k.astype(np.float16).astype(np.float64)
    if vb:
        vp = quantized(v, vb, Gv)
        vd = deq(vp, vb, Gv)
    else:
        vp, vd = mx.array(v.astype(np.float16)), v.astype(np.float16).astype(np.float64)
    add(kp, vp, c["k_kind"] if kb else FP, TOKEN if vb else FP, kd, vd, counts, firsts,
        body_start, hi if kb else 0)
    if c["res"]:
        res = [(c["res"] + 7 * b) % (c["res"] + 1) for b in range(B)]
        fp_segment(res, [s + n for s, n in zip(body_start, counts)])
    return segs, starts, held


def truth(q, held, q0, causal, window, sink_logits=None):
    """float64 attention of q [B, H, R, L, D], query i of row b at q0[b] + i,
    over the tokens each row holds that its position may see."""
    q = np.array(q).astype(np.float64)
    B, H, R, L, _ = q.shape
    Dv = held[0][0][1][0].shape[-1]
    out = np.zeros((B, H, R, L, Dv))
    for b in range(B):
        p = q0[b] + np.arange(L)[:, None]
        for h in range(H):
            k, v, pos = (np.concatenate(x) for x in held[b][h])
            keep = np.ones((L, len(pos)), bool)
            if causal:
                keep &= pos[None] <= p
            if window:
                keep &= pos[None] > p - window
            s = np.where(keep, q[b, h] @ k.T, -np.inf)  # [R, L, T]
            if sink_logits is not None:
                sl = np.broadcast_to(np.array(sink_logits)[h * R:(h + 1) * R, None, None],
                                     (R, L, 1))
                s = np.concatenate([s, sl], -1)
                v = np.concatenate([v, np.zeros((1, Dv))])
            if s.shape[-1] == 0:
                continue  # a row that holds nothing: 0
            m = s.max(-1, keepdims=True)
            e = np.where(np.isinf(s), 0.0, np.exp(s - np.where(np.isinf(m), 0.0, m)))
            l = e.sum(-1, keepdims=True)
            out[b, h] = (e @ v) / np.where(l > 0, l, 1.0)
    return out


def cases():
    """Randomized chunks: every key width with 4-bit values and every value
    width with 4-bit keys, shapes, rows, positions, windows varied."""
    rng = np.random.default_rng(2027)
    pairs = sorted({(k, 4) for k in WIDTHS} | {(4, v) for v in WIDTHS}, key=str)
    out = []
    for i, (kb, vb) in enumerate(pairs):
        B = int(rng.integers(1, 4))
        counts = [int(rng.integers(0, 300)) for _ in range(B)]
        if B > 1:
            counts[i % B] = (0, 1)[i % 2]
        L = (1, 5, 70, 130)[i % 4]
        out.append(dict(
            B=B, H=int(rng.integers(1, 3)), R=(1, 2, 3, 4, 8)[i % 5], D=(64, 128, 256)[i % 3],
            Dv=64 if i % 4 == 1 else (64, 128, 256)[i % 3], G=(32, 64)[i % 2], kb=kb, vb=vb,
            counts=counts, firsts=[int(rng.integers(0, n + 1)) if i % 3 == 0 else 0
                                   for n in counts],
            gaps=[int(rng.integers(0, 40)) for _ in range(B)], k_kind=TOKEN if i % 6 == 4
            else CHANNEL, sinks=i % 5, res=(0, 1, 31, 64, 95)[i % 5], L=L,
            window=(0, 0, 45, 100)[i % 4], causal=i % 7 != 6, learned=i % 4 == 2,
            # the chunk ends at each row's last token, or (a padded row) earlier
            lag=[int(rng.integers(0, 20)) if i % 5 == 3 else 0 for _ in range(B)], seed=i))
    return out


def run_case(c, fault=0):
    rng = np.random.default_rng(c["seed"])
    segs, starts, held = make_chunk(rng, c)
    ends = [max([s[b] + seg[7][b] for s, seg in zip(starts, segs) if seg[7][b]] + [0])
            for b in range(c["B"])]
    q0 = [e - c["L"] - lag for e, lag in zip(ends, c["lag"])]
    q = (rng.standard_normal((c["B"], c["H"], c["R"], c["L"], c["D"])) / np.sqrt(c["D"])
         ).astype(np.float32)
    sl = rng.standard_normal(c["H"] * c["R"]).astype(np.float32) if c["learned"] else None
    out = cpu_kernels.prefill_attention(
        mx.array(q), segs, starts, q0, causal=c["causal"], window=c["window"],
        sinks=None if sl is None else mx.array(sl), fault=fault)
    return np.array(out), truth(q, held, q0, c["causal"], c["window"], sl)


CASES = cases()


def _id(c):
    w = lambda b: b or 16  # noqa: E731
    return (f"k{w(c['kb'])}v{w(c['vb'])}-B{c['B']}H{c['H']}R{c['R']}L{c['L']}-D{c['D']}/"
            f"{c['Dv']}-G{c['G']}-w{c['window']}{'' if c['causal'] else '-noncausal'}")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_prefill_kernel_equals_the_float64_oracle(case):
    out, want = run_case(case)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_the_cases_cover_what_the_kernel_must_hold():
    assert {c["kb"] for c in CASES} == set(WIDTHS) == {c["vb"] for c in CASES}
    assert {c["D"] for c in CASES} == {64, 128, 256} and {c["G"] for c in CASES} == {32, 64}
    assert {c["R"] for c in CASES} == {1, 2, 3, 4, 8} and {1, 130} <= {c["L"] for c in CASES}
    assert any(0 in c["counts"] and c["B"] > 1 for c in CASES)
    assert any(c["window"] % c["G"] for c in CASES if c["window"])  # inside a group
    assert any(c["learned"] for c in CASES) and any(not c["causal"] for c in CASES)
    assert any(c["k_kind"] == TOKEN and c["kb"] for c in CASES)
    assert any(max(c["lag"]) for c in CASES) and any(c["Dv"] != c["D"] for c in CASES)


def split_cases():
    """The decode kernel's cases of keys split by width and value groups of
    their own (test_cpu_kernels.split_cases) as prefill chunks: query
    lengths, windows, residual fills and gaps before the body varied."""
    out = []
    for i, c in enumerate(decode_split_cases()):
        B = c["B"]
        out.append(dict(c, gaps=[(17 * b + i) % 40 for b in range(B)], res=(0, 31, 64)[i % 3],
                        L=(5, 70, 130)[i % 3], window=(0, 45, 100)[i % 3], causal=True,
                        lag=[0] * B, seed=200 + i))
    return out


@pytest.mark.parametrize("case", split_cases(), ids=lambda c: f"hi{c['hi']}-Gv{c['Gv']}-" + _id(c))
def test_split_keys_and_value_groups_equal_the_float64_oracle(case):
    out, want = run_case(case)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


# A chunk each broken variant must fail: a ragged batch whose first row is
# the longest, a window inside a group over several groups of scales.
BROKEN = dict(B=3, H=2, R=3, D=64, Dv=64, G=32, kb=4, vb=4, counts=[260, 130, 0],
              firsts=[0, 0, 0], gaps=[0, 5, 0], k_kind=CHANNEL, sinks=4, res=64, L=90,
              window=70, causal=True, learned=False, lag=[0, 0, 0], seed=7)


@pytest.mark.parametrize("fault", [1, 2, 3, 4, 5], ids=["rescale", "row-count", "window",
                                                        "group-offset", "causal"])
def test_broken_variants_fail(fault):
    check_faults_fail(run_case, BROKEN, [fault])


def test_split_keys_broken_variants_fail():
    """Split keys whose wider channels are read at the narrower width, or
    with the next group's scales, must not pass."""
    check_faults_fail(run_case, dict(BROKEN, kb=3, hi=16, Gv=64), (4, 6))


def test_threads_one_two_three():
    """The same chunks with pools of 1 and 3 threads (a fresh process each:
    the pool is sized once); this process runs them with its own."""
    code = ("import sys, numpy as np; sys.path.insert(0, %r); import test_cpu_prefill as t; "
            "from mlx_kvq import cpu_kernels; print(cpu_kernels.threads()); "
            "errs = [float(np.max(np.abs(np.subtract(*t.run_case(c))))) "
            "for c in t.CASES[::3] + [t.BROKEN]]; print(max(errs))") % os.path.dirname(__file__)
    for n in (1, 3):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, MLX_KVQ_THREADS=str(n)), timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        threads, err = run.stdout.split()[-2:]
        assert int(threads) == n and float(err) < 1e-3, run.stdout


def test_bad_input_is_refused_with_what_would_work():
    q = mx.zeros((1, 1, 1, 4, 64))
    k = mx.zeros((1, 1, 8, 64), dtype=mx.float16)
    seg = (k, k, FP, None, FP, None, 32, (8,), (0,))
    with pytest.raises(ValueError, match=r"\[B, H, R, L, D\]"):
        cpu_kernels.prefill_attention(mx.zeros((1, 1, 4, 64)), [seg], [(0,)], [4])
    with pytest.raises(ValueError, match="starts need one entry per segment"):
        cpu_kernels.prefill_attention(q, [seg], [(0, 0)], [4])
    with pytest.raises(ValueError, match="exceeds its segment's buffer"):
        cpu_kernels.prefill_attention(q, [(k, k, FP, None, FP, None, 32, (9,), (0,))],
                                      [(0,)], [4])


# ---------------------------------------------------------------- real caches
def _both_paths(monkeypatch, fn):
    out = {}
    for mode in ("mlx", "cpu"):
        monkeypatch.setenv(kernels.ENV_VAR, mode)
        before = attention.prefill_paths_run().get("native", 0)
        out[mode] = fn()
        mx.eval(out[mode])
        assert (attention.prefill_paths_run().get("native", 0) > before) == (mode == "cpu")
    return float(mx.abs(out["cpu"] - out["mlx"]).max())


@pytest.mark.parametrize("spec", ["k4v4", "k2v2-rot", "k3v5-g64", "k8v6", "k6v16", "k16v3",
                                  "k4v4-ktok-rot", "k5v2-r32-s0", "fp16", "k3v3-o16-vg64-rot",
                                  "k4v3-o16-g64-r0-rot", "k2v4-o8-g64-vg32"])
def test_cache_chunks_equal_the_mlx_path(monkeypatch, spec):
    """A prefill chunk over real caches (the chunk's own tokens flushed into
    the body or waiting in the residual, after earlier chunks; a ragged batch
    with an empty row) equals the pure-MLX path."""
    for before, L in ((0, 70), (130, 67), (300, 200)):
        cache = KVQCache(spec)
        if before:
            _fill(cache, before, mx.random.key(before))
        _fill(cache, L, mx.random.key(L))
        q = mx.random.normal((1, 6, L, 64), key=mx.random.key(9))
        err = _both_paths(monkeypatch, lambda: attention.kvq_attention(q, cache, 0.125,
                                                                       mask="causal"))
        assert err < 1e-4, (spec, before, L, err)
    rows = []
    # Rows batched together store keys in one channel order (outlier channels).
    order = mx.array(np.tile(np.random.default_rng(1).permutation(64), (2, 1)).astype(np.int32))
    calibration = Calibration(k_order=order) if "-o" in spec else None
    for n in (0, 40, 333):
        c = KVQCache(spec, calibration=calibration)
        if n:
            _fill(c, n, mx.random.key(100 + n))
        rows.append(c)
    batch = KVQBatchCache.merge(rows)
    _fill(batch, 9, mx.random.key(5), B=3)
    q = mx.random.normal((3, 6, 9, 64), key=mx.random.key(10))
    assert _both_paths(monkeypatch, lambda: attention.kvq_attention(q, batch, 0.125,
                                                                    mask="causal")) < 1e-4


def test_window_cache_chunks_equal_the_mlx_path(monkeypatch):
    """Window caches (a window inside a group) with learned sink logits:
    chunks shorter and longer than the window, after earlier chunks."""
    spec, window = "k4v4-g32-r32-s0", 100
    sinks = mx.random.normal((4,), key=mx.random.key(77))
    for before, L in ((0, 150), (150, 60), (261, 130)):
        c = KVQCache(spec, window=window)
        if before:
            _fill(c, before, mx.random.key(before))
        _fill(c, L, mx.random.key(1000 + L))
        q = mx.random.normal((1, 4, L, 64), key=mx.random.key(L))
        err = _both_paths(monkeypatch, lambda: attention.kvq_attention(
            q, c, 0.125, mask="causal", sinks=sinks))
        assert err < 1e-4, (before, L, err)
