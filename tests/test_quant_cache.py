import mlx.core as mx
import numpy as np
import pytest

from mlx_kvq import KVQCache, KVQuantSpec
from mlx_kvq import quant
from mlx_kvq.attention import kvq_attention
from mlx_kvq.cache import Calibration, Layout
from mlx_kvq.harness.fuzz_cache import quantization_bound


def cached_kv(cache, stored=False):
    """Keys and values as the cache's last update read them (or as stored),
    dequantized, [B, H, T, D]."""
    ks, vs = [], []
    for seg in cache.segments(stored):
        t = seg.view(0, seg.length)
        ks.append(seg.k_layout.decode(t.keys))
        vs.append(seg.v_layout.decode(t.values))
    k, v = mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)
    if cache.k_order is not None:  # stored in this channel order: back to the model's
        inverse = mx.argsort(cache.k_order, axis=-1)
        k = mx.take_along_axis(k, inverse[None, :, None, :], axis=-1)
    if cache.spec.rotate_keys:
        k = quant.hadamard(k)
    if cache.spec.rotate_values:
        v = quant.hadamard(v)
    return k, v


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_error_bound(bits, group):
    x = mx.random.normal((4, 3, 1, 256)) * mx.array([1.0, 10.0, 0.1])[None, :, None, None]
    q = quant.quantize(x, bits, group)
    err = np.array(mx.abs(quant.dequantize(q, bits, group) - x))
    # mx.quantize keeps zero exactly representable, so the worst case is one
    # step (not half) of the group's range; fp16 scales add a little. The
    # bound the fuzzer holds every cached token to.
    x = np.array(x)
    bound = quantization_bound(x, np.zeros_like(x), Layout(bits, group, False), rotated=False)
    assert (err <= bound).all(), float(err.max())


# Errors on unit normal data: max within one step of a group's range (~9
# sigma); a token written to the wrong place would miss the mean by far.
MAX_ERR = {None: 2e-3, 2: 3.0, 3: 1.3, 4: 0.6, 8: 0.04}
MEAN_ERR = {None: 1e-3, 2: 0.45, 3: 0.2, 4: 0.1, 8: 6e-3}


def feed(cache, k, v, sizes):
    i = 0
    for n in sizes:
        cache.update_and_fetch(k[:, :, i:i + n], v[:, :, i:i + n])
        i += n
    return i


@pytest.mark.parametrize("label", ["k4v4", "k2v8-g64-r64-s2", "k8v4-ktok-r5-s0",
                                   "k3v3-g32-r0-s4", "k16v2", "k4v16-g128-r128-s1",
                                   "k4v4-rot", "k16v16", "k3v3-o8-vg64", "k2v4-o16-g64-vg64-rot"])
def test_append_across_groups(label):
    spec = KVQuantSpec.from_string(label)
    k = mx.random.normal((2, 3, 700, 128))
    v = mx.random.normal((2, 3, 700, 128))
    cache = KVQCache(spec)
    n = feed(cache, k, v, [1, 3, 60, 200, 1, 1, 135, 299])
    assert cache.offset == cache.size() == n
    segs = cache.segments()
    assert [s.start for s in segs] == list(np.cumsum([0] + [s.length for s in segs[:-1]]))
    res = segs[-1]
    if spec.quantized:
        unit = spec.group_size if spec.k_bits and spec.key_axis == "channel" else 1
        assert spec.residual <= cache._res_len() < spec.residual + unit
        # the last update's queries read its 299 tokens and the residual before them at 16 bits
        assert res.length >= 299 + spec.residual
    kk, vv = cached_kv(cache)
    for got, want, bits in ((kk, k, spec.k_bits), (vv, v, spec.v_bits)):
        err = mx.abs(got - want[:, :, :n])
        assert float(err.max()) < MAX_ERR[bits]
        assert float(err.mean()) < MEAN_ERR[bits]
    # sinks and residual are kept at 16 bits
    r = res.length
    assert float(mx.abs(kk[:, :, -r:] - k[:, :, n - r:n]).max()) < 2e-3


def reference_attention(q, cache, scale, L):
    k, v = cached_kv(cache)
    H = k.shape[1]
    rep = q.shape[1] // H
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    T = k.shape[2]
    qpos = mx.arange(T - L, T)[:, None]
    mask = qpos >= mx.arange(T)[None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@pytest.mark.parametrize("label", ["k4v4", "k2v2-g64-r64-s0", "k8v4-ktok-r3",
                                   "k4v4-rot", "k4v2-ktok-r0-rot", "k3v16", "k16v16",
                                   "k3v3-o8-vg64-rot", "k2v16-o16-g64"])
@pytest.mark.parametrize("L", [1, 37])
def test_attention_equals_dequantized_reference(label, L, monkeypatch):
    import mlx_kvq.attention as att

    monkeypatch.setattr(att, "SCORE_BUDGET_BYTES", 4096 * 8)  # force query chunking
    spec = KVQuantSpec.from_string(label)
    B, H, rep, D = 2, 2, 3, 64
    cache = KVQCache(spec)
    k = mx.random.normal((B, H, 400, D))
    v = mx.random.normal((B, H, 400, D))
    feed(cache, k, v, [200, 150 - L, L])
    monkeypatch.setattr(att, "TILE_TOKENS", 64)  # several key tiles per segment
    q = mx.random.normal((B, H * rep, L, D))
    out = kvq_attention(q, cache, scale=D**-0.5, mask="causal" if L > 1 else None)
    ref = reference_attention(q, cache, D**-0.5, L)
    assert float(mx.abs(out - ref).max()) < 1e-4


def test_attention_sinks_logit_matches_extra_key():
    spec = KVQuantSpec.from_string("k4v4")
    B, H, rep, D = 1, 2, 2, 64
    cache = KVQCache(spec)
    k, v = mx.random.normal((B, H, 100, D)), mx.random.normal((B, H, 100, D))
    feed(cache, k, v, [100])
    q = mx.random.normal((B, H * rep, 1, D))
    sinks = mx.array([0.5, -1.0, 2.0, 0.0])
    out = kvq_attention(q, cache, scale=0.125, mask=None, sinks=sinks)
    kk, vv = cached_kv(cache)
    kk, vv = mx.repeat(kk, rep, 1), mx.repeat(vv, rep, 1)
    ref = mx.fast.scaled_dot_product_attention(q, kk, vv, scale=0.125, sinks=sinks)
    assert float(mx.abs(out - ref).max()) < 1e-4


@pytest.mark.parametrize("label", ["k4v4", "k2v4-ktok-r3-s2", "k16v16", "k3v3-o8-vg64"])
def test_trim_and_state_round_trip(label):
    spec = KVQuantSpec.from_string(label)
    k, v = mx.random.normal((1, 2, 300, 64)), mx.random.normal((1, 2, 300, 64))
    cache = KVQCache(spec)
    feed(cache, k, v, [250, 50])
    full = cached_kv(cache, stored=True)
    # Trimming keeps what the cache held for the remaining tokens; body
    # groups brought back into the residual keep their dequantized values.
    for n, left in ((50, 250), (200, 50), (45, 5)):
        assert cache.trim(n) == n and cache.offset == cache.size() == left
        for a, b in zip(cached_kv(cache), full):
            assert float(mx.abs(a - b[:, :, :left]).max()) < 5e-3
    cache.update_and_fetch(k[:, :, 5:100], v[:, :, 5:100])
    assert cache.offset == 100
    err = float(mx.abs(cached_kv(cache)[0] - k[:, :, :100]).max())
    assert err < MAX_ERR[spec.k_bits]
    restored = KVQCache.from_state(cache.state)
    for a, b in zip(cached_kv(cache, stored=True), cached_kv(restored)):
        assert mx.array_equal(a, b)
    assert restored.offset == cache.offset and restored.spec == cache.spec


def test_max_size_keeps_sinks_and_recent_tokens():
    spec = KVQuantSpec.from_string("k4v4-g32-r32-s4")
    cache = KVQCache(spec, max_size=200)
    k, v = mx.random.normal((1, 1, 1000, 64)), mx.random.normal((1, 1, 1000, 64))
    for i in range(0, 1000, 25):
        cache.update_and_fetch(k[:, :, i:i + 24], v[:, :, i:i + 24])
        # the chunk's tokens stay for its queries; older ones go
        assert cache.size() <= 200 + 23 and cache.offset - cache.body_start >= 24
        cache.update_and_fetch(k[:, :, i + 24:i + 25], v[:, :, i + 24:i + 25])
        assert cache.size() <= 200
    segs = cache.segments()
    assert segs[0].start == 0 and segs[0].length == 4
    assert segs[-1].start + segs[-1].length == 1000
    kk, _ = cached_kv(cache)
    assert float(mx.abs(kk[:, :, :4] - k[:, :, :4]).max()) < 2e-3


def test_nbytes_counts_everything():
    spec = KVQuantSpec.from_string("k4v2-g32-r64-s4")
    cache = KVQCache(spec)
    k = mx.random.normal((1, 4, 1024, 64))
    feed(cache, k, k, [1024])
    n_res = cache.segments(stored=True)[-1].length
    assert 64 <= n_res < 96 and cache.n_body == 1024 - 4 - n_res
    cap = 1024  # bodies grow in steps of 256 tokens
    expect = (4 + n_res) * 4 * 64 * 2 * 2  # fp16 sinks + residual, K and V
    expect += cap * 4 * 64 * (4 + 2) // 8  # codes
    expect += 2 * 2 * cap * 4 * 64 // 32 * 2  # fp16 scales + biases, K and V
    assert cache.nbytes == expect


def test_mismatched_shapes_refused():
    cache = KVQCache("k4v4")
    cache.update_and_fetch(mx.zeros((1, 2, 4, 64)), mx.zeros((1, 2, 4, 64)))
    with pytest.raises(ValueError, match="another model"):
        cache.update_and_fetch(mx.zeros((1, 3, 4, 64)), mx.zeros((1, 3, 4, 64)))
    with pytest.raises(ValueError, match="group_size=128 does not divide head_dim=96"):
        KVQCache("k4v4-g128-r128").update_and_fetch(mx.zeros((1, 1, 2, 96)),
                                                    mx.zeros((1, 1, 2, 96)))


def test_memory_held_is_what_nbytes_reports():
    """Sinks and residual must not keep views of the big chunks they came from."""
    mx.eval(mx.zeros(1))
    before = mx.get_active_memory()
    cache = KVQCache("k4v4")
    k = mx.random.normal((1, 8, 4096, 128))
    cache.update_and_fetch(k, k)
    cache.update_and_fetch(k[:, :, :3], k[:, :, :3])
    mx.eval(cache.state[1:])
    del k
    held = mx.get_active_memory() - before
    assert held <= 1.1 * cache.nbytes, (held, cache.nbytes)


# Found by fuzzing (mlx_kvq.harness.fuzz) -----------------------------------------------


def test_dequantized_of_a_cache_trimmed_to_nothing():
    cache = KVQCache("k2v2-g32-r0-s0")
    cache.update_and_fetch(mx.zeros((1, 1, 1, 64)), mx.zeros((1, 1, 1, 64)))
    cache.trim(1)
    k, v = cache.dequantized()
    assert k.shape == (1, 1, 0, 64) and v.shape == (1, 1, 0, 64)


def test_a_chunk_longer_than_max_kv_size_keeps_its_context():
    """The chunk's tokens stay for its own queries (as in mlx-lm's rotating
    cache); evicting them gave the first queries no keys at all."""
    k, v = mx.random.normal((1, 1, 193, 64)), mx.random.normal((1, 1, 193, 64))
    q = mx.random.normal((1, 1, 193, 64))
    outs = []
    for max_size in (192, None):
        cache = KVQCache("k2v2-g64-r128-s0", max_size=max_size)
        cache.update_and_fetch(k, v)
        outs.append(kvq_attention(q, cache, scale=0.125, mask=cache.make_mask(193)))
    assert mx.allclose(outs[0], outs[1], atol=1e-5).item()
    cache.update_and_fetch(k[:, :, :1], v[:, :, :1])  # the next step evicts
    bounded = KVQCache("k2v2-g64-r128-s0", max_size=192)
    bounded.update_and_fetch(k, v)
    bounded.update_and_fetch(k[:, :, :1], v[:, :, :1])
    assert bounded.size() <= 192 < cache.size()


def _saved(tmp_path):
    from mlx_kvq import persist

    cache = KVQCache("k4v2-g32-r32-s4")
    cache.update_and_fetch(mx.random.normal((1, 2, 150, 64)), mx.random.normal((1, 2, 150, 64)))
    path = tmp_path / "c.safetensors"
    persist.save_prompt_cache(path, [cache], metadata={"chat": "abc"})
    return path, cache


def test_a_flipped_bit_in_a_cache_file_is_caught(tmp_path):
    """A flip in a tensor or in the metadata loaded other tokens (or other
    metadata) unnoticed; the file now carries a sha256 of all of it."""
    from mlx_kvq import persist

    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    for at in (len(data) - 100, data.index(b"abc")):
        b = bytearray(data)
        b[at] ^= 4
        path.write_bytes(bytes(b))
        with pytest.raises(ValueError, match=f"{path}.*(sha256 differs|damaged)"):
            persist.load_prompt_cache(path)


def test_the_state_is_cheap_to_read():
    """mlx-lm evaluates `state` after every prefill step: reading it must not
    evaluate or copy the cache (it is only a list of what the cache holds)."""
    cache = KVQCache("k4v2-g32-r32-s4")
    k = mx.random.normal((1, 2, 150, 64))
    cache.update_and_fetch(k, k)
    state = cache.state
    assert state[0] == cache.meta_state  # nothing computed from the arrays
    assert state[1] is cache.sink_k and state[3] is cache.res_k


@pytest.mark.parametrize("entry, make", [
    (3, lambda x: x[:, :, 1:]),                 # a residual a token short
    (1, lambda x: x.astype(mx.float32)),        # sinks of another dtype
    (5, lambda x: (x[0], x[1][..., :1], x[2])),  # body scales of the wrong shape
])
def test_a_state_of_wrong_shapes_is_refused(entry, make):
    """A state whose arrays do not fit its counts (a writer with a bug)
    loaded and failed later, or read garbage."""
    cache = KVQCache("k4v2-g32-r32-s4")
    cache.update_and_fetch(mx.random.normal((1, 2, 150, 64)), mx.random.normal((1, 2, 150, 64)))
    state = list(cache.state)
    state[entry] = make(state[entry])
    with pytest.raises(ValueError, match="corrupt KVQCache state: .* is "):
        KVQCache.from_state(state)


@pytest.mark.parametrize("label", ["k4v4", "k8v4-ktok-r5-s0", "k3v3-g64-r0-s4", "k16v16",
                                   "k4v16-g128-r128-s1"])
def test_token_split_is_what_a_cache_holds(label):
    """spec.token_split, which sizing relies on, gives the sinks, body and
    residual a cache holds after any chunking of the same tokens, and
    bytes_for gives its nbytes."""
    spec = KVQuantSpec.from_string(label)
    rng = np.random.default_rng(0)
    k, v = mx.random.normal((1, 2, 900, 64)), mx.random.normal((1, 2, 900, 64))
    for sizes in ([900], [1] * 40 + [300, 7, 553], [int(x) for x in rng.integers(1, 60, 15)]):
        cache = KVQCache(spec)
        n = feed(cache, k, v, sizes)
        held = (cache._sink_len(), cache.n_body, cache._res_len())
        assert held == spec.token_split(n), (sizes, held)
        assert cache.nbytes == KVQCache.bytes_for(spec, n, 2, 64)


def test_outlier_channels_are_the_widest_and_one_bit_finer():
    """k_outliers: the channels of widest range over the first tokens are
    stored first at one more bit; their error halves, and a cache given the
    order (a calibration's) stores keys in it."""
    mx.random.seed(3)
    k = mx.random.normal((1, 2, 256, 64))
    wide = [5, 17, 40, 63]
    k[..., wide] = k[..., wide] * 30
    v = mx.random.normal((1, 2, 256, 64))
    errs = {}
    for label in ("k3v3-r0", "k3v3-o4-r0"):
        cache = KVQCache(label)
        cache.update_and_fetch(k, v)
        errs[label] = mx.abs(cache.dequantized()[0] - k)[..., wide].max()
    order = KVQCache("k3v3-o4").k_order
    assert order is None  # chosen from the first tokens
    cache = KVQCache("k3v3-o4-r0")
    cache.update_and_fetch(k, v)
    assert sorted(np.array(cache.k_order)[:, :4].tolist()[0]) == wide
    assert float(errs["k3v3-o4-r0"]) < 0.6 * float(errs["k3v3-r0"])
    given = mx.array(np.tile(np.arange(64)[::-1], (2, 1)).astype(np.int32))
    cal = KVQCache("k3v3-o4-r0", calibration=Calibration(k_order=given))
    cal.update_and_fetch(k, v)
    assert mx.array_equal(cal.k_order, given)
    body = cal.segments(stored=True)[1]
    hi = cal.spec.k_bits + 1
    assert body.keys[0].shape[-2] == 4 and body.keys[0].shape[-1] == 256 * hi // 32
    assert float(mx.abs(cal.dequantized()[0] - k).max()) < float(errs["k3v3-r0"]) * 1.01


def test_outlier_and_value_group_options_count_their_bytes():
    cache = KVQCache("k3v3-o16-vg64-r0-s0")
    cache.update_and_fetch(mx.zeros((1, 1, 256, 64)), mx.zeros((1, 1, 256, 64)))
    keys = 256 * (16 * 4 + 48 * 3) // 8 + 64 * (256 // 32) * 4  # codes, fp16 scale+bias
    values = 256 * 64 * 3 // 8 + 256 * (64 // 64) * 4
    assert cache.nbytes == keys + values


@pytest.mark.parametrize("label", ["k4v4", "k3v3-o8-vg64-rot", "k2v4-ktok-r3-s2"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_chunk_reads_what_it_flushes_at_16_bits(label, batched):
    """The queries of an update read the tokens it flushed from their 16-bit
    copy: a first chunk's attention equals exact attention, though the cache
    stores most of it quantized; the next update reads them quantized."""
    from mlx_kvq.batch_cache import KVQBatchCache

    mx.random.seed(5)
    B, T = (2, 300) if batched else (1, 300)
    k, v = mx.random.normal((B, 2, T + 1, 64)), mx.random.normal((B, 2, T + 1, 64))
    q = mx.random.normal((B, 4, T + 1, 64))
    cache = KVQBatchCache(label, batch_size=B) if batched else KVQCache(label)

    def attend(a, b):
        mask = cache.make_mask(b - a)
        cache.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
        got = kvq_attention(q[:, :, a:b], cache, scale=0.125, mask=mask)
        kk, vv = (mx.repeat(x[:, :, :b], 2, 1) for x in (k, v))
        exact = mx.fast.scaled_dot_product_attention(
            q[:, :, a:b], kk, vv, scale=0.125, mask="causal" if b - a > 1 else None)
        return float(mx.abs(got - exact).max())

    assert attend(0, T) < 5e-3
    assert max(cache.n_body) if batched else cache.n_body  # stored quantized
    assert attend(T, T + 1) > 2e-2  # the next step reads the body's codes
