"""The capacity planner against real caches, real peaks and hand arithmetic."""

import gc
import json

import pytest

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_kvq import attention, make_prompt_cache, models, shapes, sizing, units
from mlx_kvq.commands import corpus, plan
from mlx_kvq.spec import window_spec
from mlx_kvq.spec import short_label

from conftest import TINY, tiny_model

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, vocab_size=128256, tie_word_embeddings=False,
    torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def shape():
    return shapes.load_shape()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return models.load()


def feed(cache, n_tokens, H, D, chunk=2048):
    """Synthetic K/V through update_and_fetch: prefill chunks, then 2 decode steps."""
    sizes = [min(chunk, n_tokens - 2 - a) for a in range(0, max(n_tokens - 2, 0), chunk)]
    sizes += [1] * (n_tokens - sum(sizes))
    for n in sizes:
        k = mx.random.normal((1, H, n, D))
        for c in cache:
            c.update_and_fetch(k, k)
        mx.eval([c.state for c in cache])


def test_default_model_shape(shape):
    assert (shape.n_layers, shape.full_layers, shape.windows) == (30, 30, ())
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim) == (9, 3, 64)
    assert shape.dtype == "float32" and shape.trained_context == 8192
    # float32 weights: 4 bytes x ~134.5M parameters, tied embeddings
    assert 530e6 < shape.weight_bytes < 545e6


@pytest.mark.parametrize("spec", ["fp16", "k8v8", "k8v4", "k4v4", "k4v2", "k2v2",
                                  "k4v4-ktok", "k3v3-g64-r128-s0", "k3v3-o8-vg64",
                                  "k2v2-o16-vg64-rot"])
def test_kv_bytes_match_cache_nbytes(model_and_tokenizer, shape, spec):
    for context in (3, 67, 1000, 4099):
        cache = make_prompt_cache(model_and_tokenizer[0], spec)
        feed(cache, context, shape.n_kv_heads, shape.head_dim)
        measured = sum(c.nbytes for c in cache)
        assert sizing.kv_bytes(shape, spec, context) == measured, (spec, context)


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("spec", ["fp16", "k8v8", "k4v2", "k2v2-ktok", "k4v16",
                                  "k3v3-o8-vg64", "k2v3-o16-g64-vg128-rot"])
@pytest.mark.parametrize("sliding", ["auto", "same", "keep"])
def test_kv_bytes_equal_nbytes_on_every_architecture(arch, spec, sliding):
    """The sizing's bytes are the caches' own, for every architecture of the
    test matrix (GQA ratios, head dims 32-256, values narrower than keys,
    sliding windows quantized or kept in full precision), in prefill chunks
    and decode steps (a sliding window holds a prefill chunk beyond it until
    the next step: compared at decode steps)."""
    model = tiny_model(arch)
    s = shapes.model_shape(dict(TINY[arch], model_type=arch), dtype="float32")
    try:
        cache = make_prompt_cache(model, spec, sliding_spec=sliding)
    except ValueError:  # a group that does not divide this model's head dims
        with pytest.raises(ValueError):
            sizing.kv_bytes(s, spec, 10)
        return
    tokens = mx.random.randint(0, 512, (1, 301), key=mx.random.key(2))
    done = 0
    for n in (97, 160, 1, 1, 41, 1):
        model(tokens[:, done:done + n], cache=cache)
        done += n
        mx.eval([c.state for c in cache])
        windows = sizing.sliding_bytes(s, spec, done, sliding)
        full = sum(c.nbytes for c in cache
                   if isinstance(c, mlx_kvq.KVQCache) and c.window is None)
        assert sizing.kv_bytes(s, spec, done, sliding) - windows == full, (arch, done)
        if n == 1:
            assert sizing.kv_bytes(s, spec, done, sliding) == sum(c.nbytes for c in cache), \
                (arch, done)


def test_planned_limit_holds_on_the_model(model_and_tokenizer, shape, monkeypatch):
    """Plan k4v4 for one chat near the limit of a small budget, run that many
    tokens as mlx-lm does, and check the peak stays within the plan. A small
    SCORE_BUDGET_BYTES makes attention chunk its scores at this short
    context, as it does at long ones with the default budget."""
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(attention, "SCORE_BUDGET_BYTES", 4 << 20)
    spec, step, target = "k4v4", 512, 1536
    memory = sizing.memory_needed(shape, spec, [target], step)
    limit = sizing.capacity(shape, spec, memory, concurrency=1, prefill_step=step)
    assert target <= limit < target + 256
    assert sizing.capacity(shape, spec, memory, context=limit, prefill_step=step) == 1

    ids = tokenizer.encode(corpus.sample_text())[:limit - 2]  # 2 decoded tokens to come
    cache = make_prompt_cache(model, spec)
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()  # the loaded weights and whatever else is alive
    mx.reset_peak_memory()
    for _ in generate_step(mx.array(ids), model, max_tokens=2, prompt_cache=cache,
                           prefill_step_size=step):
        pass
    peak = mx.get_peak_memory() - baseline + shape.weight_bytes
    assert cache[0].offset == limit
    measured = sum(c.nbytes for c in cache)
    assert sizing.kv_bytes(shape, spec, limit) == measured
    assert peak <= memory, (
        f"peak {peak / 2**20:.1f} MiB over the planned {memory / 2**20:.1f} MiB "
        f"(workspace planned {sizing.workspace_bytes(shape, spec, limit, step) / 2**20:.1f} MiB)")


def test_caches_hold_only_what_is_planned(shape):
    """Active memory after a 2048-token prefill chunk and a decode step equals
    kv_bytes: no cache keeps a view into a whole prefill chunk alive."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    cache = [mlx_kvq.KVQCache("k4v4") for _ in range(shape.full_layers)]
    feed(cache, 2048 + 2, shape.n_kv_heads, shape.head_dim)
    gc.collect()
    held = mx.get_active_memory() - before
    planned = sizing.kv_bytes(shape, "k4v4", 2048 + 2)
    assert held <= 1.02 * planned, f"caches hold {held / 2**20:.1f} MiB, planned {planned / 2**20:.1f}"


def test_attention_scores_within_planned_workspace(shape):
    """One layer's prefill attention at 4K context, chunk 2048, default
    SCORE_BUDGET_BYTES: its peak stays within the planned score workspace."""
    L, T = 2048, 4096
    H, D, Hq = shape.n_kv_heads, shape.head_dim, shape.n_heads
    cache = mlx_kvq.KVQCache("k4v4")
    feed([cache], T - L, H, D)
    q, k = mx.random.normal((1, Hq, L, D)), mx.random.normal((1, H, L, D))
    cache.update_and_fetch(k, k)
    mx.eval(q, cache.state)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(attention.kvq_attention(q, cache, scale=D ** -0.5, mask="causal"))
    peak = mx.get_peak_memory() - before
    parts = sizing.workspace_parts(shape, "k4v4", T, L)
    planned = parts["scores"] + L * Hq * D * 4 * 2  # plus float32 queries and output
    assert peak <= planned, f"attention peak {peak / 2**20:.1f} MiB, planned {planned / 2**20:.1f}"


def test_llama3_8b_shaped_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    s = shapes.load_shape(str(path))
    assert (s.n_layers, s.full_layers, s.n_kv_heads, s.head_dim) == (32, 32, 8, 128)
    assert s.weight_bytes == 8_030_261_248 * 2  # parameters x bfloat16
    fp_token = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x heads x dims x fp16
    # unquantized: 4 fp16 sinks, the other 8188 tokens in a 8192-token body
    assert sizing.kv_bytes(s, "fp16", 8192) == (4 + 8192) * fp_token
    # k4v4 at 128K: 4 sinks + 64 residual + 28 waiting for a whole 32-token
    # group stay fp16; 130976 body tokens in a 131072-token allocation, each
    # head-token costing 2 x (128 x 4 bits + 4 groups x fp16 scale and bias).
    body_token = 32 * 8 * 2 * (128 * 4 // 8 + 128 // 32 * 2 * 2)
    assert sizing.kv_bytes(s, "k4v4", 131072) == 96 * fp_token + 131072 * body_token
    # the fp16 part amortized: 96 fp16 tokens over 128K add 96 x 128 KiB / 128K
    assert body_token == 40960
    assert sizing.kv_bytes_per_token(s, "k4v4", 131072) == 40960 + 96
    assert sizing.bits_per_element("k4v4", 128) == 5.0
    assert sizing.bits_per_element("k2v2", 128) == 3.0

    memory = 16 << 30
    for spec in plan.PRECISIONS:
        n = sizing.capacity(s, spec, memory, concurrency=1)
        assert sizing.memory_needed(s, spec, [n]) <= memory < sizing.memory_needed(s, spec, [n + 1])
    # 16 GiB holds the bf16 weights and an 8K chat only with a quantized cache
    assert sizing.capacity(s, "fp16", memory, concurrency=1) < 8192
    assert sizing.capacity(s, "k4v4", memory, concurrency=1) >= 8192

    plan.main(["--model", str(path), "--memory", "16GB", "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert "14.96 GiB (parameter count x bfloat16" in out
    assert [line.split()[0] for line in out.splitlines()[10:16]] == list(plan.PRECISIONS)
    assert "Recommended: k4v4" in out
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["name"] for r in rows] == list(plan.PRECISIONS)


def test_sliding_window_layers_stay_fp_and_bounded():
    model = tiny_model("gemma3_text")
    config = dict(TINY["gemma3_text"], model_type="gemma3_text")
    s = shapes.model_shape(config, dtype="float32")
    assert (s.full_layers, s.windows) == (1, (64, 64))
    for spec in ("k4v4", "k2v2"):
        cache = make_prompt_cache(model, spec)
        tokens = mx.random.randint(0, 512, (1, 301), key=mx.random.key(1))
        model(tokens[:, :300], cache=cache)
        model(tokens[:, 300:], cache=cache)  # decoding trims the windows
        mx.eval([c.state for c in cache])
        assert sizing.kv_bytes(s, spec, 301) == sum(c.nbytes for c in cache)
    assert sizing.kv_bytes(s, "k4v4", 10**6) - sizing.kv_bytes(s, "k4v4", 10**5) == (
        sizing.layer_bytes("k4v4", 10**6, 1, 256) - sizing.layer_bytes("k4v4", 10**5, 1, 256))


def test_planner_rows_for_sliding_layers(tmp_path, capsys):
    """--kv SPEC/keep and SPEC/SPEC size the window layers as make_prompt_cache
    makes them; the default rows give them the spec with 8-bit keys."""
    config = dict(TINY["gemma3_text"], model_type="gemma3_text", sliding_window=512)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    s = shapes.load_shape(str(path))
    p = plan.run(["--model", str(path), "--memory", "1GB", "--contexts", "2K,8K",
                  "--kv", "k4v4/keep", "k4v4/k2v2", "k4v4/same"])
    rows = {short_label(r.spec): r for r in p.rows}
    for name, sliding in (("k4v4/keep", "keep"), ("k4v4/k2v2", "k2v2"), ("k4v4/same", "same"),
                          ("k4v4", "auto")):
        for c in (2048, 8192):
            assert rows[name].per_token[c] == sizing.kv_bytes(s, "k4v4", c, sliding) / c
    assert sizing.sliding_specs(s, "k4v4") == (window_spec("k8v4", 512),) * 2
    assert rows["k4v4/keep"].per_token[8192] > rows["k4v4"].per_token[8192] > \
        rows["k4v4/same"].per_token[8192] > rows["k4v4/k2v2"].per_token[8192]
    out = capsys.readouterr().out
    assert "k4v4/keep: K 4-bit" in out and "sliding-window layers in full precision" in out
    with pytest.raises(SystemExit):
        plan.run(["--memory", "1GB", "--kv", "k4v4/keep"])  # the default model has no windows
    assert "has no sliding-window layers" in capsys.readouterr().err


def test_parse_memory():
    assert units.parse_memory("16GB") == units.parse_memory("16 GiB") == 16 << 30
    assert units.parse_memory("512m") == 512 << 20
    assert units.parse_memory("1.5T") == 3 << 39
    assert units.parse_memory("17179869184") == 16 << 30
    for bad in ("lots", "16 XB", "", "-1GB", "0"):
        with pytest.raises(ValueError):
            units.parse_memory(bad)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "no_such_arch", "num_hidden_layers": 2, "num_attention_heads": 2,
      "hidden_size": 64}, "no_such_arch"),
    ({"model_type": "llama", "hidden_size": 64}, "num_hidden_layers"),
    ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}, "model_type"),
])
def test_bad_configs(tmp_path, config, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(shapes.PlanError, match=message):
        shapes.load_shape(str(path))


def test_bad_inputs_from_the_cli(tmp_path, shape, capsys):
    with pytest.raises(shapes.PlanError, match="does not exceed the weights"):
        plan.make_plan(shape, plan.PRECISIONS, 100 << 20)
    (tmp_path / "bad.json").write_text("{not json")
    for argv, message in ((["--memory", "sixteen"], "cannot parse memory"),
                          (["--memory", "100MB"], "does not exceed the weights"),
                          (["--model", str(tmp_path / "bad.json")], "not a JSON config"),
                          (["--model", str(tmp_path / "missing")], "neither a folder"),
                          (["--kv", "k9v9"], "k_bits=9")):
        with pytest.raises(SystemExit) as e:
            plan.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_admit_says_what_fits(shape):
    memory = sizing.memory_needed(shape, "k4v4", [100_000])
    sizing.admit(shape, "k4v4", 100_000, memory)
    with pytest.raises(shapes.PlanError) as e:
        sizing.admit(shape, "k4v4", 120_000, memory)
    msg = str(e.value)
    fit = sizing.capacity(shape, "k4v4", memory, concurrency=1)
    assert 100_000 <= fit < 120_000 and f"at most {fit} tokens fit" in msg
    assert "--kv k2v2" in msg and "--kv k4v2" in msg  # both hold 120K in that memory


def test_quality_columns_from_eval_json(tmp_path, capsys):
    from mlx_kvq.commands import evaluate

    path = tmp_path / "e.json"
    results, _ = evaluate.run(["--text", str(mlx_kvq.commands.corpus.SAMPLE), "--kv", "k4v4", "k3v3-rot",
                               "mlx4", "--window", "128", "--chunk", "64", "--windows", "1",
                               "--json", str(path)])
    capsys.readouterr()
    p = plan.run(["--memory", "16GB", "--quality", str(path), "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if " | " in line}
    assert rows["k4v4"][2] == f"{results['k4v4'].kld_mean:.2g}"
    assert rows["k3v3-rot"][3] == f"{results['k3v3-rot'].top1:.3f}"  # planned because measured
    assert rows["k8v8"][2:4] == ["-", "-"] and rows["fp16"][2:4] == ["ref", "ref"]
    assert "mlx4" not in rows and f"quality:    {path}: KLD" in out
    saved = json.loads((tmp_path / "p.json").read_text())
    assert {r["name"]: r["quality"] is not None for r in saved["rows"]}["k3v3-rot"]
    assert [r for r in p.rows if r.spec.rotate][0].quality["scheme"] == "k3v3-rot"
    (tmp_path / "bad.json").write_text('{"results": []}')
    with pytest.raises(SystemExit):
        plan.run(["--quality", str(tmp_path / "bad.json")])
    assert "not a JSON file written by mlx_kvq.eval --json" in capsys.readouterr().err


def test_decode_bytes_read():
    """What a decode step reads, from the cache's own layouts."""
    n, D = 4096, 128
    fp16 = 2 * n * D * 2
    assert sizing.decode_bytes_read("fp16", head_dim=D, n_tokens=n) == fp16
    # 4-bit codes + fp16 scale and bias per 64 elements, for K and for V.
    assert sizing.decode_bytes_read("k4v4-g64-r0-s0", head_dim=D, n_tokens=n) == \
        2 * (n * D // 2 + n * D // 64 * 4)
    assert sizing.decode_bytes_read("k4v2-g64-r0-s0", head_dim=D, n_tokens=n, n_kv_heads=8,
                                    batch=2) == 16 * (n * D // 2 + n * D // 4 + 2 * (n * D // 64 * 4))
    assert sizing.decode_bytes_read("k8v8", head_dim=D, n_tokens=10) == 2 * 10 * D * 2
    # A spec keeps sinks + residual (+ an incomplete group) in fp16.
    from mlx_kvq.spec import KVQuantSpec

    spec = KVQuantSpec(k_bits=4, v_bits=2, group_size=32, residual=64, sinks=4)
    n_q = (n - 68) // 32 * 32
    want = n_q * D // 2 + n_q * D // 4 + 2 * (n_q * D // 32 * 4) + 2 * (n - n_q) * D * 2
    assert sizing.decode_bytes_read(spec, head_dim=D, n_tokens=n) == want
    assert sizing.decode_bytes_read("k4v2-g32-r64-s4", head_dim=D, n_tokens=n) == want
    assert sizing.decode_bytes_read(spec, head_dim=D, n_tokens=50) == 2 * 50 * D * 2


# -- a model sharded over several machines -----------------------------------------

CONFIGS = __import__("pathlib").Path(__file__).resolve().parent / "configs"


@pytest.fixture(scope="module")
def llama70b():
    return shapes.load_shape(str(CONFIGS / "llama3_70b.json"))


@pytest.fixture(scope="module")
def deepseek_v2():
    return shapes.load_shape(str(CONFIGS / "deepseek_v2.json"))


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_tensor_rank_holds_one_nth(llama70b, ranks):
    s = llama70b
    part = sizing.rank_shape(s, "tensor", ranks)
    assert (part.n_kv_heads, part.n_heads) == (8 // ranks, 64 // ranks)
    for spec in ("fp16", "k4v4", "k2v2"):
        for context in (1, 4096, 100_000, 131072):
            assert sizing.kv_bytes(part, spec, context) * ranks == sizing.kv_bytes(s, spec, context)
    shared = s.weight_bytes - sum(s.layer_weight_bytes)
    # the embeddings and the untied head (2 x vocab x hidden x bf16) stay whole on each rank
    assert shared == 2 * 128256 * 8192 * 2 + 8192 * 2  # plus the final norm
    assert abs(part.weight_bytes - (shared + (s.weight_bytes - shared) / ranks)) <= s.n_layers


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_pipeline_rank_holds_its_layers(deepseek_v2, ranks):
    s = deepseek_v2
    parts = [sizing.rank_shape(s, "pipeline", ranks, r) for r in range(ranks)]
    assert sum(p.n_layers for p in parts) == s.n_layers == 60
    per_layer = sizing.kv_bytes(s, "k4v4", 8192) // s.n_layers
    for p in parts:
        assert sizing.kv_bytes(p, "k4v4", 8192) == per_layer * p.n_layers
    shared = s.weight_bytes - sum(s.layer_weight_bytes)
    assert sum(p.weight_bytes for p in parts) == s.weight_bytes + (ranks - 1) * shared


def test_pipeline_split_is_mlx_lms():
    from mlx_lm.models.pipeline import PipelineMixin

    class Group:  # what PipelineMixin.pipeline reads of an mx.distributed.Group
        def __init__(self, rank, size):
            self.rank, self.size = (lambda: rank), (lambda: size)

    for n_layers, ranks in ((4, 2), (4, 3), (61, 4), (7, 7)):
        for r in range(ranks):
            m = PipelineMixin.__new__(PipelineMixin)
            m.layers = list(range(n_layers))
            PipelineMixin.pipeline(m, Group(r, ranks))
            assert sizing.pipeline_layers(n_layers, ranks, r) == range(m.start_idx, m.end_idx)


def test_plan_over_ranks(tmp_path, capsys, llama70b):
    path = str(CONFIGS / "llama3_70b.json")
    p = plan.run(["--model", path, "--ranks", "2", "--memory-per-rank", "192GB",
                  "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert "192.00 GiB per rank x 2 ranks, --sharding tensor" in out
    assert "rank 1:     kv heads 4 of 8 in each of 80 layers" in out
    k4 = next(r for r in p.rows if str(r.spec).startswith("k4v4"))
    one = sizing.capacity(llama70b, k4.spec, 192 << 30, concurrency=1)
    assert k4.single["max_context"][1] == one  # one machine of 192 GiB holds the weights
    assert k4.max_context[1] > 2 * one  # two hold the weights once each, the cache split
    part = sizing.rank_shape(llama70b, "tensor", 2)
    assert k4.max_chats[8192] == sizing.capacity(part, k4.spec, 192 << 30, context=8192)
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["sharding"]["ranks"] == 2 and len(set(d["sharding"]["ranks_weight_bytes"])) == 1
    # 64 GiB machines: one cannot hold the 131 GiB of weights, four can
    p = plan.run(["--model", path, "--ranks", "4", "--memory-per-rank", "64GB"])
    assert all(v == 0 for r in p.rows for v in r.single["max_context"].values())
    assert all(r.max_context[1] > 100_000 for r in p.rows)
    assert "/-" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["llama3_70b.json", "--ranks", "3"], "64 attention heads do not divide among 3 ranks"),
    (["llama3_70b.json", "--ranks", "2", "--sharding", "pipeline"],
     "mlx-lm cannot shard architecture 'llama' with --sharding pipeline (it supports "
     "--sharding tensor); mlx-lm pipeline-shards: "),
    (["deepseek_v3.json", "--ranks", "2", "--sharding", "pipeline"],
     "uses its cached keys/values outside"),
    (["llama3_70b.json", "--ranks", "2", "--memory-per-rank", "64GB"],
     "does not exceed the weights of"),
    (["llama3_70b.json", "--memory", "64GB", "--memory-per-rank", "64GB"], "not both"),
])
def test_plan_over_ranks_refuses(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        plan.main(["--model", str(CONFIGS / argv[0]), *argv[1:]])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
