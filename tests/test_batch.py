"""Many sequences at once: KVQBatchCache in mlx-lm's BatchGenerator and
batch_generate, against the same requests served alone; the batch protocol
(merge, extract, filter, extend, prepare, trim) and copying."""

import copy

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from conftest import tiny_model
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from mlx_kvq import models, persist
from mlx_kvq.batch_cache import KVQBatchCache
from mlx_kvq.cache import KVQCache

SPEC = "k4v4-g32-r32-s4"  # small residual: bodies fill within short prompts
STEP = 64  # prefill step, the same for batched and solo runs


@pytest.fixture(scope="module")
def default_model():
    return models.load()


def prompts_of(lengths, seed=1, vocab=512):
    mx.random.seed(seed)
    return [mx.random.randint(0, vocab, (n,)).tolist() for n in lengths]


def solo(model, prompt, n, spec=SPEC, max_kv_size=None):
    """Greedy tokens of one request served alone, with each step's top-2 gap."""
    cache = mlx_kvq.make_prompt_cache(model, spec, max_kv_size)
    tokens, gaps = [], []
    for tok, logprobs in generate_step(mx.array(prompt), model, prompt_cache=cache,
                                       max_tokens=n, prefill_step_size=STEP):
        top2 = mx.sort(logprobs)[-2:]
        tokens.append(int(tok))
        gaps.append(float(top2[1] - top2[0]))
    return tokens, gaps, cache


def assert_same_or_near_tie(got, want, gaps, what):
    """Equal tokens, or a divergence at a step where the solo run's top-2
    log-probs were within 1e-3 (then the rest may differ)."""
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert gaps[i] < 1e-3, f"{what}: token {i} differs ({a} vs {b}) with top-2 gap {gaps[i]}"
            return


def run_batch(model, prompts, max_tokens, arrivals, spec=SPEC, max_kv_size=None,
              sliding_spec=None):
    """BatchGenerator over quantized caches; prompt i joins at step arrivals[i].
    Returns ({i: tokens}, {i: (cache, all_tokens)}) per prompt."""
    gen = BatchGenerator(model, stop_tokens=[], prefill_step_size=STEP,
                         prefill_batch_size=2, completion_batch_size=8)
    caches = mlx_kvq.make_batch_prompt_caches(model, len(prompts), spec, max_kv_size,
                                              sliding_spec)
    uid_of, out, done, step = {}, {}, {}, 0
    while len(done) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                uid, = gen.insert([prompts[i]], [max_tokens[i]], caches=[caches[i]])
                uid_of[uid] = i
        for r in gen.next()[1]:
            i = uid_of[r.uid]
            out.setdefault(i, []).append(r.token)
            if r.finish_reason is not None:
                done[i] = (r.prompt_cache, r.all_tokens)
        step += 1
    gen.close()
    return out, done


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_oss"])
def test_batch_matches_solo_on_random_models(arch):
    """GQA (llama), sliding-window layers and head_dim 256 (gemma3),
    learned sinks with sliding layers (gpt_oss): sequences of different
    lengths, joining at different steps, one finishing early."""
    model = tiny_model(arch)
    prompts = prompts_of([5, 150, 77, 40])
    max_tokens = [30, 6, 45, 20]
    got, caches = run_batch(model, prompts, max_tokens, arrivals=[0, 0, 3, 9])
    bodies = []
    for i, p in enumerate(prompts):
        want, gaps, solo_cache = solo(model, p, max_tokens[i])
        assert_same_or_near_tie(got[i], want, gaps, f"{arch} sequence {i}")
        if got[i] == want:  # the extracted cache holds what the solo cache holds
            extracted = caches[i][0]
            kvq = [j for j, c in enumerate(extracted) if isinstance(c, KVQCache)]
            assert kvq
            for j in kvq:
                assert extracted[j].offset == solo_cache[j].offset == len(caches[i][1])
                assert extracted[j].n_body == solo_cache[j].n_body
                bodies.append(extracted[j].n_body)
    assert max(bodies) > 0  # quantized tokens were compared too


def test_max_kv_size_evicts_per_sequence(llama_tiny):
    """With --max-kv-size each row drops its own oldest body tokens."""
    prompts = prompts_of([30, 200])
    got, caches = run_batch(llama_tiny, prompts, [80, 40], arrivals=[0, 2],
                            max_kv_size=128)
    for i, p in enumerate(prompts):
        want, gaps, alone = solo(llama_tiny, p, [80, 40][i], max_kv_size=128)
        assert_same_or_near_tie(got[i], want, gaps, f"sequence {i}")
        if got[i] == want:  # the same tokens held and evicted (values may differ
            for a, b in zip(caches[i][0], alone):  # in rounding: other kernels)
                assert (a.offset, a.n_body, a.body_start, a.size()) == \
                    (b.offset, b.n_body, b.body_start, b.size())
                assert a.size() <= 128 and (a.body_start > 4) == (a.offset > 128)


def test_batch_generate_matches_solo_on_the_embedded_model(default_model):
    model, tokenizer = default_model
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
             "List three colors:"]
    prompts = [tokenizer.encode(t) for t in texts]
    n = [24, 8, 16]
    r = mlx_kvq.batch_generate(model, tokenizer, prompts, "k4v4", max_tokens=n,
                               return_token_ids=True, prefill_step_size=STEP)
    for i, p in enumerate(prompts):
        want, gaps, _ = solo(model, p, n[i], "k4v4")
        eos = next((j for j, t in enumerate(want) if t in tokenizer.eos_token_ids), None)
        want, gaps = (want, gaps) if eos is None else (want[:eos], gaps[:eos])
        assert_same_or_near_tie(r.token_ids[i], want, gaps, f"prompt {texts[i]!r}")


def filled(model, lengths, spec=SPEC):
    caches = []
    for p in prompts_of(lengths, seed=2):
        c = mlx_kvq.make_prompt_cache(model, spec)
        for a in range(0, len(p), STEP):
            model(mx.array(p[a:a + STEP])[None], cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    return caches


def assert_same_cache(a: KVQCache, b: KVQCache):
    assert (a.offset, a.n_body, a.body_start, a.size()) == (b.offset, b.n_body, b.body_start,
                                                           b.size())
    for x, y in zip(a.state[1:], b.state[1:]):
        assert (x is None) == (y is None)
        if x is None:
            continue
        xs, ys = (x, y) if isinstance(x, (tuple, list)) else ((x,), (y,))
        for u, v in zip(xs, ys):
            assert u.shape == v.shape and mx.array_equal(u, v)


def test_merge_extract_round_trip_keeps_every_token(llama_tiny):
    singles = filled(llama_tiny, [3, 70, 200, 0])
    for layer in range(len(singles[0])):
        batch = KVQBatchCache.merge([c[layer] for c in singles])
        assert batch.size() == max(c[layer].size() for c in singles)
        for i, c in enumerate(singles):
            assert_same_cache(batch.extract(i), c[layer])


def test_extracted_cache_continues_like_one_never_batched(llama_tiny):
    singles = filled(llama_tiny, [40, 130])
    batch = [KVQBatchCache.merge(list(layer)) for layer in zip(*singles)]
    back = [[c.extract(i) for c in batch] for i in range(2)]
    nxt = prompts_of([50], seed=3)[0]
    for i in range(2):
        a = llama_tiny(mx.array(nxt)[None], cache=singles[i])
        b = llama_tiny(mx.array(nxt)[None], cache=back[i])
        assert mx.array_equal(a, b)
        for x, y in zip(singles[i], back[i]):
            assert_same_cache(x, y)


def test_batched_attention_equals_each_sequence_alone(llama_tiny):
    """One decode step of rows holding different numbers of tokens."""
    singles = filled(llama_tiny, [5, 97, 160])
    batch = [KVQBatchCache.merge(list(layer)) for layer in zip(*singles)]
    tok = mx.array([[7], [8], [9]])
    got = llama_tiny(tok, cache=batch)
    for i in range(3):
        want = llama_tiny(tok[i:i + 1], cache=singles[i])
        assert mx.allclose(got[i:i + 1], want, atol=1e-4, rtol=1e-4)


def test_filter_and_extend(llama_tiny):
    singles = filled(llama_tiny, [10, 80, 150])
    layer = [c[0] for c in singles]
    a = KVQBatchCache.merge(layer[:2])
    a.extend(KVQBatchCache.merge(layer[2:]))
    assert a.batch_size == 3
    a.filter([2, 0])
    assert_same_cache(a.extract(0), layer[2])
    assert_same_cache(a.extract(1), layer[0])
    empty = KVQBatchCache.merge([KVQCache(SPEC)])
    empty.extend(a)
    assert empty.batch_size == 3 and empty.extract(0).offset == 0
    assert_same_cache(empty.extract(1), layer[2])


def test_left_padding_is_skipped(llama_tiny):
    """prepare(left_padding=...) tokens are not stored; positions start after them."""
    p = prompts_of([20, 12])
    batch = [KVQBatchCache.merge([KVQCache(SPEC), KVQCache(SPEC)])
             for _ in llama_tiny.layers]
    for c in batch:
        c.prepare(left_padding=[0, 8])
    x = mx.array([p[0], [0] * 8 + p[1]])
    out = llama_tiny(x, cache=batch)
    assert [c.offset.tolist() for c in batch][0] == [20, 12]
    alone = filled_from(llama_tiny, p[1])
    assert mx.allclose(out[1, -1], alone[0, -1], atol=1e-4, rtol=1e-4)


def filled_from(model, p):
    c = mlx_kvq.make_prompt_cache(model, SPEC)
    return model(mx.array(p)[None], cache=c)


def test_trim_drops_the_last_tokens_of_every_sequence(llama_tiny):
    singles = filled(llama_tiny, [60, 140])
    for n in (3, 50):  # within the residual, and into the quantized body
        layer = [copy.deepcopy(c[0]) for c in singles]
        batch = KVQBatchCache.merge(layer)
        assert batch.trim(n) == n
        for i, c in enumerate(layer):
            c.trim(n)
            assert_same_cache(batch.extract(i), c)


def test_deepcopy_is_independent(llama_tiny):
    cache = filled(llama_tiny, [90])[0]
    twin = copy.deepcopy(cache)
    llama_tiny(mx.array([[1, 2, 3]]), cache=twin)
    assert twin[0].offset == 93 and cache[0].offset == 90
    batch = KVQBatchCache.merge([cache[0], twin[0]])
    bcopy = copy.deepcopy(batch)
    bcopy.filter([1])
    assert batch.batch_size == 2 and bcopy.batch_size == 1
    assert_same_cache(bcopy.extract(0), twin[0])


def test_extracted_caches_save_and_load(tmp_path, llama_tiny):
    singles = filled(llama_tiny, [33, 120])
    batch = [KVQBatchCache.merge(list(layer)) for layer in zip(*singles)]
    out = [c.extract(1) for c in batch]
    f = tmp_path / "one.safetensors"
    persist.save_prompt_cache(str(f), out, model=llama_tiny)
    back = persist.load_prompt_cache(str(f), model=llama_tiny, spec=SPEC)
    for x, y in zip(back, singles[1]):
        assert_same_cache(x, y)
    g = tmp_path / "mlx.safetensors"
    save_prompt_cache(str(g), out)
    for x, y in zip(load_prompt_cache(str(g)), singles[1]):
        assert_same_cache(x, y)


def test_merge_refuses_mixed_schemes():
    with pytest.raises(ValueError, match="different schemes"):
        KVQBatchCache.merge([KVQCache("k4v4"), KVQCache("k8v8")])
    with pytest.raises(TypeError, match="KVQCache"):
        KVQBatchCache.merge([KVQCache("k4v4"), object()])
    batch = KVQBatchCache.merge([KVQCache("k4v4")])  # a sibling, not a single cache
    with pytest.raises(TypeError, match="got KVQBatchCache"):
        KVQBatchCache.merge([KVQCache("k4v4"), batch])


def test_batch_decode_through_emulated_metal_kernel(monkeypatch, llama_tiny):
    """Rows with different quantized body lengths (one empty) in one fused
    kernel launch per layer and step (CPU emulation), equal to the MLX path."""
    from mlx_kvq.metal_kernels import decode as kernels

    calls, kernel = [], kernels.metal_decode_partials
    monkeypatch.setattr(kernels, "metal_decode_partials",
                        lambda *a, **k: calls.append(k["n_tokens"]) or kernel(*a, **k))
    outs = {}
    for mode in ("mlx", "emu"):
        monkeypatch.setenv(kernels.ENV_VAR, mode)
        batch = [KVQBatchCache.merge(list(layer))
                 for layer in zip(*filled(llama_tiny, [40, 130, 230]))]
        outs[mode] = [llama_tiny(mx.array([[5], [6], [7]]), cache=batch) for _ in range(3)]
    assert len(calls) == 3 * len(llama_tiny.layers)
    assert all(len(c) == 3 and c[0] == 0 and len(set(c)) == 3 for c in calls)
    for a, b in zip(outs["emu"], outs["mlx"]):
        assert float(mx.abs(a - b).max()) < 1e-3


@pytest.mark.parametrize("mode", ["mlx", "emu"])
def test_batched_prefill_in_one_row_chunks_stays_causal(monkeypatch, llama_tiny, mode):
    """A score budget small enough to split a batched prefill into one-row
    chunks (long contexts x many rows) must not turn it into decode steps."""
    from mlx_kvq import attention
    from mlx_kvq.metal_kernels import decode as kernels

    monkeypatch.setenv(kernels.ENV_VAR, mode)
    monkeypatch.setattr(attention, "SCORE_BUDGET_BYTES", 1)
    p = mx.array(prompts_of([40, 40], seed=4))
    batch = [KVQBatchCache.merge([KVQCache(SPEC), KVQCache(SPEC)]) for _ in llama_tiny.layers]
    got = llama_tiny(p, cache=batch)
    for b in range(2):
        want = llama_tiny(p[b:b + 1], cache=mlx_kvq.make_prompt_cache(llama_tiny, SPEC))
        assert float(mx.abs(got[b] - want[0]).max()) < 1e-3


def test_batch_state_is_not_restored_silently(llama_tiny):
    batch = KVQBatchCache.merge([c[0] for c in filled(llama_tiny, [10, 50])])
    with pytest.raises(ValueError, match="extract"):
        KVQBatchCache.from_state(batch.state, batch.meta_state)
    with pytest.raises(ValueError, match="at least one"):
        mlx_kvq.make_batch_prompt_caches(llama_tiny, 0)


def test_trimmable_until_max_kv_size_evicts(llama_tiny):
    """Sinks put the body after them: not an eviction."""
    cache = mlx_kvq.make_prompt_cache(llama_tiny, SPEC, max_kv_size=256)
    llama_tiny(mx.array(prompts_of([200])), cache=cache)
    assert cache[0].body_start == 4 and cache[0].is_trimmable()
    batch = KVQBatchCache.merge([cache[0], KVQCache(SPEC, max_size=256)])
    assert batch.is_trimmable()
    llama_tiny(mx.array(prompts_of([100])), cache=cache)
    assert cache[0].body_start > 4 and not cache[0].is_trimmable()
    assert not KVQBatchCache.merge([cache[0]]).is_trimmable()
