"""Speed and memory of KV caches: `mlx_kvq.bench`, the command line.

Model bench (default): one sequence, prefill then decode, every scheme
against mlx-lm's full-precision KVCache (bench_model.py).

--attention: the decode attention microbenchmark (bench_attention.py).

--concurrency 1,4,8,16: N concurrent chats through mlx-lm's own batch
machinery, against mlx-lm's fp BatchKVCache (bench_concurrency.py).

Before any work, the flags are checked and the fp reference (for N chats:
N of them) must fit this machine's memory.
"""

import argparse
import json
import platform
from dataclasses import asdict

import mlx.core as mx
import mlx_lm

from mlx_kvq import blas, sizing, units
from mlx_kvq.attention import describe_path
from mlx_kvq.models import DEFAULT_MODEL, describe_weights
from mlx_kvq.spec import parse_spec
from . import corpus
from .bench_attention import bench_attention, format_attention_table
from .bench_concurrency import (CONCURRENCY_SCHEMES, bench_concurrency, concurrency_ratios,
                                format_concurrency_ratios, format_concurrency_table,
                                fp_peer_name)
from .bench_model import (DEFAULT_SCHEMES, clear, bench_model, format_model_table,
                          stream_bandwidth)
from .cli_types import (add_model, add_prefill_step_size, int_list, nonneg_int, output_file,
                        positive_int, token_list)
from .cli_types import tokens as token_count
from .evaluate import default_text, load_for_schemes, schemes_memory
from .schemes import Scheme


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
    clear()
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
