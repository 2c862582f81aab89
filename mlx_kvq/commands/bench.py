"""Speed and memory of KV caches: `mlx_kvq.bench`.

Model bench (default): for each context length, every scheme in turn (mlx_kvq
specs, mlx-lm's QuantizedKVCache as mlx<bits>, and the full-precision KVCache
as the reference) prefills the same tokens as mlx-lm does (chunks of
--prefill-step, then the last token), then decodes greedily; prefill and
decode tokens/s and the peak memory of each phase (reset per phase) are
measured. Cases are interleaved, so drift in machine speed hits all alike.

--attention: the decode attention microbenchmark (bench_attention.py).

--concurrency 1,4,8,16: N concurrent chats through mlx-lm's own batch
machinery. For each N, each scheme in turn (every --kv mlx_kvq spec, and
always the full-precision peer: mlx-lm's BatchKVCache in the model dtype),
interleaved as the model bench is. Each chat gets its own document: N
consecutive --context-token slices of the bench corpus, used as the prompts
as they are (no chat template, so every chat's prompt is exactly --context
tokens). The N prompts are inserted together into one BatchGenerator, with
per-chat caches from make_batch_prompt_caches (none for the fp peer: mlx-lm
makes its KVCaches), prefill chunks of --prefill-step-size and every chat
prefilled in the same batch (prefill and completion batch sizes = N), greedy
sampling and no stop tokens, so each chat generates exactly --max-tokens.
One short untimed chat per scheme first takes the one-time costs.
One run per case measures, from the times the generator hands out tokens:
  decode t/s  aggregate: tokens generated after the first decode step over
              the time from it to the last (prefill excluded);
  e2e t/s     all generated tokens over the time from insert to the last;
  TTFT        per chat, insert to its first token: median and p95;
  peak        mx.get_peak_memory above the weights (reset per case);
  KV/chat     nbytes of each chat's cache as its final response returns it
              (the cache extracted from the batch), averaged over the chats.
Below the table, from the same run: each scheme's decode t/s at each N over
its own rate at the smallest N (N=1 normally), and over the fp peer's at the
same N. Before any work, N chats of the fp peer (prompt + generated tokens,
plus N times a one-chat prefill workspace) must fit this machine's memory:
the model bench's check (evaluate.schemes_memory), scaled by N.
mlx-lm's QuantizedKVCache has no batched form in mlx-lm 0.32 and is refused.
"""

import argparse
import gc
import json
import platform
import os
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from tqdm import tqdm

from mlx_kvq import blas, sizing, units
from . import corpus
from mlx_kvq.attention import describe_path
from .bench_attention import _dtype_name, bench_attention, format_attention_table
from .cli_types import (add_model, add_prefill_step_size, int_list, nonneg_int, output_file,
                        positive_int, token_list)
from .cli_types import tokens as token_count
from .evaluate import default_text, load_for_schemes, schemes_memory
from .schemes import Scheme
from mlx_kvq.integration import make_batch_prompt_caches, prefill
from mlx_kvq.models import DEFAULT_MODEL, describe_weights
from mlx_kvq.spec import parse_spec

DEFAULT_SCHEMES = ("k4v4", "k4v2", "mlx4")
CONCURRENCY_SCHEMES = ("k4v4", "k4v2")  # mlx-lm's QuantizedKVCache has no batched form


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
class ConcurrencyCase:
    scheme: str
    chats: int
    context: int  # prompt tokens of each chat
    generated: list  # tokens each chat generated
    decode_tps: float  # aggregate: after the first decode step, to the last
    e2e_tps: float  # aggregate: from insert (prefill included) to the last token
    ttft_median: float  # seconds, insert to a chat's first token
    ttft_p95: float
    peak: int  # bytes above the weights
    kv_bytes_per_chat: float  # mean nbytes of the chats' final caches


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
    prefill(model, cache, x[0, :-1], prefill_step)
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


def stream_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s by a streaming copy (read + write, as
    STREAM counts it) on every core: the best of `repeats`."""
    src = np.ones((mib << 20) // 8)
    dst = np.empty_like(src)
    cuts = np.linspace(0, src.size, (os.cpu_count() or 1) + 1).astype(int)

    def copy(a, b):
        np.copyto(dst[a:b], src[a:b])  # releases the GIL

    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=copy, args=ab) for ab in zip(cuts[:-1], cuts[1:])]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def step_bytes(case, weights_bytes: int) -> int:
    """Bytes a decode step reads: the weights and the whole KV cache."""
    return weights_bytes + case.kv_bytes


def format_model_table(cases, weights_bytes=0, bandwidth=None) -> str:
    """With `bandwidth` (bytes/s), the last columns are what a decode step
    reads (weights + KV) per second, and its fraction of the bandwidth."""
    ref = {c.context: c for c in cases if c.scheme == "fp"}
    head = (f"{'context':>8} {'scheme':<10}{'prefill t/s':>12}{'x fp':>7}{'decode t/s':>12}"
            f"{'x fp':>7}{'peak prefill':>14}{'x fp':>7}{'peak decode':>13}{'x fp':>7}"
            f"{'KV MiB':>9}{'x fp':>7}" + (f"{'read GB/s':>11}{'x bw':>6}" if bandwidth else ""))
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
            + (f"{step_bytes(c, weights_bytes) * c.decode_tps / 1e9:>11.2f}"
               f"{step_bytes(c, weights_bytes) * c.decode_tps / bandwidth:>6.2f}"
               if bandwidth else "")
        )
    return "\n".join(rows)


# -- concurrent chats through mlx-lm's BatchGenerator ----------------------------


def fp_peer_name(model) -> str:
    """The full-precision peer: mlx-lm's BatchKVCache, which holds K/V in the
    dtype of the model's activations (its floating-point parameters')."""
    dtypes = (v.dtype for _, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating))
    return f"fp (mlx-lm BatchKVCache {_dtype_name(next(dtypes, mx.float32))})"


def _is_fp(scheme: str) -> bool:
    return scheme == "fp" or scheme.startswith("fp (")


def chat_prompts(tokens, chats: int, context: int) -> list:
    """One document per chat: consecutive `context`-token slices of the
    corpus tokens (repeated from an offset if the corpus is too short)."""
    tokens = list(tokens)
    if len(tokens) < chats * context:
        tokens = tokens * -(-chats * context // len(tokens))
    return [tokens[i * context:(i + 1) * context] for i in range(chats)]


def _batch_caches(model, scheme, chats):
    """Per-chat prompt caches for BatchGenerator.insert; None for the fp peer
    (mlx-lm then makes its own KVCaches and merges them into BatchKVCache)."""
    if _is_fp(scheme):
        return None
    return make_batch_prompt_caches(model, chats, None if scheme == "calibrated" else
                                    parse_spec(scheme))


def _drain(gen, chats):
    """Step the generator until every chat has finished: the times each
    chat's tokens arrived, and each chat's cache from its final response."""
    arrivals, finals = defaultdict(list), {}
    while len(finals) < chats:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            arrivals[r.uid].append(now)
            if r.finish_reason is not None:
                finals[r.uid] = r.prompt_cache
    return arrivals, finals


def _rates(arrivals, t_insert):
    """(decode t/s, end-to-end t/s, TTFTs) from token arrival times."""
    times = sorted(t for ts in arrivals.values() for t in ts)
    first, last = times[0], times[-1]
    after_first = sum(t > first for t in times)
    decode = after_first / (last - first) if last > first else 0.0
    return decode, len(times) / (last - t_insert), [ts[0] - t_insert for ts in arrivals.values()]


def run_concurrency_case(model, prompts, scheme, max_tokens, prefill_step, weights=0,
                         name=None) -> ConcurrencyCase:
    """All `prompts` inserted at once into one BatchGenerator; each chat
    generates exactly `max_tokens` greedy tokens (no stop tokens)."""
    n = len(prompts)
    _clear()
    mx.reset_peak_memory()
    caches = _batch_caches(model, scheme, n)
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=None,
                         prefill_step_size=prefill_step, prefill_batch_size=n,
                         completion_batch_size=n)
    t0 = time.perf_counter()
    uids = gen.insert(prompts, [max_tokens] * n, caches=caches)
    arrivals, finals = _drain(gen, n)
    gen.close()
    decode, e2e, ttft = _rates(arrivals, t0)
    case = ConcurrencyCase(
        name or scheme, n, len(prompts[0]), [len(arrivals[u]) for u in uids], decode, e2e,
        statistics.median(ttft), float(np.percentile(ttft, 95)),
        mx.get_peak_memory() - weights,
        statistics.mean(_cache_bytes(finals[u]) for u in uids))
    del gen, caches, finals
    _clear()
    return case


def bench_concurrency(model, tokens, schemes=CONCURRENCY_SCHEMES, concurrency=(1, 4, 8, 16),
                      context=1024, max_tokens=64, prefill_step=2048, weights=0,
                      progress=True):
    """ConcurrencyCases for the fp peer and every scheme at every N, run
    interleaved (for N: for scheme) over the same N documents."""
    fp = fp_peer_name(model)
    schemes = ["fp"] + [s for s in schemes if not _is_fp(s)]
    for s in schemes:  # untimed: the first case would pay one-time costs alone
        run_concurrency_case(model, chat_prompts(tokens, 1, min(context, 32)), s, 2,
                             prefill_step)
    bar = tqdm(total=len(concurrency) * len(schemes), disable=not progress,
               desc="concurrency")
    cases = []
    for n in concurrency:
        prompts = chat_prompts(tokens, n, context)
        for s in schemes:
            cases.append(run_concurrency_case(model, prompts, s, max_tokens, prefill_step,
                                              weights, fp if s == "fp" else s))
            bar.update(1)
    bar.close()
    return cases


def concurrency_ratios(cases) -> dict:
    """Per scheme and N, aggregate decode t/s over the same scheme's at the
    smallest N ("vs_base"), and over the fp peer's at the same N ("vs_fp")."""
    rate = {(c.scheme, c.chats): c.decode_tps for c in cases}
    fp = {c.chats: c.decode_tps for c in cases if _is_fp(c.scheme)}
    base = min(c.chats for c in cases)
    out = {}
    for c in cases:
        r = out.setdefault(c.scheme, {"base_chats": base, "vs_base": {}, "vs_fp": {}})
        r["vs_base"][c.chats] = c.decode_tps / max(rate[c.scheme, base], 1e-9)
        r["vs_fp"][c.chats] = c.decode_tps / max(fp[c.chats], 1e-9)
    return out


def format_concurrency_table(cases) -> str:
    fp = {c.chats: c for c in cases if _is_fp(c.scheme)}
    w = max(len("scheme"), *(len(c.scheme) for c in cases)) + 2
    head = (f"{'chats':>5}  {'scheme':<{w}}{'decode t/s':>11}{'e2e t/s':>9}"
            f"{'TTFT med s':>12}{'TTFT p95 s':>12}{'peak MiB':>10}{'KV MiB/chat':>13}{'x fp':>7}")
    rows = [head, "-" * len(head)]
    for c in cases:
        rows.append(f"{c.chats:>5}  {c.scheme:<{w}}{c.decode_tps:>11.1f}{c.e2e_tps:>9.1f}"
                    f"{c.ttft_median:>12.2f}{c.ttft_p95:>12.2f}{c.peak / 2**20:>10.0f}"
                    f"{c.kv_bytes_per_chat / 2**20:>13.2f}"
                    f"{c.kv_bytes_per_chat / fp[c.chats].kv_bytes_per_chat:>7.2f}")
    return "\n".join(rows)


def format_concurrency_ratios(cases) -> str:
    ratios = concurrency_ratios(cases)
    ns = sorted({c.chats for c in cases})
    base = ns[0]
    w = max(34, max(len(s) for s in ratios) + 4)
    cols = "".join(f"{f'N={n}':>8}" for n in ns)
    lines = ["aggregate decode t/s ratios, from this run:",
             f"  {f'over the same scheme at N={base}':<{w}}{cols}"]
    lines += [f"    {s:<{w - 2}}" + "".join(f"{r['vs_base'][n]:>8.2f}" for n in ns)
              for s, r in ratios.items()]
    lines.append(f"  {'over the fp peer at the same N':<{w}}{cols}")
    lines += [f"    {s:<{w - 2}}" + "".join(f"{r['vs_fp'][n]:>8.2f}" for n in ns)
              for s, r in ratios.items() if not _is_fp(s)]
    return "\n".join(lines)


def _environment() -> str:
    return (f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, python "
            f"{platform.python_version()}, device {mx.default_device()}, BLAS {blas.status}")


def _parser():
    p = argparse.ArgumentParser(description="Speed and memory of quantized KV caches")
    add_model(p, windowed=True)
    p.add_argument("--kv", nargs="+", default=None,
                   help="mlx_kvq specs/presets, and mlx-lm baselines as mlx<bits>[-g<group>]; "
                   "the full-precision KVCache is always the reference (default "
                   f"{' '.join(DEFAULT_SCHEMES)}; with --concurrency "
                   f"{' '.join(CONCURRENCY_SCHEMES)})")
    p.add_argument("--contexts", type=token_list, default=None,
                   help="Comma-separated context lengths (default 1024,4096,8192; "
                   "with --attention 1024,4096,16384,32768)")
    p.add_argument("--decode-tokens", type=nonneg_int, default=32)
    add_prefill_step_size(p)
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="Interleaved rounds (model bench, default 1) or timed calls "
                   "(--attention, default 20)")
    p.add_argument("--concurrency", type=int_list, default=None,
                   help="Comma-separated numbers of concurrent chats (e.g. 1,4,8,16): "
                   "batched decoding through mlx-lm's BatchGenerator instead")
    p.add_argument("--context", type=token_count, default=1024,
                   help="Prompt tokens of each chat (--concurrency)")
    p.add_argument("--max-tokens", type=positive_int, default=64,
                   help="Tokens each chat generates (--concurrency)")
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
    return p


def _check_concurrency_args(args):
    if args.attention or args.contexts or args.repeats:
        raise ValueError("--concurrency runs one --context once; --attention, --contexts "
                         "and --repeats belong to the other modes")
    if args.max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2 with --concurrency (decode "
                         "is timed from the first generated token to the last)")
    for name in args.kv:
        if Scheme(name).baseline:
            raise ValueError(f"--kv {name}: mlx-lm's QuantizedKVCache has no batched "
                             "form in mlx-lm's BatchGenerator; --concurrency compares "
                             "mlx_kvq specs with the fp BatchKVCache")


def _check_args(p, args):
    """Refuse bad flags with a clear error, before a model is loaded."""
    if args.kv is None:
        args.kv = list(CONCURRENCY_SCHEMES if args.concurrency else DEFAULT_SCHEMES)
    try:
        for name in [*args.kv, *(f"mlx{b}" for b in args.mlx_bits * args.attention)]:
            Scheme(name).validate()
        if args.concurrency:
            _check_concurrency_args(args)
        if args.attention and args.heads % args.kv_heads:
            raise ValueError(f"--heads {args.heads} is not a multiple of --kv-heads "
                             f"{args.kv_heads}")
        for name in args.kv * args.attention:
            if not Scheme(name).baseline:
                parse_spec(name).validate_for(args.head_dim)
    except ValueError as e:
        p.error(str(e))


def _fp_memory_needed(shape, kv, context, prefill_step, chats=1) -> int:
    """The model bench's check (one scheme at a time; the fp reference is
    the largest), with `chats` sequences: each adds its cache and its share
    of a batched prefill chunk's workspace."""
    one = schemes_memory(shape, ["fp", *kv], context, prefill_step, at_once=False)
    return shape.weight_bytes + chats * (one - shape.weight_bytes)


def _load_checked(p, args, context, chats, what):
    """The model, once the schemes apply to it and `chats` sequences of
    `context` tokens with the fp reference fit this machine's memory."""
    model, tokenizer, shape = load_for_schemes(p, args.model, args.kv, args.sliding_window,
                                               args.full_every)
    need = _fp_memory_needed(shape, args.kv, context, args.prefill_step_size, chats)
    if need > sizing.total_memory():
        p.error(f"{what} needs {units.fmt_bytes(need)}, more than this machine's "
                f"{units.fmt_bytes(sizing.total_memory())}")
    return model, tokenizer


def _corpus_tokens(tokenizer, n_tokens):
    """About n_tokens of the bench corpus (fewer if it is shorter), and its name."""
    text, name = default_text(corpus)
    # Tokenizing the whole corpus is slow; English runs ~4 characters a token.
    return tokenizer.encode(text[:8 * n_tokens]), name


def _weights_bytes():
    _clear()
    return mx.get_active_memory()


def _model_name(args):
    return (f"{args.model or DEFAULT_MODEL + ' (embedded)'}, "
            f"{describe_weights(args.model)}")


def _run_attention(args):
    specs = [s for s in args.kv if not Scheme(s).baseline]
    cases = bench_attention(args.contexts or (1024, 4096, 16384, 32768), specs,
                            args.mlx_bits, args.heads, args.kv_heads, args.head_dim,
                            repeats=args.repeats or 20,
                            mlx_dtype=args.mlx_dtype and getattr(mx, args.mlx_dtype))
    print(f"==== decode attention: {args.heads} q heads, {args.kv_heads} kv heads, "
          f"head_dim {args.head_dim}, batch 1, one query token")
    print(format_attention_table(cases))
    return cases, {"kind": "attention", "weights_bytes": 0}


def _run_model(p, args):
    contexts = args.contexts or (1024, 4096, 8192)
    # one case at a time; the fp reference at the longest context is largest
    model, tokenizer = _load_checked(p, args, max(contexts), 1, f"--contexts {max(contexts)}: "
                                     "the full-precision reference")
    weights = _weights_bytes()
    tokens, _ = _corpus_tokens(tokenizer, max(contexts))
    cases = bench_model(model, tokens, args.kv, contexts, args.decode_tokens,
                        args.prefill_step_size, args.repeats or 1)
    bandwidth = stream_bandwidth()
    print(f"==== model bench: {_model_name(args)}, weights {weights / 2**20:.0f} MiB "
          f"(peaks below are above the weights); prefill step {args.prefill_step_size}, "
          f"{args.decode_tokens} decode tokens; fp = mlx-lm KVCache in the model dtype\n"
          f"attention: {describe_path()}; memory bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(streaming copy, this run); read GB/s = (weights + KV) x decode t/s")
    print(format_model_table(cases, weights, bandwidth))
    return cases, {"kind": "model", "weights_bytes": weights, "bandwidth": bandwidth,
                   "attention": describe_path()}


def _run_concurrency(p, args):
    ns, ctx, gen = tuple(dict.fromkeys(args.concurrency)), args.context, args.max_tokens
    model, tokenizer = _load_checked(
        p, args, ctx + gen, max(ns), f"--concurrency {max(ns)} --context {ctx} (+{gen} "
        f"generated): the full-precision peer of {max(ns)} chats")
    weights = _weights_bytes()
    tokens, text = _corpus_tokens(tokenizer, max(ns) * ctx)
    cases = bench_concurrency(model, tokens, args.kv, ns, ctx, gen, args.prefill_step_size,
                              weights)
    disclosure = {
        "model": _model_name(args), "weights_bytes": weights, "corpus": text,
        "chats": list(ns), "context": ctx, "max_tokens": gen,
        "prefill_step_size": args.prefill_step_size, "fp_peer": fp_peer_name(model)}
    disclosure["attention"] = describe_path()
    print(f"==== concurrency bench: {disclosure['model']}, weights {weights / 2**20:.0f} "
          f"MiB (peaks below are above the weights); attention: {describe_path()}\n"
          f"N chats, each its own {ctx}-token document ({text}), inserted together into "
          f"one mlx-lm BatchGenerator: prefill step size {args.prefill_step_size}, all N "
          f"prefilled as one batch; {gen} greedy tokens each, no stop tokens\n"
          f"decode t/s: all chats' tokens after the first decode step / time to the last; "
          f"e2e t/s: from insert, prefill included; TTFT: insert to a chat's first token; "
          f"KV: nbytes of each chat's final cache, x fp = over the fp peer's")
    print(format_concurrency_table(cases))
    print(format_concurrency_ratios(cases))
    return cases, {"kind": "concurrency", "weights_bytes": weights, "disclosure": disclosure,
                   "ratios": concurrency_ratios(cases)}


def run(argv=None):
    """The CLI; returns its results for callers."""
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.attention:
        cases, meta = _run_attention(args)
    elif args.concurrency:
        cases, meta = _run_concurrency(p, args)
    else:
        cases, meta = _run_model(p, args)
    print(f"software: {_environment()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "environment": _environment(),
                       "cases": [asdict(c) for c in cases]}, f, indent=1)
    if args.plot:
        from . import plots

        paths = ([plots.concurrency_plot(cases, args.plot)] if args.concurrency
                 else plots.bench_plots(cases, args.plot))
        for path in paths:
            print(f"plot: {path}")
    return cases


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
