"""KV sizing: the bytes a sequence's caches hold, the workspace of a prefill
chunk, and how much context and how many sequences fit in memory; the
admission test generate and the assistant run before they allocate.

Memory model, for `n` sequences (chats) of `context` tokens each:

    weights + workspace(context) + n * kv_bytes(context) <= memory

kv_bytes is what the caches of one sequence hold, exactly as KVQCache
allocates them (KVQCache.nbytes):
  * full-attention layers (KVQCache): the first `sinks` tokens and the
    `residual` most recent ones in fp16 (per-channel keys flush in whole groups,
    so up to group_size - 1 more recent tokens wait in fp16); the rest as codes
    plus an fp16 scale and bias per group, in a body preallocated in steps of
    KVQCache.step (256) tokens. Per token this is
        (fp16 bytes * (sinks + residual) + quantized bytes * body capacity) / context:
    the fp16 part is fixed, so it dominates short contexts and fades at long
    ones, and the body step adds up to 255 tokens of slack;
  * sliding-window layers: KVQCaches of their window (window_spec of
    spec.sliding_base: by default the spec with keys at 8 bits or more; no
    sinks, a residual that fits), holding the last window plus less
    than one group, sized as decode steps leave them (a prefill chunk's
    tokens beyond the window wait until the next step); or, kept in full
    precision, mlx-lm's RotatingKVCache in the model's dtype;
  * layers without a KV cache (SSM state) are not counted.
workspace is the memory in flight while one prefill chunk (`prefill_step`
tokens) goes through the model: sequences answered together are prefilled
together, so a chunk holds up to `prefill_step` rows of all their prompts
(see workspace_parts()); decode needs far less. Sizes are bytes; memory
strings use powers of 1024 ("16GB" = 16 GiB, as RAM is sold).
"""

import os
from collections import Counter
from dataclasses import replace
from typing import Optional, Sequence

from mlx_lm.models.cache import RotatingKVCache

from . import attention
from .cache import KVQCache
from .shapes import LayerSpecs, ModelShape, PlanError, model_shape
from .spec import (SLIDING_DEFAULT, HeadDimError, KVQuantSpec, describe_sliding, parse_spec,
                   short_label, sliding_base, window_spec)
from .storage import layouts
from .units import MAX_SEARCH, fmt_bytes, fmt_tokens

PREFILL_STEP = 2048
FP_BYTES = 2  # the chunk's K/V wait 16-bit in each layer's residual


def _shape(config) -> ModelShape:
    return model_shape(config) if isinstance(config, dict) else config


def _parse(spec):
    return spec if isinstance(spec, LayerSpecs) else parse_spec(spec)


def _layers(shape: ModelShape, spec) -> Counter:
    """{spec: number of full-attention layers with it}, checked against the model."""
    spec = _parse(spec)
    if not isinstance(spec, LayerSpecs):
        return Counter({spec.validate_for(shape.head_dim, shape.dv): shape.full_layers})
    if len(spec.specs) != shape.full_layers:
        raise PlanError(f"the calibrated plan has {len(spec.specs)} layers, the model "
                        f"{shape.full_layers} full-attention layers")
    return Counter(s.validate_for(shape.head_dim, shape.dv) for s in spec.specs)


def _widest(spec, head_dim: int) -> KVQuantSpec:
    """The spec of a plan's largest layer (the spec itself if uniform)."""
    spec = _parse(spec)
    if not isinstance(spec, LayerSpecs):
        return spec
    return max(spec.specs, key=lambda s: bits_per_element(s, head_dim))


def layer_bytes(spec, context: int, n_kv_heads: int, head_dim: int,
                v_head_dim: Optional[int] = None) -> int:
    """Bytes one KVQCache holds for one sequence after `context` tokens
    (KVQCache.bytes_for: the cache's own layout rules, equal to its nbytes)."""
    return KVQCache.bytes_for(spec, context, n_kv_heads, head_dim, v_head_dim)


def decode_bytes_read(spec, *, head_dim: int, n_tokens: int, n_kv_heads: int = 1,
                      batch: int = 1, v_head_dim: Optional[int] = None) -> int:
    """Bytes of KV cache one decode step reads for one layer: the cached
    tokens of every sequence (not the allocation slack) in the cache's own
    layouts. Queries and outputs (a few KB) are not counted."""
    return batch * KVQCache.bytes_for(spec, n_tokens, n_kv_heads, head_dim, v_head_dim,
                                      held=False)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def window_bytes(shape: ModelShape, context: int) -> int:
    """Bytes the sliding-window layers hold as mlx-lm's RotatingKVCaches (model dtype)."""
    return sliding_bytes(shape, None, context, "keep")


def sliding_specs(shape: ModelShape, spec, sliding=SLIDING_DEFAULT) -> tuple:
    """The spec of each sliding-window layer as make_prompt_cache gives it:
    window_spec of spec.sliding_base(spec, sliding), or None (mlx-lm's
    full-precision rotating cache: "keep", or no spec fits the window)."""
    spec = _parse(spec)
    if isinstance(spec, LayerSpecs):  # as made, or a plan made for full layers only
        return spec.sliding or (None,) * len(shape.windows)
    base = sliding_base(spec, sliding)
    return tuple(None if base is None else window_spec(base, w) for w in shape.windows)


def with_sliding(shape: ModelShape, spec, sliding: str) -> LayerSpecs:
    """`spec` on every full-attention layer, with sliding-window layers as
    `sliding` says (spec.sliding_base), as one sized row: "k4v4/keep"."""
    spec = parse_spec(spec)
    named = sliding if sliding in ("keep", "same", "auto") else short_label(parse_spec(sliding))
    return LayerSpecs((spec,) * shape.full_layers, str(spec),
                      sliding_specs(shape, spec, sliding), name=f"{short_label(spec)}/{named}",
                      description=f"{spec.describe()}; {describe_sliding(spec, sliding)}")


def sliding_bytes(shape: ModelShape, spec, context: int, sliding=SLIDING_DEFAULT) -> int:
    """Bytes the sliding-window layers hold after `context` tokens, as decode
    steps leave them (sliding_specs: quantized window caches, or mlx-lm's
    rotating caches in the model's dtype)."""
    H, D, Dv = shape.n_kv_heads, shape.head_dim, shape.dv
    total = 0
    for w, s in zip(shape.windows, sliding_specs(shape, spec, sliding)):
        if s is None:
            total += min(w, _round_up(context, RotatingKVCache.step)) * H * (D + Dv) \
                * shape.dtype_bytes
        else:
            total += KVQCache.bytes_for(s, context, H, D, Dv, window=w)
    return total


def kv_bytes(config, spec, context: int, sliding=SLIDING_DEFAULT) -> int:
    """Bytes all KV caches of one sequence hold after `context` tokens (after
    a decode step): full-attention layers with `spec`, sliding-window layers
    as sliding_specs says.

    config: a ModelShape (load_shape, model_shape; build it once for repeated
    calls) or a config.json dict."""
    shape = _shape(config)
    return (sum(n * layer_bytes(s, context, shape.n_kv_heads, shape.head_dim, shape.dv)
                for s, n in _layers(shape, spec).items())
            + sliding_bytes(shape, spec, context, sliding))


def kv_bytes_per_token(config, spec, context: int) -> float:
    """kv_bytes amortized over the context: the fixed fp16 sinks and residual,
    and the body's 256-token allocation step, weigh more at short contexts."""
    if context <= 0:
        raise ValueError(f"context={context} must be positive")
    return kv_bytes(config, spec, context) / context


def bits_per_element(spec, head_dim: int) -> float:
    """Bits per cached K/V element of the quantized body (the long-context limit)."""
    spec = _parse(spec)
    if isinstance(spec, LayerSpecs):
        return sum(bits_per_element(s, head_dim) for s in spec.specs) / len(spec.specs)
    cap = 1 << 16
    lk, lv = layouts(spec)
    return 8 * (lk.nbytes(1, cap, head_dim) + lv.nbytes(1, cap, head_dim)) / (2 * cap * head_dim)


# -- workspace ------------------------------------------------------------------


def workspace_parts(config, spec, context: int, prefill_step: int = PREFILL_STEP,
                    rows: Optional[int] = None, sequences: int = 1) -> dict:
    """Memory in flight while a prefill chunk of `prefill_step` tokens (ending
    at `context`) goes through the model, by cause. With `sequences` prefilled
    together, the chunk holds up to `prefill_step` of their `rows` tokens
    (default: one sequence, `context` rows).

    activations  the widest live tensors of one layer, in the model dtype:
                 residual stream, norm, q/k/v and rotated q/k, the MLP's
                 gate/up/product; plus kvq_attention's float32 queries and output
    kv chunk     the chunk's 16-bit K/V, held by every full-attention layer's
                 residual until the next step (plus the residual itself)
    scores       attention scores and their exps, which kvq_attention keeps
                 under attention.SCORE_BUDGET_BYTES, plus masked copies (half
                 of that) and one dequantized float32 K/V tile
    sliding      scores of mlx-lm's attention over a window (float32, with softmax)
                 and the chunk the RotatingKVCache holds beyond its window
    regrowth     a layer's body reallocated at a 256-token step while the old
                 one is copied over
    logits       each sequence's last-position logits and log-probs (mlx-lm
                 computes no others in prefill)
    """
    s = _shape(config)
    spec = _widest(spec, s.head_dim)
    L = min(prefill_step, context if rows is None else rows)
    a = s.dtype_bytes
    H, D, Hq = s.n_kv_heads, s.head_dim, s.n_heads
    qkv = (Hq + 2 * H) * D
    acts = L * a * (3 * s.hidden_size + 3 * s.intermediate_size + 2 * qkv) + L * Hq * D * 4 * 2
    chunk = s.full_layers * (L + spec.residual + spec.flush_unit) * H * D * FP_BYTES * 2
    full_scores = Hq * L * context * 4 * 2
    scores = min(attention.SCORE_BUDGET_BYTES, full_scores) * 3 // 2
    scores += 2 * H * min(attention.TILE_TOKENS, context) * D * 4
    sliding = 0
    if s.windows:
        w = max(s.windows)
        sliding = Hq * L * (min(w, context) + L) * 4 * 2
        sliding += len(s.windows) * L * H * D * a * 2
    regrowth = layer_bytes(spec, context, H, D, s.dv)
    logits = s.vocab_size * 4 * 2 * sequences
    return {"activations": acts, "kv chunk": chunk, "scores": scores,
            "sliding": sliding, "regrowth": regrowth, "logits": logits}


def workspace_bytes(config, spec, context: int, prefill_step: int = PREFILL_STEP,
                    rows: Optional[int] = None, sequences: int = 1) -> int:
    return sum(workspace_parts(config, spec, context, prefill_step, rows, sequences).values())


# -- capacity -------------------------------------------------------------------


def memory_needed(config, spec, contexts: Sequence[int],
                  prefill_step: int = PREFILL_STEP) -> int:
    """Weights + workspace + the caches of sequences of these context lengths
    (the admission test: admit a sequence if this stays within the budget)."""
    shape = _shape(config)
    if not contexts:
        return shape.weight_bytes
    return (shape.weight_bytes
            + workspace_bytes(shape, spec, max(contexts), prefill_step, rows=sum(contexts),
                              sequences=len(contexts))
            + sum(kv_bytes(shape, spec, c) for c in contexts))


def capacity(config, spec, memory: int, *, context: Optional[int] = None,
             concurrency: Optional[int] = None, prefill_step: int = PREFILL_STEP) -> int:
    """Give `context` for the most sequences of that length that fit in
    `memory`, or `concurrency` for the longest context that many sequences
    can each hold (0: none fits; MAX_SEARCH: at least that long)."""
    shape = _shape(config)
    if (context is None) == (concurrency is None):
        raise ValueError("give exactly one of context and concurrency")

    def fits(ctx, n):
        return memory_needed(shape, spec, [ctx] * n, prefill_step) <= memory

    if context is not None:
        # The workspace grows with the sequences until their prompts fill a
        # prefill chunk: search up to the count a one-sequence workspace allows.
        free = memory - shape.weight_bytes - workspace_bytes(shape, spec, context, prefill_step)
        return _largest(lambda n: fits(context, n), 0,
                        max(0, free // kv_bytes(shape, spec, context)) + 1)
    if not fits(1, concurrency):
        return 0
    if fits(MAX_SEARCH, concurrency):
        return MAX_SEARCH
    return _largest(lambda ctx: fits(ctx, concurrency), 1, MAX_SEARCH)


def _largest(ok, lo, hi):
    """The largest x in [lo, hi) with ok(x), for ok true at lo, false at hi
    and monotone (memory_needed grows with the context and the count)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def applicable(shape: ModelShape, specs) -> list:
    """The specs that can apply to the model's head dims."""
    out = []
    for spec in specs:
        try:
            out.append(parse_spec(spec).validate_for(shape.head_dim, shape.dv))
        except HeadDimError:
            pass
    return out


def admit(config, spec, context: int, memory: Optional[int] = None,
          prefill_step: int = PREFILL_STEP) -> None:
    """Raise PlanError, saying what fits and which generate flags would make
    it fit, unless one sequence of `context` tokens with `spec` fits `memory`
    (default: this machine's RAM)."""
    shape, spec = _shape(config), _parse(spec)
    memory = memory or total_memory()
    need = memory_needed(shape, spec, [context], prefill_step)
    if need <= memory:
        return
    fit = capacity(shape, spec, memory, concurrency=1, prefill_step=prefill_step)
    msg = (f"{context} tokens with KV spec {spec} need {fmt_bytes(need)} (weights "
           f"{fmt_bytes(shape.weight_bytes)}, KV cache {fmt_bytes(kv_bytes(shape, spec, context))}"
           f", workspace {fmt_bytes(workspace_bytes(shape, spec, context, prefill_step))}) but "
           f"{fmt_bytes(memory)} of memory is there: at most {fit} tokens fit.")
    bits = bits_per_element(spec, shape.head_dim)
    fits = {name: capacity(shape, name, memory, concurrency=1, prefill_step=prefill_step)
            for name in applicable(shape, ("k4v2", "k2v2"))
            if bits_per_element(name, shape.head_dim) < bits}
    options = [f"--kv {name} ({fmt_tokens(n)} tokens fit)"
               for name, n in fits.items() if n >= context]
    options += ["--max-kv-size N (keeps the sinks and the N most recent tokens)",
                "a shorter prompt or fewer --max-tokens"]
    raise PlanError(f"{msg} To make it fit: {'; '.join(options)}.")


def total_memory() -> int:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -- sharding over ranks ----------------------------------------------------------


def pipeline_layers(n_layers: int, ranks: int, rank: int) -> range:
    """The layers mlx-lm's pipeline gives `rank`: an even split, the low
    ranks taking the extra layers, rank 0 the last ones (PipelineMixin)."""
    base, extra = divmod(n_layers, ranks)
    split = [base + (r < extra) for r in range(ranks)]
    start = sum(split[rank + 1:])
    return range(start, start + split[rank])


def rank_shape(shape: ModelShape, sharding: str, ranks: int, rank: int = 0) -> ModelShape:
    """What one rank of a model sharded by mlx-lm holds and computes, as a
    ModelShape, so that every sizing function above applies to it unchanged.

    tensor    every layer's heads, kv heads and MLP width divided by `ranks`
              (its KV cache is exactly 1/ranks of the model's); its layers'
              weights divided by `ranks`, the embeddings and head held whole
              (mlx-lm shards the layers' linear maps only);
    pipeline  the rank's run of whole layers (pipeline_layers): their caches
              and weights, plus the embeddings and head every stage keeps.
    """
    if ranks == 1:
        return shape
    layer_w = shape.layer_weight_bytes or (0,) * shape.n_layers
    shared = shape.weight_bytes - sum(layer_w)
    name = f"{shape.name} [rank {rank} of {ranks}, {sharding}]"
    if sharding == "tensor":
        return replace(shape, name=name, n_heads=shape.n_heads // ranks,
                       n_kv_heads=shape.n_kv_heads // ranks,
                       intermediate_size=shape.intermediate_size // ranks,
                       weight_bytes=shared + sum(layer_w) // ranks,
                       layer_weight_bytes=tuple(b // ranks for b in layer_w))
    if sharding != "pipeline":
        raise ValueError(f"sharding {sharding!r}: use tensor or pipeline")
    mine = pipeline_layers(shape.n_layers, ranks, rank)
    full = tuple(i for i in shape.full_index if i in mine)
    win = [(i, w) for i, w in zip(shape.window_index, shape.windows) if i in mine]
    return replace(shape, name=name, n_layers=len(mine), full_layers=len(full),
                   full_index=full, window_index=tuple(i for i, _ in win),
                   windows=tuple(w for _, w in win),
                   stateless_layers=len(mine) - len(full) - len(win),
                   weight_bytes=shared + sum(layer_w[i] for i in mine),
                   layer_weight_bytes=tuple(layer_w[i] for i in mine))


def rank_spec(spec, shape: ModelShape, part: ModelShape):
    """A calibrated per-layer plan cut to the layers a rank holds (`part`,
    from rank_shape); a uniform spec as it is."""
    spec = _parse(spec)
    if not isinstance(spec, LayerSpecs) or part.full_index == shape.full_index:
        return spec
    specs = tuple(s for s, i in zip(spec.specs, shape.full_index) if i in part.full_index)
    sliding = None if spec.sliding is None else tuple(
        s for s, i in zip(spec.sliding, shape.window_index) if i in part.window_index)
    return replace(spec, specs=specs, sliding=sliding)
