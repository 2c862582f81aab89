"""Speed and memory of KV caches: `mlx_kvq.bench`.

Model bench (default): for each context length, every scheme in turn (mlx_kvq
specs, mlx-lm's QuantizedKVCache as mlx<bits>, and the full-precision KVCache
as the reference) prefills the same tokens as mlx-lm does (chunks of
--prefill-step, then the last token), then decodes greedily; prefill and
decode tokens/s and the peak memory of each phase (reset per phase) are
measured. Cases are interleaved, so drift in machine speed hits all alike.

--attention: one decode step of attention at synthetic shapes: kvq_attention
over a filled KVQCache vs mx.fast.scaled_dot_product_attention over float32
and float16 K/V vs mlx-lm's quantized_scaled_dot_product_attention; the
achieved bandwidth counts the cache bytes a step must read
(kernels.decode_bytes_read for mlx_kvq, the arrays' sizes for the others).
"""

import argparse
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx_lm
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from tqdm import tqdm

from . import blas, corpus, plan
from .attention import kvq_attention
from .cache import KVQCache
from .cli_types import int_list, nonneg_int, output_file, positive_int, token_list
from .evaluate import MLX_BASELINE, Scheme, default_text, memory_needed
from .kernels import decode_bytes_read
from .models import ModelNotFoundError, describe_weights, load
from .spec import parse_spec

DEFAULT_SCHEMES = ("k4v4", "k4v2", "mlx4")


@dataclass
class ModelCase:
    scheme: str
    context: int
    prefill_tps: float
    decode_tps: float
    prefill_peak: int  # bytes, weights included
    decode_peak: int
    kv_bytes: int


@dataclass
class AttentionCase:
    kind: str
    context: int
    seconds: float  # median of the repeats
    bytes_read: int

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9


def _cache_bytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def _clear():
    gc.collect()
    mx.clear_cache()


def run_case(model, tokens, scheme, context, decode_tokens, prefill_step) -> ModelCase:
    """Prefill `context` tokens into a fresh cache, then decode."""
    cache = Scheme(scheme).make(model)
    x = mx.array(tokens[:context])[None]
    _clear()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for c0 in range(0, context - 1, prefill_step):  # as mlx_lm.generate_step
        model(x[:, c0:min(c0 + prefill_step, context - 1)], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
    y = model(x[:, -1:], cache=cache)[:, -1].argmax(-1)
    mx.eval(y)
    t1 = time.perf_counter()
    prefill_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    for _ in range(decode_tokens):
        y = model(y[:, None], cache=cache)[:, -1].argmax(-1)
        mx.eval(y)
    t2 = time.perf_counter()
    case = ModelCase(scheme, context, context / (t1 - t0),
                     decode_tokens / (t2 - t1) if decode_tokens else 0.0,
                     prefill_peak, mx.get_peak_memory(), _cache_bytes(cache))
    del cache, y
    _clear()
    return case


def bench_model(model, tokens, schemes=DEFAULT_SCHEMES, contexts=(1024, 4096, 8192),
                decode_tokens=32, prefill_step=2048, repeats=1, progress=True):
    """ModelCases for "fp" and every scheme at every context: the best
    speed and the largest peak over `repeats` interleaved rounds."""
    schemes = ["fp"] + [s for s in schemes if s != "fp"]
    if len(tokens) < max(contexts):
        reps = -(-max(contexts) // len(tokens))
        tokens = list(tokens) * reps
    best = {}
    bar = tqdm(total=len(contexts) * repeats * len(schemes), disable=not progress,
               desc="bench")
    for ctx in contexts:
        for _ in range(repeats):
            for s in schemes:
                c = run_case(model, tokens, s, ctx, decode_tokens, prefill_step)
                b = best.setdefault((s, ctx), c)
                b.prefill_tps = max(b.prefill_tps, c.prefill_tps)
                b.decode_tps = max(b.decode_tps, c.decode_tps)
                b.prefill_peak = max(b.prefill_peak, c.prefill_peak)
                b.decode_peak = max(b.decode_peak, c.decode_peak)
                bar.update(1)
    bar.close()
    return list(best.values())


def format_model_table(cases, weights_bytes=0) -> str:
    ref = {c.context: c for c in cases if c.scheme == "fp"}
    head = (f"{'context':>8} {'scheme':<10}{'prefill t/s':>12}{'x fp':>7}{'decode t/s':>12}"
            f"{'x fp':>7}{'peak prefill':>14}{'x fp':>7}{'peak decode':>13}{'x fp':>7}"
            f"{'KV MiB':>9}{'x fp':>7}")
    rows = [head, "-" * len(head)]

    def above(n):  # peak above the weights, which every case holds alike
        return n - weights_bytes

    for c in sorted(cases, key=lambda c: c.context):
        r = ref[c.context]
        rows.append(
            f"{c.context:>8} {c.scheme:<10}{c.prefill_tps:>12.1f}{c.prefill_tps / r.prefill_tps:>7.2f}"
            f"{c.decode_tps:>12.2f}{c.decode_tps / max(r.decode_tps, 1e-9):>7.2f}"
            f"{above(c.prefill_peak) / 2**20:>10.0f} MiB{above(c.prefill_peak) / above(r.prefill_peak):>7.2f}"
            f"{above(c.decode_peak) / 2**20:>9.0f} MiB{above(c.decode_peak) / above(r.decode_peak):>7.2f}"
            f"{c.kv_bytes / 2**20:>9.1f}{c.kv_bytes / r.kv_bytes:>7.2f}"
        )
    return "\n".join(rows)


# -- attention microbenchmark ---------------------------------------------------


def _time(fn, repeats):
    mx.eval(fn())  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _filled_kvq(spec, keys, values, step=4096):
    cache = KVQCache(spec)
    for a in range(0, keys.shape[2], step):
        cache.update_and_fetch(keys[:, :, a:a + step], values[:, :, a:a + step])
        mx.eval(cache.state)
    return cache


def bench_attention(contexts=(1024, 4096, 16384, 32768), specs=("k4v4", "k4v2", "k8v8"),
                    mlx_bits=(4, 8), n_heads=32, n_kv_heads=8, head_dim=128,
                    repeats=20, group_size=64, mlx_dtype=None, progress=True):
    """AttentionCases for one decode step (one query per q head) per context.

    mlx_dtype: of the queries and K/V mlx-lm's quantized attention gets;
    default float16 on the GPU, float32 on the CPU (which has no float16
    arithmetic: measured 50x slower there)."""
    if mlx_dtype is None:
        mlx_dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    H, D = n_kv_heads, head_dim
    scale = D ** -0.5
    cases = []
    bar = tqdm(total=len(contexts) * (2 + len(specs) + len(mlx_bits)),
               disable=not progress, desc="attention")
    for T in contexts:
        mx.random.seed(0)
        q = mx.random.normal((1, n_heads, 1, D))
        k = mx.random.normal((1, H, T, D))
        v = mx.random.normal((1, H, T, D))
        mx.eval(q, k, v)
        for dtype in (mx.float32, mx.float16):
            qd, kd, vd = q.astype(dtype), k.astype(dtype), v.astype(dtype)
            mx.eval(qd, kd, vd)
            sec = _time(lambda: mx.fast.scaled_dot_product_attention(
                qd, kd, vd, scale=scale, mask=None), repeats)
            cases.append(AttentionCase(f"sdpa {_dtype_name(dtype)}", T, sec,
                                       kd.nbytes + vd.nbytes))
            bar.update(1)
        for spec in map(parse_spec, specs):
            cache = _filled_kvq(spec, k, v)
            sec = _time(lambda c=cache: kvq_attention(q, c, scale=scale), repeats)
            nbytes = decode_bytes_read(spec, head_dim=D, n_tokens=T, n_kv_heads=H)
            label = next((s for s in specs if parse_spec(s) == spec), str(spec))
            cases.append(AttentionCase(f"kvq {label}", T, sec, nbytes))
            del cache
            bar.update(1)
        qd = q.astype(mlx_dtype)
        for bits in mlx_bits:
            qk = mx.quantize(k.astype(mlx_dtype), group_size=group_size, bits=bits)
            qv = mx.quantize(v.astype(mlx_dtype), group_size=group_size, bits=bits)
            mx.eval(qd, qk, qv)
            sec = _time(lambda: quantized_scaled_dot_product_attention(
                qd, qk, qv, scale=scale, mask=None, group_size=group_size, bits=bits),
                repeats)
            cases.append(AttentionCase(f"mlx-lm q{bits} {_dtype_name(mlx_dtype)}", T, sec,
                                       sum(a.nbytes for a in (*qk, *qv))))
            bar.update(1)
        del k, v
        _clear()
    bar.close()
    return cases


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def format_attention_table(cases) -> str:
    """Time per step, and as a ratio to sdpa over float32 and float16 K/V."""
    ref = {(c.kind, c.context): c.seconds for c in cases if c.kind.startswith("sdpa")}
    head = (f"{'context':>8} {'attention':<22}{'µs/step':>10}{'x sdpa32':>10}{'x sdpa16':>10}"
            f"{'MiB read':>10}{'GB/s':>8}")
    rows = [head, "-" * len(head)]
    for c in sorted(cases, key=lambda c: c.context):
        rows.append(f"{c.context:>8} {c.kind:<22}{c.seconds * 1e6:>10.0f}"
                    f"{c.seconds / ref['sdpa float32', c.context]:>10.2f}"
                    f"{c.seconds / ref['sdpa float16', c.context]:>10.2f}"
                    f"{c.bytes_read / 2**20:>10.1f}{c.gbps:>8.2f}")
    return "\n".join(rows)


def _environment() -> str:
    return (f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, python "
            f"{platform.python_version()}, device {mx.default_device()}, BLAS {blas.status}")


def run(argv=None):
    """The CLI; returns its results for callers."""
    p = argparse.ArgumentParser(description="Speed and memory of quantized KV caches")
    p.add_argument("--model", default=None,
                   help="Model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--kv", nargs="+", default=list(DEFAULT_SCHEMES),
                   help="mlx_kvq specs/presets, and mlx-lm baselines as mlx<bits>[-g<group>]; "
                   "the full-precision KVCache is always the reference")
    p.add_argument("--contexts", type=token_list, default=None,
                   help="Comma-separated context lengths (default 1024,4096,8192; "
                   "with --attention 1024,4096,16384,32768)")
    p.add_argument("--decode-tokens", type=nonneg_int, default=32)
    p.add_argument("--prefill-step", type=positive_int, default=2048)
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="Interleaved rounds (model bench, default 1) or timed calls "
                   "(--attention, default 20)")
    p.add_argument("--attention", action="store_true",
                   help="Microbenchmark decode attention at synthetic shapes instead")
    p.add_argument("--heads", type=positive_int, default=32, help="q heads (--attention)")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="kv heads (--attention)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="(--attention)")
    p.add_argument("--mlx-bits", type=int_list, default=(4, 8),
                   help="mlx-lm quantized attention bits (--attention)")
    p.add_argument("--mlx-dtype", choices=("float16", "float32"), default=None,
                   help="dtype for mlx-lm's quantized attention (--attention; default "
                   "float32 on the CPU, float16 on the GPU)")
    p.add_argument("--json", type=output_file, default=None,
                   help="Write the measurements as JSON here")
    p.add_argument("--plot", default=None, help="Write PNG plots into this folder")
    args = p.parse_args(argv)
    try:
        for name in [*args.kv, *(f"mlx{b}" for b in args.mlx_bits * args.attention)]:
            Scheme(name).validate()
        if args.attention and args.heads % args.kv_heads:
            raise ValueError(f"--heads {args.heads} is not a multiple of --kv-heads "
                             f"{args.kv_heads}")
        for name in args.kv * args.attention:
            if not MLX_BASELINE.match(name):
                parse_spec(name).validate_for(args.head_dim)
    except ValueError as e:
        p.error(str(e))

    if args.attention:
        specs = [s for s in args.kv if not MLX_BASELINE.match(s)]
        cases = bench_attention(args.contexts or (1024, 4096, 16384, 32768), specs,
                                args.mlx_bits, args.heads, args.kv_heads, args.head_dim,
                                repeats=args.repeats or 20,
                                mlx_dtype=args.mlx_dtype and getattr(mx, args.mlx_dtype))
        print(f"==== decode attention: {args.heads} q heads, {args.kv_heads} kv heads, "
              f"head_dim {args.head_dim}, batch 1, one query token")
        print(format_attention_table(cases))
        weights = 0
    else:
        contexts = args.contexts or (1024, 4096, 8192)
        try:
            model, tokenizer = load(args.model)  # first: downloads or converts the model
        except ModelNotFoundError as e:
            p.error(str(e))
        try:  # one case at a time; the fp reference at the longest context is largest
            shape = plan.load_shape(args.model)
            for name in args.kv:
                Scheme(name).validate(shape, model)
            need = memory_needed(shape, ["fp", *args.kv], max(contexts), args.prefill_step,
                                 at_once=False)
        except ValueError as e:  # PlanError included
            p.error(str(e))
        if need > plan.total_memory():
            p.error(f"--contexts {max(contexts)}: the full-precision reference needs "
                    f"{plan.fmt_bytes(need)}, more than this machine's "
                    f"{plan.fmt_bytes(plan.total_memory())}")
        _clear()
        weights = mx.get_active_memory()
        text, _ = default_text(corpus)
        # Tokenizing the whole corpus is slow; English runs ~4 characters a token.
        tokens = tokenizer.encode(text[:8 * max(contexts)])
        cases = bench_model(model, tokens, args.kv, contexts, args.decode_tokens,
                            args.prefill_step, args.repeats or 1)
        print(f"==== model bench: {args.model or 'SmolLM2-135M-Instruct (embedded)'}, "
              f"{describe_weights(args.model)}, weights {weights / 2**20:.0f} MiB "
              f"(peaks below are above the weights); prefill step {args.prefill_step}, "
              f"{args.decode_tokens} decode tokens; fp = mlx-lm KVCache in the model dtype")
        print(format_model_table(cases, weights))
    print(f"software: {_environment()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "attention" if args.attention else "model",
                       "weights_bytes": weights, "environment": _environment(),
                       "cases": [asdict(c) for c in cases]}, f, indent=1)
    if args.plot:
        from . import plots

        for path in plots.bench_plots(cases, args.plot):
            print(f"plot: {path}")
    return cases


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
