"""Property-based fuzzing (Hypothesis) of what the runtime takes in.

Targets, each a property Hypothesis drives with random inputs:
  cache    a KVQCache under random sequences of prefill chunks, single
           tokens, trims, save/load round trips (mlx_kvq.persist, mlx-lm's
           prompt-cache functions, state), max_kv_size eviction and sliding
           windows, against a float reference (the keys/values fed in): the
           tokens held, the offset, every held token within the spec's error
           bound, and attention over the quantized store within the bound
           that follows from it (same mask rules as the reference);
  spec     KVQuantSpec.from_string / parse_spec on arbitrary and near-valid
           strings: a spec that round-trips through its label, or a
           ValueError naming the field or the text at fault;
  loaders  prompt-cache files, calibrated-plan folders and GGUF files,
           truncated, bit-flipped or holding fields of the wrong shape, type
           or value: a clear error of the documented types, never a crash,
           never another exception, never content that differs unnoticed.

run() is the one entry point (tests/test_fuzz.py and reports call it): fixed
seed, `examples` examples per target, one dict per target with the minimal
failing example of each failure. A tool: the runtime never imports it.
"""

import copy
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, seed as hyp_seed, settings
from hypothesis import strategies as st
from hypothesis.reporting import with_reporter
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)
from mlx_lm.models import cache as mlx_cache

from . import persist, quant
from .attention import kvq_attention
from .cache import KVQCache, Layout
from .integration import install
from .spec import KEY_AXES, PRESETS, VALID_BITS, KVQuantSpec, parse_spec

# -- the cache against a float reference --------------------------------------

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
    return KVQuantSpec(k_bits, v_bits, axis, group, residual, sinks, draw(st.booleans()))


def _np(x):
    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x


def _hadamard(x):
    return _np(quant.hadamard(mx.array(x)))


def flush_unit(spec) -> int:
    return KVQCache(spec)._flush_unit()


def held_positions(cache):
    """Absolute positions of the tokens a cache holds (sinks, body, residual,
    as its segments say), and which of them sit in the quantized body."""
    c = cache
    n_sink, n_res = c._sink_len(), c._res_len()
    parts = [(0, n_sink, False), (c.body_start, c.n_body, True), (c.offset - n_res, n_res, False)]
    parts = [p for p in parts if p[1]]
    segs = [(s.start, s.length) for s in c.segments()]
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
        unit = flush_unit(spec)
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
        unit = flush_unit(spec)
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
        lk, lv = self.cache._layouts()
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


# -- spec labels -----------------------------------------------------------------

SPEC_FIELDS = ("k_bits", "v_bits", "key_axis", "group_size", "residual", "sinks", "rotate")


@st.composite
def near_labels(draw):
    """Valid labels and presets, mutated a little: a character dropped,
    added or changed, a number replaced, an option repeated or reordered."""
    label = draw(st.one_of(specs().map(str), st.sampled_from(sorted(PRESETS))))
    op = draw(st.sampled_from(["keep", "drop", "insert", "replace", "number", "repeat",
                               "swap", "case", "space"]))
    chars = st.sampled_from("kvgrs-0123456789tocabx _.,KV") | st.characters()
    if op == "drop" and label:
        i = draw(st.integers(0, len(label) - 1))
        label = label[:i] + label[i + 1:]
    elif op == "insert":
        i = draw(st.integers(0, len(label)))
        label = label[:i] + draw(chars) + label[i:]
    elif op == "replace" and label:
        i = draw(st.integers(0, len(label) - 1))
        label = label[:i] + draw(chars) + label[i + 1:]
    elif op == "number":
        num = str(draw(st.one_of(st.integers(0, 300), st.integers(-5, 10 ** 30))))
        parts = re.split(r"(\d+)", label)
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        if idx:
            parts[draw(st.sampled_from(idx))] = num
        label = "".join(parts)
    elif op in ("repeat", "swap"):
        parts = label.split("-")
        if len(parts) > 2:
            i = draw(st.integers(1, len(parts) - 1))
            if op == "repeat":
                parts.insert(i, draw(st.sampled_from(parts[1:])))
            else:
                j = draw(st.integers(1, len(parts) - 1))
                parts[i], parts[j] = parts[j], parts[i]
        label = "-".join(parts)
    elif op == "case":
        label = label.upper()
    elif op == "space":
        label = f" {label}\t"
    return label


@st.composite
def composed_labels(draw):
    """Labels put together from parts, right or wrong: bits, then options."""
    num = st.one_of(st.integers(0, 300), st.sampled_from([16, 32, 64, 128]),
                    st.integers(0, 10 ** 40)).map(str)
    bits = st.one_of(st.sampled_from(["2", "3", "4", "5", "6", "8", "16"]), num)
    option = st.one_of(st.tuples(st.sampled_from("grs"), num).map("".join),
                       st.sampled_from(["rot", "ktok", "g", "rot1", "x3", ""]))
    opts = draw(st.lists(option, max_size=5))
    return "-".join([f"k{draw(bits)}v{draw(bits)}"] + opts)


def check_label(text):
    """A valid spec that round-trips through its label, or a ValueError
    naming the offending field or text; never another exception."""
    try:
        spec = KVQuantSpec.from_string(text)
    except ValueError as e:
        msg = str(e)
        named = [f for f in SPEC_FIELDS if f in msg] or repr(text) in msg
        assert named, f"the error for {text!r} names no field nor the text: {msg}"
        return None
    assert parse_spec(text) == spec, f"parse_spec({text!r}) differs from from_string"
    keys = [re.match("[a-z]*", p).group() for p in text.strip().lower().split("-")[1:]]
    assert len(set(keys)) == len(keys), f"{text!r} gives an option twice, yet parses"
    again = KVQuantSpec.from_string(str(spec))
    assert again == spec, f"{text!r} -> {spec} -> {str(spec)!r} -> {again}"
    assert KVQuantSpec.from_dict(spec.to_dict()) == spec
    return spec


def _spec_target(examples, seed, counter):
    @given(st.one_of(st.text(), near_labels(), composed_labels()))
    def labels(text):
        counter[0] += 1
        check_label(text)

    hyp_seed(seed)(labels)
    _settings(examples)(labels)()


# -- loaders on damaged files ----------------------------------------------------------


@st.composite
def damage(draw, data: bytes, header: int):
    """(kind, bytes): truncated, or with one to three bits flipped (mostly in
    the first `header` bytes, where the layout and metadata are)."""
    b = bytearray(data)
    if draw(st.booleans()):
        return "truncated", bytes(b[:draw(st.integers(0, len(b) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        hi = min(header, len(b)) if draw(st.integers(0, 3)) else len(b)
        b[draw(st.integers(0, hi - 1))] ^= 1 << draw(st.integers(0, 7))
    return "flipped", bytes(b)


def _ours(exc) -> bool:
    """Whether an exception was raised in this package's code."""
    tb = exc.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    return f"{os.sep}mlx_kvq{os.sep}" in tb.tb_frame.f_code.co_filename


def _same_caches(a, b, only_ours=False) -> bool:
    """Same layers and contents (`only_ours`: of the KVQCache layers; mlx-lm's
    loader knows nothing of the file's digest over its own layers)."""
    if [type(x) for x in a] != [type(x) for x in b]:
        return False
    for x, y in zip(a, b):
        if isinstance(x, KVQCache):
            if (x.spec, x.offset, x.max_size, x.window, x.size()) != \
                    (y.spec, y.offset, y.max_size, y.window, y.size()):
                return False
            if x.size() and not all(mx.array_equal(p, q).item()
                                    for p, q in zip(x.dequantized(), y.dequantized())):
                return False
        elif not only_ours and not all(mx.array_equal(p, q).item()
                                       for p, q in zip(x.state, y.state)):
            return False
    return True


def _cache_file(folder: Path) -> tuple:
    """A prompt-cache file of a few layers of different specs, and its caches."""
    rng = np.random.default_rng(0)
    caches = []
    for label, n, kw in (("k4v2-g32-r32-s4", 150, {}), ("k8v4-ktok-r5-s0-rot", 90, {}),
                         ("k3v16-g64-r64-s2", 200, {"max_size": 170}),
                         ("k4v4-g32-r32-s0", 120, {"window": 80})):
        c = KVQCache(label, **kw)
        for L in (n - 1, 1):
            x = mx.array(rng.standard_normal((2, 1, 2, L, 64)).astype(np.float32))
            c.update_and_fetch(x[0], x[1])
        caches.append(c)
    plain = mlx_cache.KVCache()  # a full-precision mlx-lm layer beside them
    x = mx.array(rng.standard_normal((2, 1, 2, 40, 64)).astype(np.float32))
    plain.update_and_fetch(x[0], x[1])
    caches.append(plain)
    path = folder / "cache.safetensors"
    persist.save_prompt_cache(path, caches, metadata={"chat": "fuzz"})
    return path, caches


def _check_cache_file(path, original, kind):
    """Our loader: a ValueError/OSError naming the file, or what was saved.
    mlx-lm's: errors of our code are ValueErrors, and what loads was saved."""
    try:
        got, meta = persist.load_prompt_cache(path, return_metadata=True)
    except (ValueError, OSError) as e:
        assert str(path) in str(e), f"persist error names no file: {e}"
    else:
        assert _same_caches(got, original), f"{kind} file loaded other caches unnoticed"
        assert meta.get("chat") == "fuzz", f"{kind} file loaded other metadata {meta}"
    install()
    try:
        got = mlx_cache.load_prompt_cache(str(path))
    except Exception as e:
        assert not _ours(e) or isinstance(e, ValueError), \
            f"mlx-lm's loader: our code raised {type(e).__name__}: {e}"
    else:
        assert _same_caches(got, original, only_ours=True), \
            f"{kind} file loaded (mlx-lm) other caches"


WRONG = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-10 ** 6, 10 ** 12),
                  st.floats(allow_nan=True), st.text(max_size=4),
                  st.lists(st.integers(-2, 300), max_size=5), st.dictionaries(st.text(max_size=2),
                                                                              st.integers()))


@st.composite
def forged_states(draw, caches):
    """Cache states with one JSON field of a wrong type or value, or one array
    of a wrong shape or dtype, their digests recomputed: a writer with a bug."""
    from .cache import _state_digest

    caches = [c for c in caches if isinstance(c, KVQCache)]
    states = [list(c.state) for c in caches]
    i = draw(st.integers(0, len(states) - 1), label="layer")
    state = states[i]
    meta = json.loads(state[0])
    meta.pop("sha256")
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(meta) + ["spec.k_bits", "spec.group_size",
                                                     "spec.residual", "spec.sinks"]))
        value = draw(WRONG)
        if field.startswith("spec."):
            meta["spec"][field[5:]] = value
        else:
            meta[field] = value
        what = f"layer {i}: {field} = {value!r}"
    else:
        j = draw(st.integers(1, len(state) - 1))
        x = state[j]
        if isinstance(x, tuple):
            x = list(x)
            k = draw(st.integers(0, 2))
            x[k] = draw(_wrong_array(x[k]))
            what = f"layer {i}: state[{j}][{k}] -> {_shape(x[k])}"
        else:
            x = draw(_wrong_array(x))
            what = f"layer {i}: state[{j}] -> {_shape(x)}"
        state[j] = x
    state[0] = json.dumps(meta | {"sha256": _state_digest(meta, state[1:])})
    return _Forgery(states, what)


class _Forgery(list):
    """Forged states, shown by what was changed."""

    def __init__(self, states, what):
        super().__init__(states)
        self.what = what

    def __repr__(self):
        return self.what


def _shape(x):
    return None if x is None else f"{tuple(x.shape)} {x.dtype}"


@st.composite
def _wrong_array(draw, x):
    if x is None:
        return mx.zeros((1, 2, 3, 64), mx.float16)
    kind = draw(st.sampled_from(["shape", "dtype", "rank", "none"]))
    if kind == "none":
        return None
    if kind == "dtype":
        return x.astype(draw(st.sampled_from([mx.float32, mx.int32, mx.uint8, mx.bfloat16])))
    if kind == "rank":
        return x.reshape(-1)
    shape = list(x.shape)
    if not shape:
        return mx.zeros((3,), x.dtype)
    axis = draw(st.integers(0, len(shape) - 1))
    shape[axis] = max(0, shape[axis] + draw(st.sampled_from([-1, 1, 7])))
    return mx.zeros(shape, x.dtype)


class _Forged(KVQCache):
    """Saves a given state under the class name KVQCache."""

    def __init__(self, state, spec):
        self._forged, self.spec = state, spec

    @property
    def state(self):
        return self._forged


_Forged.__name__ = "KVQCache"


def _check_forged(path, states, original):
    """A forged file: a ValueError, or caches that hold what they say and run."""
    forged = [_Forged(s, c.spec) for s, c in zip(states, original)]
    persist.save_prompt_cache(path, forged, metadata={"chat": "fuzz"})
    for load in (persist.load_prompt_cache, lambda p: mlx_cache.load_prompt_cache(str(p))):
        try:
            got = load(path)
        except Exception as e:
            assert isinstance(e, ValueError) or not _ours(e), \
                f"forged file: our code raised {type(e).__name__}: {e}"
            continue
        for c in got:
            if c.size():
                c.dequantized()
            B, H, D, Dv = c.dims or (1, 2, 64, 64)
            c.update_and_fetch(mx.zeros((B, H, 1, D)), mx.zeros((B, H, 1, Dv)))
            kvq_attention(mx.zeros((B, H, 1, D)), c, scale=0.125)


def _tiny_gguf(folder: Path) -> Path:
    """A one-layer llama GGUF with a byte-level BPE vocabulary (MLX writes it)."""
    tokens = ["a", "b", "c", "ab", "<s>", "</s>"] + [chr(ord("d") + i) for i in range(10)]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {"general.architecture": "llama", "llama.embedding_length": u32(64),
            "llama.attention.head_count": u32(2), "llama.attention.head_count_kv": u32(1),
            "llama.feed_forward_length": u32(128), "llama.block_count": u32(1),
            "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
            "llama.context_length": u32(256), "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": u32(4), "tokenizer.ggml.eos_token_id": u32(5)}
    key = mx.random.key(0)
    shapes = {"token_embd": (len(tokens), 64), "output_norm": (64,), "blk.0.attn_q": (64, 64),
              "blk.0.attn_k": (32, 64), "blk.0.attn_v": (32, 64), "blk.0.attn_output": (64, 64),
              "blk.0.ffn_gate": (128, 64), "blk.0.ffn_up": (128, 64), "blk.0.ffn_down": (64, 128),
              "blk.0.attn_norm": (64,), "blk.0.ffn_norm": (64,)}
    weights = {f"{k}.weight": mx.random.normal(s, key=key) for k, s in shapes.items()}
    path = folder / "tiny.gguf"
    mx.save_gguf(str(path), weights, meta)
    return path


def _check_gguf(path, folder):
    from . import gguf

    try:
        gguf.convert(path, folder / "out", overwrite=True)
    except (gguf.GGUFError, OSError) as e:
        assert isinstance(e, OSError) or str(path) in str(e) or "GGUF" in str(e), \
            f"GGUF error names neither file nor format: {e}"


def _plan_folder(folder: Path) -> Path:
    """A calibrated-plan folder for a tiny random llama, as calibrate bakes it."""
    import importlib

    from mlx_lm.utils import save_config

    from .kvplan import STATS, KVPlan, LayerPlan, model_identity

    mod = importlib.import_module("mlx_lm.models.llama")
    cfg = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               vocab_size=64, head_dim=32, tie_word_embeddings=True)
    mx.random.seed(0)
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    rng = np.random.default_rng(0)
    stats = {i: {f"{kv}_{name}": np.abs(rng.standard_normal((2, 32))).astype(np.float32) + 0.1
                 for kv in "kv" for name in STATS} for i in range(2)}
    plan = KVPlan(KVQuantSpec.from_string("k4v4-g32-r32-s4"),
                  {0: LayerPlan(4, 2, "smooth"), 1: LayerPlan(8, 4, "rotate")}, stats,
                  model_identity(model), alpha=0.5)
    save_config(cfg, folder / "config.json")
    plan.save(folder)
    return model


def _same_plan(a, b) -> bool:
    return (a.base, a.layers, a.alpha, a.model) == (b.base, b.layers, b.alpha, b.model) and all(
        np.array_equal(a.stats[i][n], b.stats[i][n]) for i in a.stats for n in a.stats[i])


def _check_plan(folder, model, original, kind):
    from .kvplan import KVPlanError, load_plan

    try:
        got = load_plan(folder, model)
    except KVPlanError as e:
        assert str(folder) in str(e) or "plan" in str(e).lower(), f"plan error: {e}"
    else:
        assert _same_plan(got, original), f"{kind} plan files loaded another plan unnoticed"


@st.composite
def forged_plan(draw, files):
    """Plan files with one JSON field of a wrong type or value, or one tensor
    of a wrong shape or dtype, sha256s recomputed: a writer with a bug."""
    from .files import sha256_file
    from .kvplan import PLAN_FILE, SCALES_FILE, sealed

    d = json.loads(files[PLAN_FILE])
    d.pop("json_sha256", None)
    out = dict(files)
    if draw(st.booleans()):
        where = draw(st.sampled_from(["top", "scheme", "layer", "model"]))
        node = {"top": d, "scheme": d["scheme"], "model": d["model"],
                "layer": d["layers"][draw(st.integers(0, len(d["layers"]) - 1))]}[where]
        key = draw(st.sampled_from(sorted(node)))
        node[key] = draw(WRONG)
        what = f"{PLAN_FILE}: {where}.{key} = {node[key]!r}"
    else:
        with tempfile.TemporaryDirectory() as t:
            src, dst = Path(t) / "a.safetensors", Path(t) / "b.safetensors"
            src.write_bytes(files[SCALES_FILE])
            arrays, meta = mx.load(str(src), return_metadata=True)
            name = draw(st.sampled_from(sorted(arrays)))
            arrays[name] = draw(_wrong_array(arrays[name]))
            if arrays[name] is None:
                del arrays[name]
            mx.save_safetensors(str(dst), arrays, metadata=meta)
            out[SCALES_FILE] = dst.read_bytes()
            d["scales"]["sha256"] = sha256_file(dst)
        what = f"{SCALES_FILE}: {name} -> {_shape(arrays.get(name))}"
    out[PLAN_FILE] = (json.dumps(sealed(d), indent=1) + "\n").encode()
    return _Forgery([out], what)


def _check_forged_plan(folder, model, files):
    """A KVPlanError, or a plan whose layers' caches can be made and filled."""
    from .kvplan import KVPlanError, load_plan

    for name, b in files.items():
        (folder / name).write_bytes(b)
    try:
        plan = load_plan(folder, model)
    except KVPlanError:
        return
    for i in plan.layers:
        c = KVQCache(plan.spec(i), calibration=plan.calibration(i))
        c.update_and_fetch(mx.zeros((1, 2, 1, 32)), mx.zeros((1, 2, 1, 32)))


def _loaders_target(examples, seed, counter):
    from .kvplan import PLAN_FILE, SCALES_FILE, load_plan

    tmp = Path(tempfile.mkdtemp(prefix="mlx_kvq_fuzz."))
    try:
        cache_path, caches = _cache_file(tmp)
        cache_bytes = cache_path.read_bytes()
        gguf_path = _tiny_gguf(tmp)
        gguf_bytes = gguf_path.read_bytes()
        plan_dir = tmp / "plan"
        plan_dir.mkdir()
        model = _plan_folder(plan_dir)
        plan = load_plan(plan_dir, model)
        plan_files = {n: (plan_dir / n).read_bytes() for n in (PLAN_FILE, SCALES_FILE)}
        header = int.from_bytes(cache_bytes[:8], "little") + 8  # safetensors' JSON header

        @given(st.data())
        def loaders(data):
            counter[0] += 1
            which = data.draw(st.sampled_from(["cache", "gguf", "plan"]), label="file")
            if which == "cache" and data.draw(st.booleans(), label="forged"):
                states = data.draw(forged_states(caches), label="forged")
                _check_forged(tmp / "forged.safetensors", states, caches)
            elif which == "cache":
                kind, b = data.draw(damage(cache_bytes, header), label="damage")
                path = tmp / "damaged.safetensors"
                path.write_bytes(b)
                _check_cache_file(path, caches, kind)
            elif which == "gguf":
                kind, b = data.draw(damage(gguf_bytes, 2048), label="damage")
                path = tmp / "damaged.gguf"
                path.write_bytes(b)
                _check_gguf(path, tmp)
            elif data.draw(st.booleans(), label="forged"):
                forged = data.draw(forged_plan(plan_files), label="forged")
                try:
                    _check_forged_plan(plan_dir, model, forged[0])
                finally:
                    for name, b in plan_files.items():
                        (plan_dir / name).write_bytes(b)
            else:
                name = data.draw(st.sampled_from(sorted(plan_files)), label="plan file")
                kind, b = data.draw(damage(plan_files[name], 4096), label="damage")
                (plan_dir / name).write_bytes(b)
                try:
                    _check_plan(plan_dir, model, plan, kind)
                finally:
                    (plan_dir / name).write_bytes(plan_files[name])

        hyp_seed(seed)(loaders)
        _settings(examples)(loaders)()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- running ---------------------------------------------------------------------


def _settings(examples, **extra):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                    print_blob=False, **extra)


def _describe(exc, lines) -> str:
    """The failure and its minimal example, in a few lines."""
    notes = [n for n in getattr(exc, "__notes__", []) if not n.startswith("You can")]
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb else ""
    text = f"{type(exc).__name__}: {exc}".strip()[:1000] + where
    example = "\n".join(line[:300] for line in (notes or lines))
    return f"{text}\n{example}".strip()[:3000]


def _cache_target(examples, seed, counter):
    machine = type("CacheFuzz", (CacheMachine,), {})
    init = machine.setup

    def counted(self, data):
        counter[0] += 1
        return init(self, data)

    machine.setup = initialize(data=st.data())(counted)
    hyp_seed(seed)(machine)
    run_state_machine_as_test(machine, settings=_settings(examples, stateful_step_count=12))


TARGETS = {"cache": _cache_target, "spec": _spec_target, "loaders": _loaders_target}


def run(examples: int = 200, seed: int = 0, targets=None) -> list:
    """Run fuzz targets (all of TARGETS by default), `examples` each, from a
    fixed seed. One dict per target: {"target", "examples" (property runs;
    after a failure they include Hypothesis' shrinking runs), "failures"
    (each failure with its minimal example)}."""
    out = []
    for name in targets or list(TARGETS):
        if name not in TARGETS:
            raise ValueError(f"unknown fuzz target {name!r}; use one of {sorted(TARGETS)}")
        counter, failures, lines = [0], [], []
        try:
            with with_reporter(lines.append):
                TARGETS[name](examples, seed, counter)
        except Exception as e:  # a property failed: Hypothesis shrank it
            failures.append(_describe(e, lines))
        out.append({"target": name, "examples": counter[0], "failures": failures})
    return out
