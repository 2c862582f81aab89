"""Layer sensitivity for calibration: the Fisher estimate (one gradient
pass) ranks layers and options as the measured KLD does; the cache reads
back exactly what attention sees."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, make_prompt_cache

import mlx_kvq  # noqa: F401
from mlx_kvq import KVQCache
from mlx_kvq.commands import corpus
from mlx_kvq.cache import Calibration
from mlx_kvq.converters import calibrate as C
from mlx_kvq.converters import sensitivity as S
from mlx_kvq.spec import KVQuantSpec, parse_spec, window_spec

from conftest import tiny_model


@pytest.mark.parametrize("spec, smooth", [
    ("k4v4-g32-r64-s4", False), ("k2v3-g32-r32-s0-rot", False), ("k3v2-g32-r64-s4", True),
    ("k4v4-g32-r0-s4-ktok-rot", False), ("k16v2", False),
])
def test_dequantized_is_what_attention_reads(spec, smooth):
    """Attention over the quantized cache equals attention over a plain cache
    holding `dequantized()`, for every segment layout and value preparation."""
    H, D, T = 2, 64, 300
    keys = mx.random.normal((1, H, T, D), key=mx.random.key(0))
    values = mx.random.normal((1, H, T, D), key=mx.random.key(1))
    calib = None
    if smooth:
        calib = Calibration(v_smooth=mx.random.uniform(0.5, 2.0, (H, D), key=mx.random.key(2)))
    cache = KVQCache(spec, calibration=calib)
    for a in range(0, T, 128):
        cache.update_and_fetch(keys[..., a:a + 128, :], values[..., a:a + 128, :])
    kq, vq = cache.dequantized()
    assert kq.shape == vq.shape == (1, H, T, D)
    q = mx.random.normal((1, 4, 1, D), key=mx.random.key(3))
    got = scaled_dot_product_attention(q, *cache.update_and_fetch(
        keys[..., -1:, :] * 0, values[..., -1:, :] * 0), cache=cache, scale=D ** -0.5, mask=None)
    ref_cache = KVCache()
    ref_cache.update_and_fetch(kq, vq)
    ref_k, ref_v = ref_cache.update_and_fetch(keys[..., -1:, :] * 0, values[..., -1:, :] * 0)
    want = mx.fast.scaled_dot_product_attention(q, ref_k, ref_v, scale=D ** -0.5)
    assert mx.allclose(got, want, atol=2e-3).item()
    # and it is not the exact keys: the quantized ones differ
    if cache.spec.k_bits is not None:
        assert mx.abs(kq - keys).max().item() > 1e-3


@pytest.mark.parametrize("spec, chunk, window", [
    ("k4v4-g32-r64-s4", 1, None), ("k4v4-g32-r64-s4", 16, None), ("k3v3-g32-r0-s0", 32, None),
    ("k4v4-g32-r32-s4-ktok", 1, None), ("k4v4-g32-r32-s4-ktok", 8, None),
    ("k4v4-g32-r32-s0", 1, 96), ("k4v4-g32-r32-s0", 16, 96),
])
def test_quantized_reads_are_what_the_cache_reads(spec, chunk, window):
    """quantized_reads gives, for every query, the tokens a cache of the spec
    fed in those chunks reads from its quantized body (decoding, prefill
    chunks, per-token keys, a sliding window)."""
    H, D, T = 1, 64, 300
    spec = parse_spec(spec)
    if window is not None:
        spec = window_spec(spec, window)
    want = S.quantized_reads(spec, T, chunk, window)
    cache = KVQCache(spec, window=window)
    x = mx.random.normal((1, H, T, D), key=mx.random.key(0))
    got = np.zeros((T, T), bool)
    for a in range(0, T, chunk):
        cache.update_and_fetch(x[..., a:a + chunk, :], x[..., a:a + chunk, :])
        for seg in cache.segments():
            if seg.keys is cache.body_k:
                got[a:a + chunk, seg.start:seg.start + seg.length] = True
    if window is not None:  # what the window's mask hides is not read
        got &= np.arange(T)[None, :] > np.arange(T)[:, None] - window
    assert got.any() and not got.all()
    assert (got == want).all(), np.argwhere(got != want)[:5]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gpt_oss", "phi"])
def test_split_gradients_add_up_to_every_querys(arch):
    """The probe counts only the queries a mask names: the gradients through
    the reads one mask names and through the rest of the causal reads add up
    to the gradients through all of them (the loss is the same: the
    perturbations are zero), and neither part is the whole."""
    model = tiny_model(arch)
    T = 96
    tokens = mx.array(np.random.default_rng(0).integers(0, 512, T))
    kv = {}
    caches = make_prompt_cache(model)
    model(tokens[None], cache=caches)
    for i, c in enumerate(caches):
        k, v = c.state[:2]
        kv[i] = (k[..., :T, :].astype(mx.float32), v[..., :T, :].astype(mx.float32))
    far = S.quantized_reads(parse_spec("k4v4-g32-r32-s2"), T - 1, 1)

    def part(mine):
        def reads(n, window):
            return far if mine else ~far
        return S.gradients(model, tokens, kv, reads)

    whole, a, b = S.gradients(model, tokens, kv), part(True), part(False)
    for i in kv:
        for w, x, y in zip(whole[i], a[i], b[i]):
            scale = mx.abs(w).max().item()
            assert scale > 0
            assert mx.abs(x + y - w).max().item() < 1e-4 * scale
            assert mx.abs(x - w).max().item() > 1e-2 * scale


def test_split_gradients_refuse_a_model_that_makes_its_own_mask(monkeypatch):
    """A model whose attention never asks its cache for a mask would read
    both copies of every token: the split gradients are refused, by name."""
    import mlx_lm.models.llama as llama

    model = tiny_model("llama")
    tokens = mx.array(np.arange(40) % 512)
    kv = {i: (mx.zeros((1, 2, 40, 64)), mx.zeros((1, 2, 40, 64))) for i in range(2)}
    S.gradients(model, tokens, kv, lambda n, w: np.zeros((n, n), bool))
    monkeypatch.setattr(llama, "create_attention_mask", lambda h, cache=None, **kw: "causal")
    with pytest.raises(ValueError, match="sensitivity measured"):
        S.gradients(model, tokens, kv, lambda n, w: np.zeros((n, n), bool))


def _sensitivities(model, tokens, options, chunk=64):
    """(estimate, estimate counting every query's reads, measured KLD) of
    each (layer, spec) option, on tokens fed in `chunk`-token updates."""
    runner = C.Runner(model, chunk)
    kv = {}

    def record(i, k, v):
        kv.setdefault(i, []).append((k.astype(mx.float32), v.astype(mx.float32)))

    ref = runner.reference(tokens, record_kv=record)
    kv = {i: tuple(mx.concatenate(x, axis=2) for x in zip(*p)) for i, p in kv.items()}
    est = []
    for spec in (KVQuantSpec(), None):
        fisher = S.Fisher([(kv, S.squared_gradients(model, mx.array(tokens), kv, spec, chunk))],
                          chunk)
        est.append(np.array([fisher.layer(i, o) for i, o in options]))
    measured = S.Measured(model, runner, [ref])
    return est[0], est[1], np.array([measured.layer(i, o) for i, o in options])


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return np.corrcoef(ra, rb)[0, 1]


def _options(layers, bits):
    base = KVQuantSpec()
    return [(i, replace(base, k_bits=b if kind == "k" else None, v_bits=b if kind == "v" else None))
            for i in layers for kind in "kv" for b in bits]


def test_fisher_ranks_like_measured_kld_on_random_weights():
    """A random-weight llama whose layers differ (one layer's keys and one
    layer's values scaled up): the estimate ranks the options as the measured
    KLD does, and finds the same most sensitive one."""
    model = tiny_model("llama", num_hidden_layers=4)
    model.model.layers[1].self_attn.k_proj.weight *= 6
    model.model.layers[2].self_attn.v_proj.weight *= 6
    tokens = np.random.default_rng(0).integers(0, 512, 256)
    options = _options(range(4), (2, 4))
    est, _, got = _sensitivities(model, tokens, options, chunk=16)
    assert _spearman(est, got) > 0.85, (est, got)
    assert np.argmax(est) == np.argmax(got)


@pytest.mark.slow
def test_fisher_ranks_like_measured_kld_on_the_default_model():
    """The embedded model, 2-bit keys or values in one layer at a time on 512
    tokens of Persuasion in 32-token chunks (the measured side: 60 partial
    forward passes): a key waits `residual` tokens at 16 bits before queries
    read its codes, and the estimate that counts only the queries reading
    codes ranks the layers as the measurement does; counting every later
    query's reads does not."""
    try:
        model, tok = mlx_kvq.load(attach_plan=False)
        text = corpus.source_text("austen:persuasion")
    except (OSError, RuntimeError, ValueError) as e:
        pytest.skip(f"default model or Austen unavailable: {e}")
    tokens = np.asarray(tok.encode(text))[5000:5512]
    est, every, got = _sensitivities(model, tokens, _options(range(len(model.layers)), (2,)), 32)
    assert _spearman(est, got) > 0.85
    assert _spearman(every, got) < 0.5
