"""Generate text with a quantized KV cache: `mlx_kvq.generate`, mirroring mlx_lm.generate."""

import argparse
import sys
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.sample_utils import make_sampler

from mlx_kvq import distributed, shapes, sizing
from mlx_kvq.cache import KVQCache
from mlx_kvq.spec import SLIDING_DEFAULT
from .cli_types import add_model, add_prefill_step_size, add_sharding, positive_int
from mlx_kvq.integration import make_prompt_cache
from mlx_kvq.models import ModelNotFoundError, describe_weights, load
from mlx_kvq.persist import load_prompt_cache, save_prompt_cache
from mlx_kvq.shapes import PlanError
from mlx_kvq.report import format_ranks, format_report, kv_stats
from mlx_kvq.spec import DEFAULT_PRESET, PRESETS, KVQuantSpec

SPEC_FLAGS = ("k_bits", "v_bits", "group_size", "residual", "sinks", "k_outliers", "v_group")


def _bits(text):
    """Bits as given; 16 (or "none") means full precision."""
    return 16 if text.lower() in ("16", "none", "fp16") else int(text)


def setup_arg_parser():
    p = argparse.ArgumentParser(
        description="Generate text with an mlx-lm model and a quantized KV cache."
    )
    add_model(p)
    p.add_argument("--prompt", "-p", default="Hello! Who are you?",
                   help="Prompt text, or '-' to read it from stdin")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--max-kv-size", type=positive_int, default=None,
                   help="Keep at most this many tokens (sinks plus the most recent)")
    add_prefill_step_size(p)
    p.add_argument("--prompt-cache-file", default=None,
                   help="Continue from a saved quantized prompt cache")
    p.add_argument("--save-prompt-cache", default=None,
                   help="Save the quantized prompt cache after generating")
    p.add_argument("--verbose", type=lambda s: s.lower() in ("1", "true", "yes"),
                   default=True, help="Print the KV report (true/false)")
    add_sharding(p, "Rank 0 prints")
    g = p.add_argument_group("KV cache quantization")
    g.add_argument("--kv", default=None,
                   help=f"Preset ({', '.join(PRESETS)}) or label like k4v2-g32-r64-s4; "
                   f"default {DEFAULT_PRESET}")
    g.add_argument("--sliding-kv", default=SLIDING_DEFAULT, metavar="SPEC",
                   help="Sliding-window layers (always without sinks, with a residual that "
                   "fits the window): 'auto' (default: --kv with keys at 8 bits or more), "
                   "'same' as --kv, another spec, or 'keep' for mlx-lm's full-precision "
                   "rotating cache")
    g.add_argument("--k-bits", type=_bits, default=None, help="2-8, or 16 for none")
    g.add_argument("--v-bits", type=_bits, default=None, help="2-8, or 16 for none")
    g.add_argument("--key-axis", choices=("channel", "token"), default=None)
    g.add_argument("--group-size", type=int, default=None)
    g.add_argument("--residual", type=int, default=None)
    g.add_argument("--sinks", type=int, default=None)
    g.add_argument("--rotate", action="store_true", default=None)
    g.add_argument("--k-outliers", type=int, default=None, metavar="N",
                   help="key channels per kv head kept at one bit more (outlier channels)")
    g.add_argument("--v-group", type=int, default=None, metavar="G",
                   help="value group size, if not --group-size")
    return p


def spec_from_args(args) -> Optional[KVQuantSpec]:
    """--kv, then any of the explicit field flags on top; None if none is
    given (the model's baked plan, if any, else the default preset)."""
    overrides = {f: getattr(args, f) for f in SPEC_FLAGS if getattr(args, f) is not None}
    if args.kv is None and not overrides and args.key_axis is None and not args.rotate:
        return None
    for flag in ("k_bits", "v_bits"):
        if overrides.get(flag) == 16:
            overrides[flag] = None
    if args.key_axis is not None:
        overrides["key_axis"] = args.key_axis
    if args.rotate:
        overrides["rotate"] = True
    return KVQuantSpec.from_string(args.kv or DEFAULT_PRESET, **overrides)


def build_prompt(tokenizer, args, continuing: bool):
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = []
    if args.system_prompt is not None:
        messages.append({"role": "system", "content": args.system_prompt})
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True)
    if continuing:  # the cache already holds the conversation's prefix
        messages[-1]["content"] = "<query>"
        probe = tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
        text = text[probe.index("<query>"):]
        text = "\n" + text if not text.startswith("\n") else text
    return tokenizer.encode(text, add_special_tokens=False)


def check_memory(args, cache, n_prompt: int, shard=None):
    """Refuse, before any allocation, a request whose cache would not fit this
    machine (the planner's arithmetic; of a sharded model, this rank's share);
    warn beyond the trained context."""
    kvq = [c for c in cache if isinstance(c, KVQCache) and c.window is None]
    sliding = tuple(c.spec if isinstance(c, KVQCache) else None for c in cache
                    if getattr(c, "window", None) or type(c) is RotatingKVCache)
    offset = next((c.offset for c in cache if hasattr(c, "offset")), 0)  # SSM state: none
    context = offset + n_prompt + max(args.max_tokens, 0)
    bound = min((c.max_size for c in kvq if c.max_size), default=None)  # as made or loaded
    if bound:
        context = min(context, bound)
    try:
        shape = shapes.load_shape(args.model)
    except PlanError as e:
        print(f"warning: no memory check ({e})", file=sys.stderr)
        return
    if shard is not None:
        shape = sizing.rank_shape(shape, shard.sharding, shard.size, shard.rank)
    specs = [c.spec for c in kvq]
    sized = shapes.LayerSpecs(tuple(specs), "as made", sliding, name="per-layer")
    if len(set(specs)) == 1 and sliding == sizing.sliding_specs(shape, specs[0]):
        sized = specs[0]
    sizing.admit(shape, sized, context, prefill_step=args.prefill_step_size)
    trained = shape.trained_context
    if trained and context > trained and not bound:
        print(f"warning: {context} tokens exceed the model's trained context of "
              f"{trained}; quality will suffer (--max-kv-size bounds the cache)",
              file=sys.stderr)


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.seed is not None:
        mx.random.seed(args.seed)

    shard = None
    if args.sharding:
        if args.prompt_cache_file or args.save_prompt_cache:
            parser.error("--prompt-cache-file and --save-prompt-cache hold one process's "
                         "whole cache; they do not combine with --sharding")
        try:
            model, tokenizer, shard = distributed.load(args.model, args.sharding)
        except (ModelNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        mx.random.seed(distributed.shared_seed(shard.group, args.seed))
    else:
        try:
            model, tokenizer = load(args.model)
        except ModelNotFoundError as e:
            parser.error(str(e))
    if args.prompt_cache_file:
        try:
            cache = load_prompt_cache(args.prompt_cache_file, model=model, spec=spec)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    else:
        try:
            cache = make_prompt_cache(model, spec, max_kv_size=args.max_kv_size,
                                      sliding_spec=args.sliding_kv)
        except ValueError as e:
            parser.error(str(e))

    prompt = build_prompt(tokenizer, args, continuing=bool(args.prompt_cache_file))
    try:
        check_memory(args, cache, len(prompt), shard)
    except PlanError as e:
        sys.exit(f"error: {e}" if shard is None else f"error: rank {shard.rank}: {e}")
    sampler = make_sampler(args.temp, args.top_p)
    mx.reset_peak_memory()
    lead = shard is None or shard.rank == 0  # the rank that prints
    response = None
    with distributed.Guard(shard or distributed.shard_of("tensor", 0, 1, 0, 0),
                           args.peer_timeout) as guard:
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler,
            prompt_cache=cache, prefill_step_size=args.prefill_step_size,
            prompt_progress_callback=guard.beat,
        ):
            guard.beat()
            if lead:
                print(response.text, end="", flush=True)
        if lead:
            print()
        stats = kv_stats(cache) if args.verbose or shard is not None else None
        rows = None if shard is None else distributed.rank_rows(
            shard, stats.nbytes, stats.fp16_nbytes)
    if args.save_prompt_cache:
        save_prompt_cache(args.save_prompt_cache, cache, model=model,
                          metadata={"model": str(args.model or "default")})
    if args.verbose and lead:
        print(format_report(stats, response, peak=mx.get_peak_memory()))
        if rows is not None:
            print(format_ranks(rows))
        print(f"weights:      {describe_weights(args.model)}")


if __name__ == "__main__":
    main()
