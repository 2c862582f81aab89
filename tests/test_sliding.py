"""Quantized sliding-window caches: attention equals attention over the same
dequantized keys/values under the model's window mask, across window and
group boundaries; they stay bounded; batches of them decode as alone; and
random-weight sliding-window models generate as with mlx-lm's caches."""

import mlx.core as mx
import pytest
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_make_prompt_cache

import mlx_kvq
from mlx_kvq import KVQBatchCache, KVQCache
from mlx_kvq.attention import kvq_attention
from mlx_kvq.spec import window_spec
from mlx_kvq.persist import load_prompt_cache, save_prompt_cache

from conftest import tiny_model
from test_batch import assert_same_or_near_tie, prompts_of, run_batch

CHUNKS = (70, 1, 1, 130, 1, 33, 1, 1, 200, 300) + (1,) * 90


@pytest.mark.parametrize("spec, window, H, Hq, D", [
    ("k8v8-g32-r32-s0", 100, 2, 4, 64),     # a window that is not a multiple of the group
    ("k4v2-g32-r64-s0", 128, 1, 2, 256),    # head_dim 256, GQA 2
    ("k3v4-g64-r64-s0", 192, 2, 8, 128),    # group 64, GQA 4
    ("k4v4-g32-r0-s0-ktok", 77, 1, 1, 64),  # per-token keys, no residual
])
def test_window_attention_equals_the_dequantized_reference(spec, window, H, Hq, D):
    cache = KVQCache(spec, window=window)
    ref = RotatingKVCache(max_size=window, keep=0)
    key = mx.random.key(0)
    for L in CHUNKS:
        k1, k2, k3, key = mx.random.split(key, 4)
        k = mx.random.normal((1, H, L, D), key=k1)
        v = mx.random.normal((1, H, L, D), key=k2)
        q = mx.random.normal((1, Hq, L, D), key=k3)
        mask, ref_mask = cache.make_mask(L, window_size=window), ref.make_mask(L, window_size=window)
        cache.update_and_fetch(k, v)
        got = kvq_attention(q, cache, scale=D ** -0.5, mask=mask)
        # The same keys and values, dequantized as this update reads them
        # (what it flushed from their 16-bit copy), under the model's window mask.
        dk, dv = cache.dequantized(stored=False)
        held = dk.shape[2]
        want = mx.fast.scaled_dot_product_attention(
            q, dk, dv, scale=D ** -0.5,
            mask=create_causal_mask(L, held - L, window_size=window))
        assert mx.allclose(got, want, atol=2e-4).item(), (spec, cache.offset)
        # and mlx-lm's rotating cache over the exact keys: within the quantization error
        rk, rv = ref.update_and_fetch(k, v)
        exact = mx.fast.scaled_dot_product_attention(q, rk, rv, scale=D ** -0.5, mask=ref_mask)
        bound = 0.05 if spec.startswith("k8") else 1.5
        assert mx.abs(got - exact).max().item() < bound
        assert held <= window + cache.spec.flush_unit - 1 + L  # what the chunk's queries need
    assert cache.offset == sum(CHUNKS) > 4 * window
    assert cache.size() <= window + cache.spec.flush_unit  # after decode steps: bounded
    assert not cache.is_trimmable()


def test_window_caches_save_copy_and_refuse_another_window(tmp_path):
    cache = KVQCache("k4v4-g32-r32-s0", window=96)
    for _ in range(3):
        cache.update_and_fetch(mx.random.normal((1, 2, 90, 64)), mx.random.normal((1, 2, 90, 64)))
    save_prompt_cache(tmp_path / "c.safetensors", [cache])
    loaded = load_prompt_cache(tmp_path / "c.safetensors")[0]
    assert loaded.window == 96 and loaded.body_start == cache.body_start > 0
    assert all(mx.array_equal(a, b).item() for a, b in zip(loaded.dequantized(), cache.dequantized()))
    with pytest.raises(ValueError, match="128-token window"):
        cache.make_mask(4, window_size=128)
    with pytest.raises(ValueError, match="no sinks"):
        KVQCache("k4v4", window=96)
    assert window_spec("k4v4", 64).residual == 32 and window_spec("k4v4", 16) is None


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss"])
def test_sliding_models_generate_as_with_full_precision(arch):
    """Windows of 128 tokens, a prompt beyond one window and 3 windows of
    decoding. 16-bit window caches give mlx-lm's tokens (up to a near-tie):
    the window mask and the eviction are the model's. At 8 bits the tokens
    match until a step whose top-2 log-prob gap is within the 8-bit logit
    error of these random-weight models (up to 0.05 here; their early
    sliding layers amplify it)."""
    model = tiny_model(arch, sliding_window=128)
    prompt = prompts_of([150], seed=3)[0]
    want, gaps, _ = _greedy(model, prompt, mlx_make_prompt_cache(model))
    for spec, tie in (("k16v16", 1e-3), ("k8v8", 0.05)):
        got, _, cache = _greedy(model, prompt, mlx_kvq.make_prompt_cache(
            model, spec, sliding_spec=spec))
        windows = [c for c in cache if isinstance(c, KVQCache) and c.window == 128]
        assert windows and all(c.size() <= 128 + 32 for c in windows)
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert first is None or gaps[first] < tie, (spec, first, gaps[first])


def _greedy(model, prompt, cache, n=3 * 128):
    from mlx_lm.generate import generate_step

    tokens, gaps = [], []
    for tok, logprobs in generate_step(mx.array(prompt), model, prompt_cache=cache,
                                       max_tokens=n, prefill_step_size=64):
        top2 = mx.sort(logprobs)[-2:]
        tokens.append(int(tok))
        gaps.append(float(top2[1] - top2[0]))
    return tokens, gaps, cache


def test_a_batch_of_window_caches_decodes_as_each_alone():
    model = tiny_model("gemma3_text", sliding_window=128)
    prompts = prompts_of([40, 150, 90], seed=5)
    spec = "k8v8"
    got, finals = run_batch(model, prompts, [150, 60, 100], [0, 0, 3], spec=spec,
                            sliding_spec=spec)
    for i, p in enumerate(prompts):
        want, gaps, _ = _greedy(model, p, mlx_kvq.make_prompt_cache(model, spec,
                                                                      sliding_spec=spec),
                                n=len(got[i]))
        assert_same_or_near_tie(got[i], want, gaps, f"sequence {i}")
    batch = KVQBatchCache.merge([KVQCache("k8v8-g32-r64-s0", window=128) for _ in range(2)])
    assert batch.window == 128 and batch.extract(1).window == 128


def test_window_decode_through_emulated_metal_kernel(monkeypatch):
    """Decode steps over window caches (one alone, and a batch of rows of
    different lengths) run the fused kernel (CPU emulation) with each row's
    first visible token, equal to the masked MLX path."""
    from mlx_kvq.metal_kernels import decode as kernels

    calls, kernel = [], kernels.metal_decode_partials
    monkeypatch.setattr(kernels, "metal_decode_partials",
                        lambda *a, **k: calls.append(k["first_token"]) or kernel(*a, **k))
    spec, window, H, D = "k4v4-g32-r32-s0", 100, 2, 64
    key = mx.random.key(7)
    steps = [mx.random.normal((3, H, 1, D), key=k) for k in mx.random.split(key, 3 * 24)]
    fills = [mx.random.normal((1, H, n, D), key=mx.random.key(n)) for n in (150, 230, 100)]
    outs = {}
    for mode in ("mlx", "emu"):
        monkeypatch.setenv(kernels.ENV_VAR, mode)
        alone, rows = KVQCache(spec, window=window), []
        alone.update_and_fetch(fills[0], fills[0])
        for f in fills:
            rows.append(KVQCache(spec, window=window))
            rows[-1].update_and_fetch(f, f)
        batch = KVQBatchCache.merge(rows)
        got = []
        for i in range(24):
            k, v, q = steps[3 * i], steps[3 * i + 1], mx.repeat(steps[3 * i + 2], 2, axis=1)
            alone.update_and_fetch(k[:1], v[:1])
            batch.update_and_fetch(k, v)
            got.append(kvq_attention(q[:1], alone, scale=D ** -0.5))
            got.append(kvq_attention(q, batch, scale=D ** -0.5))
        outs[mode] = got
    for a, b in zip(outs["emu"], outs["mlx"]):
        assert mx.allclose(a, b, atol=1e-4).item()
    assert len(calls) == 2 * 24
    assert any(f for f in calls if isinstance(f, int))  # the window hid part of the body
    assert any(any(f) and len(set(f)) > 1 for f in calls if isinstance(f, tuple))


def test_kv_report_names_the_window_layers():
    from mlx_kvq.report import kv_stats

    model = tiny_model("gemma3_text")  # two 64-token windows, one full layer
    cache = mlx_kvq.make_prompt_cache(model, "k4v2")
    model(mx.array(prompts_of([90])), cache=cache)
    stats = kv_stats(cache)
    assert stats.label == "k4v2-g32-r64-s4 + windows k8v2 x2"
    assert "2 sliding-window layers of 64 tokens: k8v2 x2, residual 32" in stats.spec
    assert stats.nbytes == sum(c.nbytes for c in cache)
