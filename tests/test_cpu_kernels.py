"""The native CPU decode-attention kernel (mlx_kvq.cpu_kernels).

Held equal to a float64 computation from the raw packed codes (the oracle the
Metal kernel is held to) on randomized steps: every code width for keys and
values and 16-bit parts, groups 32/64, head dims 64/128/256, GQA 1-8, batches
whose rows hold different counts (empty rows, one-token rows), window first
tokens inside a group, sinks and residuals of every fill level, per-token
keys, learned sink logits, and splits that do not divide the tokens, for 1, 2
and 3 threads. Reads past a row's count hit NaN and hidden window tokens
hold large values, so a kernel that reads what it must not fails. Broken
variants (a merge without rescaling, every row with the first row's count,
the window ignored, a group offset off by one) must fail the same checks.
Then the kernel against the pure-MLX path through real caches (single,
batched, windows, rotation, every spec width) and whole models decoding.
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
from mlx_kvq.cpu_kernels import CHANNEL, FP, TOKEN, build
from mlx_kvq.metal_kernels import decode as kernels

if not cpu_kernels.usable():
    why = cpu_kernels.status()[1]
    if build.missing_tools():
        pytest.skip(f"the native kernel cannot be built here: {why}", allow_module_level=True)
    raise RuntimeError(f"the native CPU kernel is not available although it can be built: "
                       f"{why}; run `python -m mlx_kvq.cpu_kernels.build --verbose`")

RTOL, ATOL = 1e-4, 2e-5


def quantized(x, bits, G):
    c, s, b = mx.quantize(mx.array(x.astype(np.float32)), group_size=G, bits=bits)
    return c, s.astype(mx.float16), b.astype(mx.float16)


def deq(part, bits, G):
    """float64 values of a (codes, scales, biases) triple along the last axis,
    from mx.quantize's LSB-first bit stream."""
    codes, scales, biases = (np.array(p) for p in part)
    stream = np.unpackbits(codes.view(np.uint8), axis=-1, bitorder="little")
    c = stream.reshape(*stream.shape[:-1], -1, bits) @ (1 << np.arange(bits))
    s = np.repeat(scales.astype(np.float64), G, axis=-1)
    b = np.repeat(biases.astype(np.float64), G, axis=-1)
    with np.errstate(invalid="ignore"):  # NaN-poisoned groups
        return c * s + b


def make_step(rng, B, H, R, D, Dv, G, kb, vb, counts, firsts, k_kind=CHANNEL,
              sinks=0, res=0, fp_dtype=np.float16, hi=0, Gv=None):
    """A decode step over [sinks (fp), body, residual (fp)] segments: native
    segments, and the float64 keys/values each row sees. Body tokens past a
    row's count are NaN; tokens before its first are large. hi: per-channel
    keys split by width (the first hi channels at kb + 1); Gv: the values'
    group, if not G."""
    Gv = Gv or G
    counts, firsts = list(counts), list(firsts)
    cap = (max(counts) // G + 2) * G
    k = rng.standard_normal((B, H, cap, D)) + rng.standard_normal((1, 1, 1, D))
    v = rng.standard_normal((B, H, cap, Dv))
    for b in range(B):
        k[b, :, :firsts[b]] = 3.0
        v[b, :, :firsts[b]] = 8.0
        # per-channel keys share scales along tokens: poison whole groups only
        k[b, :, -(-counts[b] // G) * G if k_kind == CHANNEL and kb else counts[b]:] = np.nan
        v[b, :, counts[b]:] = np.nan
    segs, seen = [], [[[] for _ in range(H)] for _ in range(B)]

    def fp_segment(n_per_row, first=None):
        n = max(n_per_row)
        ks = rng.standard_normal((B, H, n + 3, D)).astype(fp_dtype)
        vs = rng.standard_normal((B, H, n + 3, Dv)).astype(fp_dtype)
        for b in range(B):
            ks[b, :, n_per_row[b]:] = np.nan
            vs[b, :, n_per_row[b]:] = np.nan
            for h in range(H):
                seen[b][h].append((ks[b, h, :n_per_row[b]].astype(np.float64),
                                   vs[b, h, :n_per_row[b]].astype(np.float64)))
        segs.append((mx.array(ks), mx.array(vs), FP, None, FP, None, G, tuple(n_per_row),
                     (0,) * B))

    if sinks:
        fp_segment([min(sinks, c + 1) for c in counts])
    if k_kind == CHANNEL and hi:
        kt = k.swapaxes(-1, -2)
        top, rest = quantized(kt[:, :, :hi], kb + 1, G), quantized(kt[:, :, hi:], kb, G)
        kp = top + rest
        kd = np.concatenate([deq(top, kb + 1, G), deq(rest, kb, G)], axis=-2).swapaxes(-1, -2)
    elif k_kind == CHANNEL:
        kp = quantized(k.swapaxes(-1, -2), kb, G) if kb else None
        kd = deq(kp, kb, G).swapaxes(-1, -2) if kb else None
    else:
        kp = quantized(k, kb, G) if kb else None
        kd = deq(kp, kb, G) if kb else None
    vp = quantized(v, vb, Gv) if vb else None
    vd = deq(vp, vb, Gv) if vb else None
    if not kb:
        kp, kd = mx.array(k.astype(fp_dtype)), k.astype(fp_dtype).astype(np.float64)
    if not vb:
        vp, vd = mx.array(v.astype(fp_dtype)), v.astype(fp_dtype).astype(np.float64)
    segs.append((kp, vp, k_kind if kb else FP, kb, TOKEN if vb else FP, vb, (G, Gv),
                 tuple(counts), tuple(firsts), hi))
    for b in range(B):
        for h in range(H):
            seen[b][h].append((kd[b, h, firsts[b]:counts[b]], vd[b, h, firsts[b]:counts[b]]))
    if res:
        fp_segment([(res + 7 * b) % (res + 1) for b in range(B)])
    return segs, seen


def truth(q, seen, sink_logits=None):
    """float64 softmax attention of q [B, H, R, D] over each row's tokens."""
    q = np.array(q).astype(np.float64)
    B, H, R, _ = q.shape
    Dv = seen[0][0][0][1].shape[-1]
    out = np.zeros((B, H, R, Dv))
    for b in range(B):
        for h in range(H):
            k = np.concatenate([s[0] for s in seen[b][h]])
            v = np.concatenate([s[1] for s in seen[b][h]])
            s = q[b, h] @ k.T  # [R, T]
            if sink_logits is not None:
                s = np.concatenate([s, np.array(sink_logits)[h * R:(h + 1) * R, None]], -1)
                v = np.concatenate([v, np.zeros((1, Dv))])
            if s.shape[-1] == 0:
                continue
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (p @ v) / p.sum(-1, keepdims=True)
    return out


WIDTHS = (2, 3, 4, 5, 6, 8, None)  # None: a 16-bit part


def cases():
    """Randomized steps covering every K x V width pair once, with shapes,
    ragged rows, windows, fills, key layouts and splits varied."""
    rng = np.random.default_rng(2026)
    out = []
    for i, (kb, vb) in enumerate((k, v) for k in WIDTHS for v in WIDTHS):
        B = int(rng.integers(1, 4))
        G = (32, 64)[i % 2]
        D = (64, 128, 256)[i % 3]
        Dv = D if i % 5 else 64
        R = (1, 2, 3, 4, 8)[i % 5]
        counts = [int(rng.integers(0, 700)) for _ in range(B)]
        if B > 1:
            counts[i % B] = (0, 1)[i % 2]  # an empty row, a one-token row
        firsts = [int(rng.integers(0, c + 1)) if i % 3 == 0 else 0 for c in counts]
        out.append(dict(B=B, H=int(rng.integers(1, 3)), R=R, D=D, Dv=Dv, G=G, kb=kb, vb=vb,
                        counts=counts, firsts=firsts, k_kind=TOKEN if i % 7 == 3 else CHANNEL,
                        sinks=i % 5, res=(0, 1, 31, 64, 95)[i % 5],
                        split=(0, 100, 37, 513)[i % 4], learned=i % 6 == 0, seed=i))
    return out


def run_case(c, fault=0):
    rng = np.random.default_rng(c["seed"])
    segs, seen = make_step(rng, c["B"], c["H"], c["R"], c["D"], c["Dv"], c["G"], c["kb"],
                           c["vb"], c["counts"], c["firsts"], c["k_kind"], c["sinks"], c["res"],
                           hi=c.get("hi", 0), Gv=c.get("Gv"))
    q = (rng.standard_normal((c["B"], c["H"], c["R"], c["D"])) / np.sqrt(c["D"])).astype(
        np.float32)
    sl = rng.standard_normal(c["H"] * c["R"]).astype(np.float32) if c["learned"] else None
    out = cpu_kernels.decode_attention(mx.array(q), segs, None if sl is None else mx.array(sl),
                                       split_tokens=c["split"], fault=fault)
    return np.array(out), truth(q, seen, sl)


CASES = cases()


def _id(c):
    w = lambda b: b or 16  # noqa: E731
    return (f"k{w(c['kb'])}v{w(c['vb'])}-B{c['B']}H{c['H']}R{c['R']}-D{c['D']}/{c['Dv']}"
            f"-G{c['G']}-n{'_'.join(map(str, c['counts']))}-s{c['split']}")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernel_equals_the_float64_oracle(case):
    out, want = run_case(case)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_the_cases_cover_what_the_kernel_must_hold():
    assert {(c["kb"], c["vb"]) for c in CASES} == {(k, v) for k in WIDTHS for v in WIDTHS}
    assert {c["D"] for c in CASES} == {64, 128, 256} and {c["G"] for c in CASES} == {32, 64}
    assert {c["R"] for c in CASES} == {1, 2, 3, 4, 8}
    assert any(0 in c["counts"] and c["B"] > 1 for c in CASES)
    assert any(1 in c["counts"] for c in CASES)
    assert any(f % c["G"] for c in CASES for f in c["firsts"])  # a window inside a group
    assert {c["sinks"] for c in CASES} == set(range(5)) and any(c["learned"] for c in CASES)
    assert any(c["k_kind"] == TOKEN and c["kb"] for c in CASES)
    assert any(c["split"] and max(c["counts"]) % c["split"] for c in CASES)


# A case each broken variant must fail: several parts per row (merge), a
# ragged batch whose first row is the longest (row counts), a window
# inside a group (window), several groups of different scales (group offset).
BROKEN = dict(B=3, H=2, R=4, D=64, Dv=64, G=32, kb=4, vb=4, counts=[600, 130, 0],
              firsts=[45, 3, 0], k_kind=CHANNEL, sinks=4, res=64, split=100, learned=False,
              seed=7)


@pytest.mark.parametrize("fault", [1, 2, 3, 4], ids=["merge", "row-count", "window",
                                                     "group-offset"])
def test_broken_variants_fail(fault):
    check_faults_fail(run_case, BROKEN, [fault])


def check_faults_fail(run, case, faults):
    """The kernel passes `case` (run(case, fault=0) -> (out, want)) and each
    deliberate fault fails it."""
    out, want = run(case)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    for fault in faults:
        bad, _ = run(case, fault=fault)
        assert not np.allclose(bad, want, rtol=RTOL, atol=ATOL, equal_nan=False), fault


def split_cases():
    """Outlier-channel keys (split by width: every narrow width, 8 to 32
    channels at one bit more) and value groups other than the keys'."""
    rng = np.random.default_rng(24)
    out = []
    for i, (kb, vb) in enumerate([(2, 2), (2, 3), (3, 3), (4, 3), (5, 4), (3, None), (2, 8)]):
        B, D = int(rng.integers(1, 4)), (64, 128, 256)[i % 3]
        counts = [int(rng.integers(1, 700)) for _ in range(B)]
        firsts = [int(rng.integers(0, c)) if i % 2 else 0 for c in counts]
        G, Gv = ((32, 64), (64, 32), (32, 128), (64, 64))[i % 4]
        Gv = min(Gv, D)
        out.append(dict(B=B, H=2, R=(1, 3, 4, 8)[i % 4], D=D, Dv=D, G=G, Gv=Gv, kb=kb, vb=vb,
                        hi=(8, 16, 32)[i % 3], counts=counts, firsts=firsts, k_kind=CHANNEL,
                        sinks=i % 5, res=(0, 31, 64)[i % 3], split=(0, 100, 37)[i % 3],
                        learned=i % 3 == 1, seed=100 + i))
    return out


@pytest.mark.parametrize("case", split_cases(), ids=lambda c: f"hi{c['hi']}-" + _id(c))
def test_split_keys_and_value_groups_equal_the_float64_oracle(case):
    out, want = run_case(case)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_split_keys_broken_variants_fail():
    """Split keys whose second part overwrote the first's scores, or read the
    next group's scales, must not pass."""
    check_faults_fail(run_case, dict(BROKEN, kb=3, hi=16, Gv=64), (4, 5))


def test_threads_one_two_three():
    """The same steps with pools of 1, 2 and 3 threads (a fresh process each:
    the pool is sized once), automatic and forced splits."""
    code = ("import sys, numpy as np; sys.path.insert(0, %r); import test_cpu_kernels as t; "
            "from mlx_kvq import cpu_kernels; print(cpu_kernels.threads()); "
            "errs = [float(np.nanmax(np.abs(np.subtract(*t.run_case(c)))) if c['counts'] else 0) "
            "for c in t.CASES[::4] + [t.BROKEN]]; print(max(errs))") % os.path.dirname(__file__)
    for n in (1, 3):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, MLX_KVQ_THREADS=str(n)), timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        threads, err = run.stdout.split()[-2:]
        assert int(threads) == n and float(err) < 1e-3, run.stdout
    assert cpu_kernels.threads() == int(os.environ.get("MLX_KVQ_THREADS", os.cpu_count()))


def test_bad_input_is_refused_with_what_would_work():
    q = mx.zeros((1, 1, 1, 64))
    k = mx.zeros((1, 1, 8, 64), dtype=mx.float16)
    with pytest.raises(ValueError, match="exceeds its segment's buffer"):
        cpu_kernels.decode_attention(q, [(k, k, FP, None, FP, None, 32, (9,), (0,))])
    with pytest.raises(ValueError, match="bits must be 2, 3, 4, 5, 6 or 8"):
        cpu_kernels.decode_attention(q, [(k, (k, k, k), FP, None, TOKEN, 7, 32, (1,), (0,))])
    with pytest.raises(ValueError, match="head dim"):
        cpu_kernels.decode_attention(mx.zeros((1, 1, 1, 32)),
                                     [(k, k, FP, None, FP, None, 32, (1,), (0,))])


# ---------------------------------------------------------------- real caches
def _fill(cache, n, key, H=2, D=64, Dv=64, B=1):
    k1, k2 = mx.random.split(key)
    cache.update_and_fetch(mx.random.normal((B, H, n, D), key=k1),
                           mx.random.normal((B, H, n, Dv), key=k2))


def _both_paths(monkeypatch, fn):
    out = {}
    for mode in ("mlx", "cpu"):
        monkeypatch.setenv(kernels.ENV_VAR, mode)
        before = attention.paths_run().get("native", 0)
        out[mode] = fn()
        mx.eval(out[mode])
        ran_native = attention.paths_run().get("native", 0) > before
        assert ran_native == (mode == "cpu")
    return out


@pytest.mark.parametrize("spec", ["k4v4", "k2v2-rot", "k3v5-g64", "k8v6", "k6v16", "k16v3",
                                  "k4v4-ktok-rot", "k5v2-r32-s0", "fp16", "k3v3-o8-vg64-rot",
                                  "k2v4-o16-g64-vg32"])
def test_caches_decode_like_the_mlx_path(monkeypatch, spec):
    """A decode step over real caches (one sequence; a ragged batch with an
    empty row; every group of the body and fill of the residual) equals the
    pure-MLX path."""
    for n in (3, 67, 300, 1031):
        cache = KVQCache(spec)
        _fill(cache, n, mx.random.key(n))
        _fill(cache, 1, mx.random.key(n + 1))
        q = mx.random.normal((1, 6, 1, 64), key=mx.random.key(9))
        out = _both_paths(monkeypatch, lambda: attention.kvq_attention(q, cache, 0.125))
        assert float(mx.abs(out["cpu"] - out["mlx"]).max()) < 1e-4, (spec, n)
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
    _fill(batch, 1, mx.random.key(5), B=3)
    q = mx.random.normal((3, 6, 1, 64), key=mx.random.key(10))
    out = _both_paths(monkeypatch, lambda: attention.kvq_attention(q, batch, 0.125))
    assert float(mx.abs(out["cpu"] - out["mlx"]).max()) < 1e-4


def test_window_caches_decode_like_the_mlx_path(monkeypatch):
    """Window caches, alone and batched (rows of different lengths), with
    learned sink logits: each row's first visible token inside a group."""
    spec, window = "k4v4-g32-r32-s0", 100
    for n in (50, 150, 261):
        c = KVQCache(spec, window=window)
        _fill(c, n, mx.random.key(n))
        for step in range(3):
            _fill(c, 1, mx.random.key(1000 + step))
            q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(step))
            sinks = mx.random.normal((4,), key=mx.random.key(77))
            out = _both_paths(monkeypatch,
                              lambda: attention.kvq_attention(q, c, 0.125, sinks=sinks))
            assert float(mx.abs(out["cpu"] - out["mlx"]).max()) < 1e-4
    rows = []
    for n in (150, 230, 100):
        c = KVQCache(spec, window=window)
        _fill(c, n, mx.random.key(n))
        rows.append(c)
    batch = KVQBatchCache.merge(rows)
    for step in range(3):
        _fill(batch, 1, mx.random.key(2000 + step), B=3)
        q = mx.random.normal((3, 4, 1, 64), key=mx.random.key(step))
        out = _both_paths(monkeypatch, lambda: attention.kvq_attention(q, batch, 0.125))
        assert float(mx.abs(out["cpu"] - out["mlx"]).max()) < 1e-4


def test_disabled_extension_leaves_a_working_install():
    """MLX_KVQ_NATIVE=0 stands for a missing or failed build: the status
    says why, the default path is the pure-MLX one, and a model decodes."""
    code = ("import mlx_kvq, mlx.core as mx; from mlx_kvq import attention, cpu_kernels; "
            "from mlx_lm.models import llama; "
            "m = llama.Model(llama.ModelArgs.from_dict(dict(model_type='llama', hidden_size=64, "
            "num_hidden_layers=1, intermediate_size=64, num_attention_heads=2, "
            "num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=64))); "
            "c = mlx_kvq.make_prompt_cache(m, 'k4v4'); m(mx.array([[1, 2, 3]]), cache=c); "
            "mx.eval(m(mx.array([[4]]), cache=c)); "
            "print(cpu_kernels.status()[1]); print(attention.path()); "
            "print(attention.describe_path()); print(attention.paths_run())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, MLX_KVQ_NATIVE="0"), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    status, path, described, runs = run.stdout.strip().splitlines()[-4:]
    assert "disabled by MLX_KVQ_NATIVE=0" in status and path == "mlx"
    assert "native CPU kernel disabled" in described
    assert "'mlx'" in runs and "native" not in runs
    env = dict(os.environ, MLX_KVQ_NATIVE="0", MLX_KVQ_KERNELS="cpu")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode != 0 and "MLX_KVQ_KERNELS=mlx runs the pure-MLX path" in run.stderr


# ---------------------------------------------------------------- models
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "gemma3_text", "phi", "gpt2",
                                  "youtu_llm", "gpt_oss"])
def test_models_generate_the_same_tokens_on_both_paths(monkeypatch, arch):
    """At temperature 0, random-weight models of every architecture in the
    matrix (sliding-window layers, learned sinks, MLA value dims, GQA 1-4)
    generate through the native kernels (prefill and decode) what they
    generate through the pure-MLX path, alone and batched (rows joining at different steps), or
    differ first at a step whose top-2 log-probs are within 1e-3."""
    from conftest import tiny_model
    from test_batch import SPEC, assert_same_or_near_tie, prompts_of, run_batch, solo

    model = tiny_model(arch)
    prompts = prompts_of([90, 150, 20], seed=3)
    runs = {}
    for mode in ("mlx", "cpu"):
        monkeypatch.setenv(kernels.ENV_VAR, mode)
        before = attention.paths_run().get("native", 0)
        before_prefill = attention.prefill_paths_run().get("native", 0)
        alone = [solo(model, p, 10, SPEC) for p in prompts]
        batched, _ = run_batch(model, prompts, [10] * 3, [0, 0, 3])
        runs[mode] = alone, batched
        assert (attention.paths_run().get("native", 0) > before) == (mode == "cpu")
        assert (attention.prefill_paths_run().get("native", 0) > before_prefill) == (
            mode == "cpu")
    for i in range(len(prompts)):
        want, gaps, _ = runs["mlx"][0][i]
        assert_same_or_near_tie(runs["cpu"][0][i][0], want, gaps, f"{arch} prompt {i} alone")
        assert_same_or_near_tie(runs["cpu"][1][i], want, gaps, f"{arch} prompt {i} batched")


def test_embedded_model_generates_the_same_tokens_on_both_paths(monkeypatch):
    from mlx_kvq.models import default_model_dir
    from test_batch import assert_same_or_near_tie, solo

    if not (default_model_dir() / "config.json").is_file():
        pytest.skip("the default model is not converted (setup.sh converts it)")
    model, tokenizer = mlx_kvq.load()
    prompt = tokenizer.encode("Write a short story about a lighthouse keeper. " * 12)
    runs = {}
    for mode in ("mlx", "cpu"):
        monkeypatch.setenv(kernels.ENV_VAR, mode)
        runs[mode] = solo(model, prompt, 24, "k4v4")
    want, gaps, _ = runs["mlx"]
    assert_same_or_near_tie(runs["cpu"][0], want, gaps, "embedded model")
