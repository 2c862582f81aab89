"""mlx_kvq caches inside unmodified mlx-lm models (small random-weight configs)."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.models.cache import load_prompt_cache as mlx_load_prompt_cache
from mlx_lm.models.cache import save_prompt_cache as mlx_save_prompt_cache

import mlx_kvq
from mlx_kvq import KVQCache
from mlx_kvq.persist import load_prompt_cache, save_prompt_cache

from conftest import tiny_model


def run_chunks(model, cache, tokens, chunks):
    outs, i = [], 0
    for c in chunks:
        outs.append(model(tokens[:, i:i + c], cache=cache))
        i += c
    return mx.concatenate(outs, axis=1)


def kld(ref, out):
    lr = ref - mx.logsumexp(ref, -1, keepdims=True)
    lo = out - mx.logsumexp(out, -1, keepdims=True)
    return float((mx.exp(lr) * (lr - lo)).sum(-1).mean())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "gemma3_text", "phi", "gpt2",
                                  "youtu_llm", "gpt_oss"])
def test_architectures_k8v8_close_k2v2_worse(arch):
    model = tiny_model(arch)
    tokens = mx.random.randint(0, 512, (1, 300), key=mx.random.key(1))
    chunks = (128, 100, 1, 1, 70)
    ref = run_chunks(model, mlx_kvq.integration.mlx_cache.make_prompt_cache(model),
                     tokens, chunks)
    res = {}
    for label in ("k16v16", "k8v8", "k2v2-r0-s0"):
        cache = mlx_kvq.make_prompt_cache(model, label)
        assert any(isinstance(c, KVQCache) for c in cache)
        res[label] = kld(ref, run_chunks(model, cache, tokens, chunks))
    assert res["k16v16"] < 1e-4
    assert res["k8v8"] < 1e-3
    assert res["k2v2-r0-s0"] > 3 * res["k8v8"]


def test_sliding_window_layers_quantized_or_kept():
    model = tiny_model("gemma3_text")  # windows of 64 tokens: the residual shrinks to fit
    cache = mlx_kvq.make_prompt_cache(model, "k4v4")
    assert [type(c) for c in cache] == [KVQCache] * 3
    assert [c.window for c in cache] == [64, 64, None]
    # "auto": window layers keep the spec's values and take 8-bit keys
    assert str(cache[0].spec) == "k8v4-g32-r32-s0" and str(cache[2].spec) == "k4v4-g32-r64-s4"
    same = mlx_kvq.make_prompt_cache(model, "k4v4", sliding_spec="same")
    assert str(same[0].spec) == "k4v4-g32-r32-s0" and same[2].spec == cache[2].spec
    wide = mlx_kvq.make_prompt_cache(model, "k16v2", sliding_spec="auto")
    assert (wide[0].spec.k_bits, wide[0].spec.v_bits) == (None, 2)  # 16-bit keys stay
    kept = mlx_kvq.make_prompt_cache(model, "k4v4", sliding_spec="keep")
    assert [type(c) for c in kept] == [RotatingKVCache, RotatingKVCache, KVQCache]
    other = mlx_kvq.make_prompt_cache(model, "k4v4", sliding_spec="k2v2")
    assert str(other[0].spec) == "k2v2-g32-r32-s0"


def test_unsupported_architecture_is_refused():
    import importlib

    mod = importlib.import_module("mlx_lm.models.gemma2")
    args = mod.ModelArgs(model_type="gemma2", hidden_size=64, num_hidden_layers=1,
                         intermediate_size=128, num_attention_heads=2, head_dim=32,
                         rms_norm_eps=1e-6, vocab_size=64, num_key_value_heads=1)
    with pytest.raises(ValueError, match="gemma2"):
        mlx_kvq.make_prompt_cache(mod.Model(args), "k4v4")


def test_latent_cache_architecture_is_refused_up_front():
    # deepseek_v3 caches MLA latents and reads them outside attention.
    import importlib

    mod = importlib.import_module("mlx_lm.models.deepseek_v3")
    args = mod.ModelArgs.from_dict(dict(
        model_type="deepseek_v3", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
        num_attention_heads=2, num_key_value_heads=2, vocab_size=64, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32))
    with pytest.raises(ValueError, match="deepseek_v3.*uses its cached keys/values outside"):
        mlx_kvq.make_prompt_cache(mod.Model(args), "k4v4")


def test_value_head_dim_must_take_the_group_size():
    model = tiny_model("youtu_llm", v_head_dim=48)
    with pytest.raises(ValueError, match="group_size=32 does not divide v_head_dim=48"):
        mlx_kvq.make_prompt_cache(model, "k4v4")


def test_group_size_must_divide_head_dim():
    model = tiny_model("llama", head_dim=96, hidden_size=384, num_attention_heads=4)
    with pytest.raises(ValueError, match="group_size=64 does not divide head_dim=96"):
        mlx_kvq.make_prompt_cache(model, "k4v4-g64-r64")


def test_head_dim_80_quantizes_channel_keys_only():
    # No group size divides 80: per-channel keys (grouped along tokens) still
    # quantize, values stay in full precision.
    model = tiny_model("llama", head_dim=80, hidden_size=320, num_attention_heads=4)
    with pytest.raises(ValueError, match="group_size=32 does not divide head_dim=80"):
        mlx_kvq.make_prompt_cache(model, "k4v4")
    tokens = mx.random.randint(0, 512, (1, 300), key=mx.random.key(1))
    chunks = (128, 100, 1, 1, 70)
    ref = run_chunks(model, mlx_kvq.integration.mlx_cache.make_prompt_cache(model),
                     tokens, chunks)
    cache = mlx_kvq.make_prompt_cache(model, "k8v16")
    assert cache[0].spec.k_bits == 8 and cache[0].spec.v_bits is None
    assert kld(ref, run_chunks(model, cache, tokens, chunks)) < 1e-3
    assert cache[0].n_body > 0


def test_generate_step_greedy_matches_fp(llama_tiny):
    """mlx-lm's generation loop (under generate/stream_generate) with our cache."""
    prompt = mx.random.randint(0, 512, (40,), key=mx.random.key(3))

    def greedy(cache):
        return [int(t) for t, _ in generate_step(prompt, llama_tiny, max_tokens=24,
                                                 prompt_cache=cache,
                                                 prefill_step_size=16)]

    cache = mlx_kvq.make_prompt_cache(llama_tiny, "k8v8")
    assert greedy(cache) == greedy(None)
    assert 40 + 23 <= cache[0].offset <= 40 + 24  # mlx-lm computes one step ahead


def test_save_load_round_trip(tmp_path, llama_tiny):
    tokens = mx.random.randint(0, 512, (1, 150), key=mx.random.key(4))
    cache = mlx_kvq.make_prompt_cache(llama_tiny, "k4v2-g32-r32-s4")
    llama_tiny(tokens[:, :149], cache=cache)
    nxt = tokens[:, 149:]
    f = tmp_path / "c.safetensors"
    save_prompt_cache(f, cache, model=llama_tiny)
    want = llama_tiny(nxt, cache=cache)
    for loaded in (load_prompt_cache(f, model=llama_tiny, spec="k4v2-g32-r32-s4"),
                   mlx_load_prompt_cache(str(f))):
        assert all(isinstance(c, KVQCache) for c in loaded)
        got = llama_tiny(nxt, cache=loaded)
        assert mx.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="KV spec"):
        load_prompt_cache(f, spec="k8v8")
    with pytest.raises(ValueError, match="another model"):
        load_prompt_cache(f, model=tiny_model("llama", seed=7))
    # mlx-lm's own saver works too
    f2 = tmp_path / "d.safetensors"
    mlx_save_prompt_cache(str(f2), cache)
    assert mlx_load_prompt_cache(str(f2))[0].offset == cache[0].offset


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_cache_file_gives_clear_error(tmp_path, llama_tiny, damage):
    cache = mlx_kvq.make_prompt_cache(llama_tiny, "k4v4")
    llama_tiny(mx.zeros((1, 70), mx.int32), cache=cache)
    f = tmp_path / "c.safetensors"
    save_prompt_cache(f, cache, model=llama_tiny)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * 64 + data[64:])
    with pytest.raises(ValueError, match="cannot load prompt cache"):
        load_prompt_cache(f, model=llama_tiny)


def test_max_kv_size_bounds_the_cache(llama_tiny):
    cache = mlx_kvq.make_prompt_cache(llama_tiny, "k4v4", max_kv_size=256)
    tokens = mx.random.randint(0, 512, (1, 700), key=mx.random.key(5))
    # a prefill chunk is held whole for its own queries; decode steps keep the bound
    run_chunks(llama_tiny, cache, tokens, (300,))
    assert all(c.size() == 300 for c in cache)
    run_chunks(llama_tiny, cache, tokens[:, 300:], (300, 1, 1, 97, 1))
    assert all(c.size() <= 256 for c in cache) and cache[0].offset == 700


@pytest.mark.parametrize("spec", ["k4v2-g32-r32-s4", "k3v3-o16-vg64-r32-s4-rot"])
def test_decode_through_emulated_metal_kernel_matches_mlx_path(monkeypatch, llama_tiny, spec):
    """The whole model path with the Metal decode kernel (run by the CPU
    emulation); outlier key channels and a value group of their own too."""
    from mlx_kvq.metal_kernels import decode as kernels

    tokens = mx.random.randint(0, 512, (1, 200), key=mx.random.key(6))
    calls, kernel = [], kernels.metal_decode_partials
    monkeypatch.setattr(kernels, "metal_decode_partials",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    outs = {}
    for mode in ("mlx", "emu"):
        monkeypatch.setenv(kernels.ENV_VAR, mode)
        cache = mlx_kvq.make_prompt_cache(llama_tiny, spec)
        outs[mode] = run_chunks(llama_tiny, cache, tokens, (190, 1, 1, 1, 7))
    assert len(calls) == 3 * len(llama_tiny.layers)  # every decode step, every layer
    assert float(mx.abs(outs["emu"] - outs["mlx"]).max()) < 1e-3
