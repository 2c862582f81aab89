"""Layer sensitivity for calibration: the Fisher estimate (one gradient
pass) ranks layers and options as the measured KLD does; the cache reads
back exactly what attention sees."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

import mlx_kvq  # noqa: F401
from mlx_kvq import KVQCache
from mlx_kvq.commands import corpus
from mlx_kvq.cache import Calibration
from mlx_kvq.converters import calibrate as C
from mlx_kvq.converters import sensitivity as S
from mlx_kvq.spec import KVQuantSpec

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


def _sensitivities(model, tokens, options, chunk=64):
    runner = C.Runner(model, chunk)
    kv = {}

    def record(i, k, v):
        kv.setdefault(i, []).append((k.astype(mx.float32), v.astype(mx.float32)))

    ref = runner.reference(tokens, record_kv=record)
    kv = {i: tuple(mx.concatenate(x, axis=2) for x in zip(*p)) for i, p in kv.items()}
    fisher = S.Fisher([(kv, S.squared_gradients(model, mx.array(tokens), kv))], chunk)
    measured = S.Measured(model, runner, [ref])
    est = [fisher.layer(i, spec) for i, spec in options]
    got = [measured.layer(i, spec) for i, spec in options]
    return np.array(est), np.array(got)


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
    KLD does, and finds the same most sensitive ones."""
    model = tiny_model("llama", num_hidden_layers=4)
    model.model.layers[1].self_attn.k_proj.weight *= 6
    model.model.layers[2].self_attn.v_proj.weight *= 6
    tokens = np.random.default_rng(0).integers(0, 512, 256)
    options = _options(range(4), (2, 4))
    est, got = _sensitivities(model, tokens, options, chunk=16)
    assert _spearman(est, got) > 0.85, (est, got)
    top = set(np.argsort(got)[-2:])
    assert set(np.argsort(est)[-2:]) == top


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "the estimate weighs each stored key's error by the gradients of every later "
    "query, the nearest ones included, which read it at 16 bits while it waits in "
    "the residual: on the default model it ranks like KLD measured with those reads "
    "quantized (Spearman 0.85+), not like decoding reads them (0.12 at 32-token chunks)"))
def test_fisher_ranks_like_measured_kld_on_the_default_model():
    """The embedded model, 2-bit keys or values in one layer at a time on 512
    tokens of Persuasion in 32-token chunks (the measured side: 60 partial
    forward passes), read as decoding reads them: a key waits `residual`
    tokens at 16 bits before queries read its codes."""
    try:
        model, tok = mlx_kvq.load(attach_plan=False)
        text = corpus.source_text("austen:persuasion")
    except (OSError, RuntimeError, ValueError) as e:
        pytest.skip(f"default model or Austen unavailable: {e}")
    tokens = np.asarray(tok.encode(text))[5000:5512]
    est, got = _sensitivities(model, tokens, _options(range(len(model.layers)), (2,)), 32)
    assert _spearman(est, got) > 0.85
