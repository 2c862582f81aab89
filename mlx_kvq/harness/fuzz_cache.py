"""The cache fuzz target's machine: a KVQCache (plain, max_kv_size or
sliding window) under random prefill chunks, decode steps, trims and
save/load round trips, held against a float reference (the keys and values
fed in). After every step: the offset and the positions held, every held
token within its error bound (one quantization step of its group's range,
accumulated when trimmed groups are quantized again; fp16 rounding for
16-bit parts), and attention over the quantized store within the bound that
follows from those (float64 attention over the exact keys and values at the
held positions, under the same causal and window rules). mlx_kvq.harness.fuzz runs
it; a tool: the runtime never imports it.
"""

import copy
import math
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from mlx_kvq import persist, quant
from mlx_kvq.attention import kvq_attention
from mlx_kvq.cache import KVQCache
from mlx_kvq.storage import Layout, layouts
from mlx_kvq.integration import install
from mlx_kvq.spec import KEY_AXES, VALID_BITS, KVQuantSpec
from mlx_kvq.harness.extras import need

need("hypothesis", "the cache fuzz target (mlx_kvq.harness.fuzz_cache)")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule  # noqa: E402

MAX_TOKENS = 1200  # prefill chunks stop once a cache has seen this many tokens
QUANT_SLACK = 1.02  # mx.quantize: one step of the group's range, fp16 scales a bit more
FP16_REL = 1e-3  # 16-bit storage: twice fp16's rounding of the token's largest element


@st.composite
def specs(draw, window=False):
    """KV specs the cache accepts for head dims 64..256 (groups 32, 64)."""
    k_bits = draw(st.sampled_from(VALID_BITS + (None,)))
    v_bits = draw(st.sampled_from(VALID_BITS + (None,)))
    axis = draw(st.sampled_from(KEY_AXES))
    group = draw(st.sampled_from([32, 64]))
    if k_bits is not None and axis == "channel":
        residual = group * draw(st.integers(0, 2))
    else:
        residual = draw(st.integers(0, 80))
    sinks = 0 if window else draw(st.integers(0, 8))
    outliers = 0
    if k_bits is not None and k_bits <= 5 and axis == "channel":
        outliers = draw(st.sampled_from([0, 8, 16]))  # at one bit more: within the bound
    return KVQuantSpec(k_bits, v_bits, axis, group, residual, sinks, draw(st.booleans()),
                       outliers, draw(st.sampled_from([None, 32, 64])))


def _np(x):
    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x


def _hadamard(x):
    return _np(quant.hadamard(mx.array(x)))


def held_positions(cache):
    """Absolute positions of the tokens a cache holds (sinks, body, residual,
    as its segments say), and which of them sit in the quantized body."""
    c = cache
    n_sink, n_res = c._sink_len(), c._res_len()
    parts = [(0, n_sink, False), (c.body_start, c.n_body, True), (c.offset - n_res, n_res, False)]
    parts = [p for p in parts if p[1]]
    segs = [(s.start, s.length) for s in c.segments(stored=True)]
    assert segs == [p[:2] for p in parts], f"segments {segs} disagree with the counts {parts}"
    pos = np.concatenate([np.arange(a, a + n) for a, n, _ in parts] or [np.zeros(0, int)])
    body = np.concatenate([np.full(n, b) for _, n, b in parts] or [np.zeros(0, bool)])
    return pos.astype(np.int64), body.astype(bool)


def quantization_bound(x, prev, layout: Layout, rotated: bool):
    """Per-element bound on the error of quantizing x [B, H, T, D] (model
    space, tokens that entered the body together: whole groups) that already
    carries errors up to `prev`: one step of each group's range (widened by
    the errors it carries) plus fp16 rounding of scales and biases. Rotated
    parts are quantized in the rotated space; the orthonormal rotation keeps
    each token's l2 error, which then bounds every element."""
    if layout.bits is None:
        return np.zeros_like(x)
    if rotated:
        x = _hadamard(x)
        prev = np.broadcast_to(np.sqrt((prev ** 2).sum(-1, keepdims=True)), x.shape)
    B, H, T, D = x.shape
    G = layout.group
    if layout.transposed:  # channel keys: groups of G tokens per channel
        xg, pg, axis = x.reshape(B, H, T // G, G, D), prev.reshape(B, H, T // G, G, D), 3
    else:  # per token: groups of G channels
        xg, pg, axis = x.reshape(B, H, T, D // G, G), prev.reshape(B, H, T, D // G, G), 4
    widen = pg.max(axis, keepdims=True)
    span = xg.max(axis, keepdims=True) - xg.min(axis, keepdims=True) + 2 * widen
    big = np.abs(xg).max(axis, keepdims=True) + widen
    err = QUANT_SLACK * span / (2 ** layout.bits - 1) + 2e-3 * big
    err = np.broadcast_to(err, xg.shape).reshape(x.shape)
    if rotated:
        err = np.broadcast_to(np.sqrt((err ** 2).sum(-1, keepdims=True)), x.shape)
    return err


def fp16_tolerance(x, rotated: bool):
    """What 16-bit storage (and a rotation in and out) may change per element."""
    big = np.abs(x).max(-1, keepdims=True) * (math.sqrt(x.shape[-1]) if rotated else 1.0)
    return np.broadcast_to(FP16_REL * big + 1e-6, x.shape)


def reference_attention(q, keys, values, kpos, qpos, scale, window=None):
    """Float64 softmax attention of queries at positions qpos over keys at
    positions kpos: the causal rule (and the window); GQA by head groups;
    rows that see no key give 0, as kvq_attention does."""
    B, Hq, L, D = q.shape
    H = keys.shape[1]
    q = q.astype(np.float64).reshape(B, H, Hq // H, L, D)
    s = np.einsum("bhrld,bhtd->bhrlt", q, keys.astype(np.float64)) * scale
    keep = kpos[None, :] <= qpos[:, None]
    if window is not None:
        keep &= kpos[None, :] > qpos[:, None] - window
    s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.where(keep, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    z = e.sum(-1, keepdims=True)
    out = np.einsum("bhrlt,bhtd->bhrld", e / np.where(z > 0, z, 1.0), values)
    return out.reshape(B, Hq, L, -1), keep


class CacheMachine(RuleBasedStateMachine):
    """One KVQCache (plain, max_kv_size or sliding window) and the float
    keys/values fed into it, with each token's accumulated error bound."""

    @initialize(data=st.data())
    def setup(self, data):
        kind = data.draw(st.sampled_from(["plain", "max_size", "window"]), label="kind")
        spec = data.draw(specs(window=kind == "window"), label="spec")
        D = data.draw(st.sampled_from([64, 128, 256]), label="head_dim")
        H = data.draw(st.integers(1, 2), label="kv_heads")
        self.rep = data.draw(st.sampled_from([1, 2, 4]), label="gqa")
        B = data.draw(st.integers(1, 2), label="batch")
        unit = spec.flush_unit
        room = spec.sinks + spec.residual + unit
        max_size = window = None
        if kind == "max_size":
            max_size = data.draw(st.integers(room, room + 300), label="max_kv_size")
        elif kind == "window":
            window = data.draw(st.integers(spec.residual + unit, spec.residual + unit + 300),
                               label="window")
        self.cache = KVQCache(spec, max_size=max_size, window=window)
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
        self.scale = data.draw(st.sampled_from([0.1, 1.0, 8.0]), label="magnitude")
        empty = np.zeros((B, H, 0, D), np.float32)
        self.ref_k, self.ref_v = empty, empty
        self.err_k, self.err_v = empty, empty  # accumulated quantization error bounds
        self.in_body = np.zeros(0, bool)
        self.tmp = Path(tempfile.mkdtemp(prefix="mlx_kvq_fuzz."))

    def teardown(self):
        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- operations -----------------------------------------------------------

    def _tokens(self, L):
        B, H, _, D = self.ref_k.shape
        x = self.rng.standard_normal((2, B, H, L, D)).astype(np.float32) * self.scale
        # a few outlier channels, as keys have
        x[0, ..., self.rng.integers(0, D, 2)] *= 6.0
        return x[0], x[1]

    def _append(self, L):
        k, v = self._tokens(L)
        self.cache.update_and_fetch(mx.array(k), mx.array(v))
        zero = np.zeros_like(k)
        self.ref_k = np.concatenate([self.ref_k, k], axis=2)
        self.ref_v = np.concatenate([self.ref_v, v], axis=2)
        self.err_k = np.concatenate([self.err_k, zero], axis=2)
        self.err_v = np.concatenate([self.err_v, zero], axis=2)
        self.in_body = np.concatenate([self.in_body, np.zeros(L, bool)])
        self._check(L, appended=True)

    @precondition(lambda self: self.ref_k.shape[2] < MAX_TOKENS)
    @rule(n=st.integers(2, 300))
    def prefill(self, n):
        self._append(n)

    @rule()
    def decode(self):
        self._append(1)

    @precondition(lambda self: self.ref_k.shape[2] > 0 and self.cache.is_trimmable())
    @rule(n=st.integers(1, 400))
    def trim(self, n):
        before = self.cache.size()
        got = self.cache.trim(n)
        assert got == min(n, before), f"trim({n}) of {before} tokens trimmed {got}"
        keep = self.ref_k.shape[2] - got
        for name in ("ref_k", "ref_v", "err_k", "err_v"):
            setattr(self, name, getattr(self, name)[:, :, :keep])
        self.in_body = self.in_body[:keep]
        self._check(1 if keep else 0)

    @rule(via=st.sampled_from(["persist", "mlx_lm", "state", "deepcopy"]))
    def save_and_load(self, via):
        c = self.cache
        path = self.tmp / "c.safetensors"
        if via == "persist":
            persist.save_prompt_cache(path, [c], metadata={"note": "fuzz"})
            loaded, meta = persist.load_prompt_cache(path, return_metadata=True, spec=c.spec)
            assert meta.get("note") == "fuzz", meta
            loaded = loaded[0]
        elif via == "mlx_lm":
            install()
            mlx_cache.save_prompt_cache(str(path), [c])
            loaded = mlx_cache.load_prompt_cache(str(path))[0]
        elif via == "state":
            loaded = KVQCache.from_state(c.state)
        else:
            loaded = copy.deepcopy(c)
        assert type(loaded) is KVQCache, type(loaded)
        for name in ("spec", "offset", "max_size", "window", "body_start", "n_body", "dims"):
            assert getattr(loaded, name) == getattr(c, name), (via, name)
        assert loaded.size() == c.size()
        if not c.empty():
            for a, b in zip(loaded.dequantized(), c.dequantized()):
                assert mx.array_equal(a, b).item(), f"{via}: loaded tokens differ"
        self.cache = loaded
        self._check(0)

    # -- the properties ---------------------------------------------------------

    def _check(self, L, appended=False):
        """Tokens held, their values, and (for the L newest queries) attention;
        `appended`: the L tokens came in the last update."""
        c, spec = self.cache, self.cache.spec
        T = self.ref_k.shape[2]
        assert c.offset == T, f"offset {c.offset}, fed {T}"
        pos, body = held_positions(c)
        assert len(pos) == c.size()
        assert np.all(np.diff(pos) > 0) and (not len(pos) or (pos[0] >= 0 and pos[-1] < T)), \
            f"held positions out of order or range: {pos[:8]}...{pos[-8:]}"
        n_sink = min(spec.sinks, T)
        assert list(pos[:n_sink]) == list(range(n_sink)), "sinks lost"
        if c._res_len():
            assert pos[-1] == T - 1, "the newest token is not held"
        unit = spec.flush_unit
        if c.max_size is None and c.window is None:
            assert len(pos) == T, f"holds {len(pos)} of {T} tokens"
        if c.max_size is not None and appended:
            # a step's own tokens stay for its queries; a decode step keeps the bound
            most = c.max_size if L == 1 else max(
                c.max_size, spec.sinks + spec.residual + 2 * unit - 2 + L)
            assert c.size() <= most, f"holds {c.size()} > {most} (max_kv_size {c.max_size})"
        if c.max_size is not None and L and appended:
            assert np.isin(np.arange(T - L, T), pos).all(), "a token of this step was evicted"
        if c.window is not None and L:
            need = np.arange(max(0, T - L - c.window + 1), T)
            assert np.isin(need, pos).all(), "a token inside a query's window was dropped"
            if appended:
                assert c.size() <= c.window + unit - 1 + L, f"window cache holds {c.size()}"
        self._bound_new_body(pos, body)
        if not c.size():
            return
        self._check_values(pos)
        if L:
            self._check_attention(pos, L)

    def _bound_new_body(self, pos, body):
        """Tokens that entered the body since the last look get their quantization error."""
        spec = self.cache.spec
        new = pos[body & ~self.in_body[pos]]
        self.in_body[:] = False
        self.in_body[pos[body]] = True
        if not len(new):
            return
        lk, lv = layouts(spec)
        for ref, err, lay, rot in ((self.ref_k, self.err_k, lk, spec.rotate_keys),
                                   (self.ref_v, self.err_v, lv, spec.rotate_values)):
            x, prev = ref[:, :, new], err[:, :, new]
            err[:, :, new] = prev + quantization_bound(x, prev, lay, rot)

    def _check_values(self, pos):
        spec = self.cache.spec
        dk, dv = (_np(a) for a in self.cache.dequantized())
        for name, got, ref, err, rot in (
                ("keys", dk, self.ref_k, self.err_k, spec.rotate_keys),
                ("values", dv, self.ref_v, self.err_v, spec.rotate_values)):
            want, bound = ref[:, :, pos], err[:, :, pos] + fp16_tolerance(ref[:, :, pos], rot)
            over = np.abs(got - want) - bound
            if over.max() > 0:
                b, h, t, d = np.unravel_index(over.argmax(), over.shape)
                raise AssertionError(
                    f"{name} of token {pos[t]} (b{b} h{h} ch{d}) off by "
                    f"{abs(got - want)[b, h, t, d]:.4g} > bound {bound[b, h, t, d]:.4g}")

    def _check_attention(self, pos, L):
        c = self.cache
        B, H, T, D = self.ref_k.shape
        q = self.rng.standard_normal((B, H * self.rep, L, D)).astype(np.float32)
        scale = D ** -0.5
        mask = c.make_mask(L, window_size=c.window)
        got = _np(kvq_attention(mx.array(q), c, scale=scale, mask=mask))
        qpos = np.arange(T - L, T)
        want, keep = reference_attention(q, self.ref_k[:, :, pos], self.ref_v[:, :, pos],
                                         pos, qpos, scale, c.window)
        # Softmax weights move by at most e^(2 eps) - 1 in l1 when every score
        # moves by at most eps = scale * |q| * |key error|; values by their bound.
        spec = c.spec
        ek = self.err_k[:, :, pos] + fp16_tolerance(self.ref_k[:, :, pos], spec.rotate_keys)
        ev = self.err_v[:, :, pos] + fp16_tolerance(self.ref_v[:, :, pos], spec.rotate_values)
        q_norm = np.sqrt((q.astype(np.float64) ** 2).sum(-1)).reshape(B, H, self.rep * L).max(-1)
        eps = scale * q_norm * np.sqrt((ek.astype(np.float64) ** 2).sum(-1)).max(-1)  # [B, H]
        v_max = np.abs(self.ref_v[:, :, pos]).max((-1, -2)) + ev.max((-1, -2))
        bound = ev.max((-1, -2)) + np.expm1(np.minimum(2 * eps, 50)) * v_max + 1e-4 * v_max
        bound = np.repeat(bound, self.rep, axis=1)[:, :, None, None]
        over = np.abs(got - want) - bound
        if not np.isfinite(got).all() or over.max() > 0:
            b, h, l, d = np.unravel_index(np.nan_to_num(over, nan=np.inf).argmax(), over.shape)
            raise AssertionError(
                f"attention of query {qpos[l]} (b{b} head {h}) off by "
                f"{abs(got - want)[b, h, l, d]:.4g} > bound {bound[b, h, 0, 0]:.4g}")


CacheMachine.TestCase.settings = settings(deadline=None)
