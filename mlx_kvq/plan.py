"""Capacity planner: how much context, and how many chats, fit in memory with
each KV precision: `mlx_kvq.plan`.

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
  * sliding-window layers (mlx-lm RotatingKVCache) stay in the model's dtype,
    bounded by their window;
  * layers without a KV cache (SSM state) are not counted.
workspace is the memory in flight while one prefill chunk (`prefill_step`
tokens) goes through the model: sequences answered together are prefilled
together, so a chunk holds up to `prefill_step` rows of all their prompts
(see workspace_parts()); decode needs far less. Sizes are bytes; memory
strings use powers of 1024 ("16GB" = 16 GiB, as RAM is sold).
"""

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_make_prompt_cache
from mlx_lm.utils import _get_classes

from . import attention
from .cache import KVQCache
from .cli_types import int_list, output_file, positive_int, token_list, tokens
from .integration import check_model, head_dim_of, install, model_config
from .models import DEFAULT_MODEL, _local_path, _safetensors_dtypes
from .quant import packed_width
from .spec import PRESETS, HeadDimError, KVQuantSpec, parse_spec

PRECISIONS = ("fp16", "k8v8", "k8v4", "k4v4", "k4v2", "k2v2")
CONCURRENCY = (1, 2, 4, 8)
CONTEXTS = (4096, 8192, 32768, 131072)
PREFILL_STEP = 2048
MAX_SEARCH = 1 << 26  # tokens; longer contexts are reported as this bound
FP_BYTES = 2  # KVQCache keeps sinks, residual and unquantized parts in 16 bits
SCALE_BYTES = 2  # fp16 scales and biases
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class PlanError(ValueError):
    """The model or the budget cannot be planned."""


@dataclass
class ModelShape:
    """What the planner needs to know about a model."""

    name: str
    model_type: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # of keys
    full_layers: int  # plain KVCache layers: KVQCache under mlx_kvq
    windows: tuple = ()  # RotatingKVCache max sizes, one per sliding layer
    stateless_layers: int = 0  # layers without a KV cache (SSM state, ...)
    dtype: str = "float16"  # activations and sliding-window caches
    weight_bytes: int = 0
    weight_source: str = ""
    trained_context: Optional[int] = None
    v_head_dim: Optional[int] = None  # when values differ from keys (MLA)

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)


# -- model shapes -----------------------------------------------------------


# GPT-2-style config names of the fields the planner reads.
ALIASES = {"hidden_size": "n_embd", "num_attention_heads": "n_head",
           "num_hidden_layers": "n_layer", "intermediate_size": "n_inner",
           "max_position_embeddings": "n_positions"}


def _text_config(config: dict) -> dict:
    text = {**config, **config["text_config"]} if isinstance(
        config.get("text_config"), dict) else dict(config)
    for name, alias in ALIASES.items():
        if not text.get(name) and text.get(alias):
            text[name] = text[alias]
    return text


def _instantiate(config: dict):
    """The mlx-lm model for a config, with lazy (never materialized) weights."""
    if "model_type" not in config:
        raise PlanError("config has no model_type: not a model config.json")
    try:
        model_cls, args_cls = _get_classes(config)
        return model_cls(args_cls.from_dict(config))
    except Exception as e:  # unknown model_type, or fields its ModelArgs needs
        raise PlanError(
            f"cannot build architecture {config['model_type']!r} with mlx-lm "
            f"({type(e).__name__}: {e})"
        ) from e


def _param_bytes(model, config: dict, dtype_bytes: int) -> int:
    """Weight bytes from parameter shapes: floats in the config's dtype,
    mlx-lm quantized layers as codes plus scales and biases."""
    q = config.get("quantization")
    if q:
        nn.quantize(model, group_size=q.get("group_size", 64), bits=q.get("bits", 4))
    total = 0
    for _, p in tree_flatten(model.parameters()):
        floating = mx.issubdtype(p.dtype, mx.floating)
        total += p.size * dtype_bytes if floating else p.nbytes
    return total


def _safetensors_bytes(path: Path) -> int:
    """Tensor bytes in the folder's safetensors files (headers excluded)."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        total += file.stat().st_size - 8 - header
    return total


def _weights_dtype(path: Optional[Path], config: dict) -> str:
    if path is not None and any(path.glob("*.safetensors")):
        floats = _safetensors_dtypes(path) & set(DTYPE_BYTES)
        if floats:  # mixed files compute in their 16-bit dtype
            return "float32" if floats == {"float32"} else sorted(floats - {"float32"})[0]
    if config.get("source_weights", {}).get("dtype") in DTYPE_BYTES:
        return config["source_weights"]["dtype"]
    dtype = _text_config(config).get("torch_dtype") or config.get("dtype")
    return dtype if dtype in DTYPE_BYTES else "float16"


def model_shape(config: dict, weights_dir=None, name: Optional[str] = None,
                dtype: Optional[str] = None) -> ModelShape:
    """A ModelShape from a config.json dict; weight bytes from the safetensors
    files in `weights_dir` if any, else parameter count x `dtype` (default:
    the config's torch_dtype)."""
    text = _text_config(config)
    n_heads = text.get("num_attention_heads")
    needed = {"num_hidden_layers": text.get("num_hidden_layers"),
              "num_attention_heads": n_heads, "hidden_size": text.get("hidden_size")}
    missing = [k for k, v in needed.items() if not v]
    if missing:
        raise PlanError(f"config lacks {', '.join(missing)}: cannot size the KV cache")
    install()
    model = _instantiate(config)
    try:
        check_model(model, "fp16")  # specs are checked as they are planned
        head_dim = head_dim_of(model)
    except ValueError as e:
        raise PlanError(str(e)) from None
    caches = mlx_make_prompt_cache(model)
    full = sum(type(c) is KVCache for c in caches)
    windows = tuple(c.max_size for c in caches if type(c) is RotatingKVCache)
    if not full:
        raise PlanError(f"architecture {config['model_type']!r} has no full-attention "
                        "KV cache layers for mlx_kvq to quantize")
    path = Path(weights_dir) if weights_dir is not None else None
    wdtype = dtype or _weights_dtype(path, config)
    if wdtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {wdtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    if path is not None and any(path.glob("*.safetensors")):
        weight_bytes, source = _safetensors_bytes(path), "safetensors file sizes"
    else:
        weight_bytes = _param_bytes(model, config, DTYPE_BYTES[wdtype])
        source = f"parameter count x {wdtype}" + (
            " (mlx-lm quantized layers)" if config.get("quantization") else "")
    return ModelShape(
        name=name or config.get("_name_or_path") or config["model_type"],
        model_type=config["model_type"],
        n_layers=len(caches),
        hidden_size=text["hidden_size"],
        intermediate_size=text.get("intermediate_size") or 4 * text["hidden_size"],
        vocab_size=text.get("vocab_size") or 0,
        n_heads=n_heads,
        n_kv_heads=text.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        v_head_dim=dv if (dv := model_config(model).get("v_head_dim")) != head_dim else None,
        full_layers=full,
        windows=windows,
        stateless_layers=len(caches) - full - len(windows),
        dtype=wdtype,
        weight_bytes=weight_bytes,
        weight_source=source,
        trained_context=text.get("max_position_embeddings"),
    )


def baked_plan(model: Optional[str] = None) -> "Optional[LayerSpecs]":
    """The per-layer plan mlx_kvq.calibrate baked into the model folder, if any."""
    from .kvplan import load_plan, plan_files

    folder = _local_path(model)
    if folder is None or plan_files(folder) is None:
        return None
    baked = load_plan(folder)
    return LayerSpecs(tuple(baked.spec(i) for i in sorted(baked.layers)), baked.label())


def load_shape(model: Optional[str] = None, dtype: Optional[str] = None) -> ModelShape:
    """A ModelShape from a model folder, a config.json path, a Hugging Face id
    already in the local cache, or the default (embedded) model."""
    if model is not None and Path(model).expanduser().is_file():
        config_file, folder, name = Path(model).expanduser(), None, str(model)
    else:
        folder = _local_path(model)
        if folder is None:
            raise PlanError(f"{model!r} is neither a folder, a config.json, nor a "
                            "Hugging Face id in the local cache")
        config_file = folder / "config.json"
        name = model or f"{DEFAULT_MODEL} (embedded)"
        if not config_file.is_file():
            raise PlanError(f"no config.json in {folder}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{config_file} is not a JSON config ({e})") from e
    if not isinstance(config, dict):
        raise PlanError(f"{config_file} is not a JSON object")
    return model_shape(config, folder, name=name, dtype=dtype)


def _shape(config) -> ModelShape:
    return model_shape(config) if isinstance(config, dict) else config


# -- KV bytes -----------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpecs:
    """A per-layer plan baked by mlx_kvq.calibrate, as the planner sizes it:
    one spec per full-attention layer."""

    specs: tuple
    label: str

    @property
    def quantized(self) -> bool:
        return True

    def describe(self) -> str:
        return f"calibrated per-layer plan {self.label}"

    def __str__(self) -> str:
        return "calibrated"


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


def _keys_transposed(spec: KVQuantSpec) -> bool:
    return spec.k_bits is not None and spec.key_axis == "channel"


def _flush_unit(spec: KVQuantSpec) -> int:
    """Tokens leave the residual in whole groups when keys are per channel."""
    return spec.group_size if _keys_transposed(spec) else 1


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def token_split(spec: KVQuantSpec, context: int):
    """(fp16 tokens, body tokens, body capacity) of one KVQCache after
    `context` tokens, as KVQCache flushes and allocates them."""
    rest = context - min(spec.sinks, context)
    if spec.quantized:
        unit = _flush_unit(spec)
        body = max(0, (rest - spec.residual) // unit * unit)
    else:
        body = rest
    return context - body, body, _round_up(body, KVQCache.step)


def _body_part_bytes(bits, cap, H, D, G, transposed) -> int:
    if bits is None:
        return H * cap * D * FP_BYTES
    if transposed:  # codes [H, D, words over tokens], scales [H, D, cap / G]
        return H * D * (4 * packed_width(cap, bits) + 2 * SCALE_BYTES * (cap // G))
    return H * cap * (4 * packed_width(D, bits) + 2 * SCALE_BYTES * (D // G))


def layer_bytes(spec, context: int, n_kv_heads: int, head_dim: int,
                v_head_dim: Optional[int] = None) -> int:
    """Bytes one KVQCache holds for one sequence after `context` tokens."""
    spec = parse_spec(spec)
    H, D, G = n_kv_heads, head_dim, spec.group_size
    Dv = v_head_dim or D
    fp_tokens, _, cap = token_split(spec, context)
    return (fp_tokens * H * (D + Dv) * FP_BYTES
            + _body_part_bytes(spec.k_bits, cap, H, D, G, _keys_transposed(spec))
            + _body_part_bytes(spec.v_bits, cap, H, Dv, G, False))


def window_bytes(shape: ModelShape, context: int) -> int:
    """Bytes the sliding-window layers' RotatingKVCaches hold (model dtype)."""
    held = [min(w, _round_up(context, RotatingKVCache.step)) for w in shape.windows]
    return sum(held) * shape.n_kv_heads * (shape.head_dim + shape.dv) * shape.dtype_bytes


def kv_bytes(config, spec, context: int) -> int:
    """Bytes all KV caches of one sequence hold after `context` tokens.

    config: a ModelShape (load_shape, model_shape; build it once for repeated
    calls) or a config.json dict."""
    shape = _shape(config)
    return (sum(n * layer_bytes(s, context, shape.n_kv_heads, shape.head_dim, shape.dv)
                for s, n in _layers(shape, spec).items())
            + window_bytes(shape, context))


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
    per_layer = (_body_part_bytes(spec.k_bits, cap, 1, head_dim, spec.group_size,
                                  _keys_transposed(spec))
                 + _body_part_bytes(spec.v_bits, cap, 1, head_dim, spec.group_size, False))
    return 8 * per_layer / (2 * cap * head_dim)


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
    chunk = s.full_layers * (L + spec.residual + _flush_unit(spec)) * H * D * FP_BYTES * 2
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


# -- the plan -------------------------------------------------------------------


@dataclass
class Row:
    spec: KVQuantSpec
    bits: float  # per element, long-context limit
    per_token: dict  # context -> bytes per token
    max_context: dict  # concurrency -> tokens
    max_chats: dict  # context -> sequences
    quality: Optional[dict] = None  # mlx_kvq.eval's result for this spec


@dataclass
class Plan:
    shape: ModelShape
    memory: int
    prefill_step: int
    rows: list = field(default_factory=list)
    contexts: tuple = CONTEXTS
    concurrency: tuple = CONCURRENCY
    quality_source: Optional[str] = None  # where the quality columns come from


def load_quality(paths) -> tuple:
    """({spec label: result}, source line) from `mlx_kvq.eval --json` files;
    mlx-lm baselines and calibrated plans are not specs and are left out."""
    results, sources = {}, []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            d, res = data["disclosure"], data["results"]
            items = [(r["scheme"], r) for r in res.values()]
            source = (f"{path}: KLD vs the full-precision cache on {d['model']}, "
                      f"{d['corpus']}, {d['windows']}; calibration {d['calibration']}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise PlanError(f"{path} is not a JSON file written by mlx_kvq.eval --json "
                            f"({type(e).__name__}: {e})") from None
        for name, r in items:
            if name == "calibrated":  # the baked plan, as the planner's row names it
                results[name] = r
                continue
            try:
                results[str(parse_spec(name))] = r
            except ValueError:
                continue  # mlx<bits> baselines, 'calibrated'
        sources.append(source)
    return results, "\n".join(sources)


def make_plan(shape: ModelShape, specs, memory: int, prefill_step: int = PREFILL_STEP,
              contexts=CONTEXTS, concurrency=CONCURRENCY) -> Plan:
    if memory <= shape.weight_bytes:
        raise PlanError(
            f"memory budget {fmt_bytes(memory)} does not exceed the weights "
            f"({fmt_bytes(shape.weight_bytes)}, {shape.weight_source})"
        )
    plan = Plan(shape, memory, prefill_step, contexts=tuple(contexts),
                concurrency=tuple(concurrency))
    for spec in specs:
        spec = _parse(spec)
        _layers(shape, spec)  # refuses a spec the model's head dims cannot take
        plan.rows.append(Row(
            spec=spec,
            bits=bits_per_element(spec, shape.head_dim),
            per_token={c: kv_bytes_per_token(shape, spec, c) for c in contexts},
            max_context={n: capacity(shape, spec, memory, concurrency=n,
                                     prefill_step=prefill_step) for n in concurrency},
            max_chats={c: capacity(shape, spec, memory, context=c,
                                   prefill_step=prefill_step) for c in contexts},
        ))
    plan.rows.sort(key=lambda r: -r.bits)
    return plan


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_tokens(n: int) -> str:
    if n >= MAX_SEARCH:
        return f">{MAX_SEARCH >> 20}M"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}M"
    if n >= 10 << 10 or n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def _short_spec(spec: KVQuantSpec) -> str:
    """The preset label (k4v4, fp16) if the spec is one, else its label
    without the parts that are defaults (k3v3-rot); "calibrated" for a plan."""
    if isinstance(spec, LayerSpecs):
        return str(spec)
    preset = next((k for k, v in PRESETS.items() if v == spec and re.fullmatch(
        r"k\d+v\d+|fp16", k)), None)
    if preset:
        return preset
    defaults = str(KVQuantSpec(k_bits=spec.k_bits, v_bits=spec.v_bits)).split("-")
    parts = str(spec).split("-")
    return "-".join(parts[:1] + [p for p in parts[1:] if p not in defaults])


def format_plan(plan: Plan) -> str:
    s = plan.shape
    layers = f"{s.full_layers} full attention"
    if s.windows:
        layers += f", {len(s.windows)} sliding window ({max(s.windows)} tokens, {s.dtype})"
    if s.stateless_layers:
        layers += f", {s.stateless_layers} without KV cache (not counted)"
    ws_long = workspace_parts(s, plan.rows[0].spec, max(plan.contexts), plan.prefill_step)
    lines = [
        f"==== mlx_kvq.plan: {s.name}",
        f"model:      {s.model_type}, {s.n_layers} layers ({layers}); "
        f"{s.n_heads} q / {s.n_kv_heads} kv heads x {s.head_dim}; "
        f"trained context {s.trained_context or 'unknown'}",
        f"memory:     {fmt_bytes(plan.memory)} budget",
        f"weights:    {fmt_bytes(s.weight_bytes)} ({s.weight_source}; activations in {s.dtype})",
        f"workspace:  one {plan.prefill_step}-token prefill chunk at a time; with "
        f"{_short_spec(plan.rows[0].spec)} at {fmt_tokens(max(plan.contexts))} context: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in ws_long.items() if v),
        "KV bytes:   exact KVQCache allocation: fp16 sinks + residual, quantized body "
        "in 256-token steps; per token = that / context",
    ]
    if plan.quality_source:
        lines += [f"quality:    {line}" for line in plan.quality_source.splitlines()]
        if any(s.name not in line for line in plan.quality_source.splitlines()):
            lines.append("            (measured on another model than the one planned)")
    lines.append("")
    quality = plan.quality_source is not None
    ctx_head = "".join(f"{'@' + fmt_tokens(c):>9}" for c in plan.contexts)
    w = max(10, 1 + max(len(_short_spec(r.spec)) for r in plan.rows))
    q_head = f"{'KLD':>8}{'top-1':>7}" if quality else ""
    head = (f"{'precision':<{w}}{'bits/el':>8}{q_head} | "
            f"{'KiB per token':^{9 * len(plan.contexts)}}"
            f" | {'max context, N chats':^{8 * len(plan.concurrency)}}"
            f" | {'max chats at context':^{8 * len(plan.contexts)}}")
    sub = (f"{'':<{w}}{'':>8}{' ' * len(q_head)} | {ctx_head}"
           f" | {''.join(f'{n:>6} ch' for n in plan.concurrency)}"
           f" | {''.join(f'{fmt_tokens(c):>8}' for c in plan.contexts)}")
    lines += [head, sub, "-" * len(sub)]
    for r in plan.rows:
        lines.append(
            f"{_short_spec(r.spec):<{w}}{r.bits:>8.2f}{_quality_cells(r) if quality else ''} | "
            + "".join(f"{r.per_token[c] / 1024:>9.1f}" for c in plan.contexts) + " | "
            + "".join(f"{fmt_tokens(r.max_context[n]):>8}" for n in plan.concurrency) + " | "
            + "".join(f"{r.max_chats[c]:>8}" for c in plan.contexts)
        )
    lines += [f"{_short_spec(r.spec)}: {r.spec.describe()}" for r in plan.rows
              if isinstance(r.spec, LayerSpecs)]
    if s.trained_context and any(n > s.trained_context for r in plan.rows
                                 for n in r.max_context.values()):
        lines.append(f"(contexts beyond the trained {fmt_tokens(s.trained_context)} "
                     "fit in memory but the model was not trained for them)")
    return "\n".join(lines)


def _quality_cells(row: Row) -> str:
    if not row.spec.quantized:
        return f"{'ref':>8}{'ref':>7}"
    if row.quality is None:
        return f"{'-':>8}{'-':>7}"
    return f"{row.quality['kld_mean']:>8.2g}{row.quality['top1']:>7.3f}"


def recommend(plan: Plan, target_context: int, target_chats: int = 1) -> str:
    """One sentence: the most precise precision that fits the target."""
    need = {id(r): memory_needed(plan.shape, r.spec, [target_context] * target_chats,
                                 plan.prefill_step) for r in plan.rows}
    fitting = [r for r in plan.rows if need[id(r)] <= plan.memory]
    target = f"{target_chats} chat{'s' if target_chats > 1 else ''} of {target_context} tokens"
    beyond = ""
    if plan.shape.trained_context and target_context > plan.shape.trained_context:
        beyond = (f" Note: {target_context} tokens exceeds the model's trained "
                  f"context ({plan.shape.trained_context}).")
    if not fitting:
        r = min(plan.rows, key=lambda r: need[id(r)])
        return (f"Nothing fits {target} in {fmt_bytes(plan.memory)}: even "
                f"{_short_spec(r.spec)} needs {fmt_bytes(need[id(r)])}; use fewer chats, "
                f"a shorter context or a smaller model.{beyond}")
    best = fitting[0]
    headroom = capacity(plan.shape, best.spec, plan.memory, context=target_context,
                        prefill_step=plan.prefill_step)
    msg = (f"Recommended: {_short_spec(best.spec)} ({best.spec.describe()}): {target} "
           f"need{'s' * (target_chats == 1)} {fmt_bytes(need[id(best)])} of "
           f"{fmt_bytes(plan.memory)}; at this context {headroom} chat(s) fit.")
    if best is not plan.rows[0]:
        msg += (f" {_short_spec(plan.rows[0].spec)} would need "
                f"{fmt_bytes(need[id(plan.rows[0])])}.")
    return msg + beyond


# -- CLI ------------------------------------------------------------------------


def parse_memory(text) -> int:
    """Bytes from "16GB", "16G", "1.5 TiB", "512MB", "17179869184" (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
    if not m:
        raise PlanError(f"cannot parse memory size {text!r}: use e.g. 16GB, 512MB, 1.5T")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if n <= 0:
        raise PlanError(f"memory size {text!r} must be positive")
    return n


def total_memory() -> int:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(argv=None):
    """The CLI; returns the plan for callers."""
    p = argparse.ArgumentParser(
        description="How much context and how many chats fit in memory, per KV precision")
    p.add_argument("--model", default=None,
                   help="Model folder, config.json, or Hugging Face id in the local cache "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--memory", default=None,
                   help="Memory budget, e.g. 16GB (powers of 1024; default: this machine's RAM)")
    p.add_argument("--kv", nargs="*", default=[],
                   help=f"Extra precisions to plan besides {', '.join(PRECISIONS)}")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="Weight dtype when sizing weights from the parameter count")
    p.add_argument("--prefill-step", type=positive_int, default=PREFILL_STEP)
    p.add_argument("--contexts", type=token_list, default=CONTEXTS,
                   help="Context lengths for the table, e.g. 4K,8K,32K,128K")
    p.add_argument("--concurrency", type=int_list, default=CONCURRENCY,
                   help="Numbers of chats for the table, e.g. 1,2,4,8")
    p.add_argument("--target-context", type=tokens, default=8192)
    p.add_argument("--target-chats", type=positive_int, default=1)
    p.add_argument("--quality", nargs="+", default=None, metavar="EVAL_JSON",
                   help="Add KLD and top-1 columns from `mlx_kvq.eval --json` files "
                   "(their specs are planned too)")
    p.add_argument("--json", type=output_file, default=None, help="Write the plan as JSON here")
    p.add_argument("--plot", default=None, help="Write PNG plots into this folder")
    args = p.parse_args(argv)
    try:
        memory = parse_memory(args.memory) if args.memory else total_memory()
        quality, source = load_quality(args.quality) if args.quality else ({}, None)
        shape = load_shape(args.model, dtype=args.dtype)
        # Presets that cannot apply (head_dim 80: no group divides it) are left
        # out; specs asked for by name must apply.
        specs = list(dict.fromkeys([*applicable(shape, PRECISIONS),
                                    *(parse_spec(s) for s in args.kv),
                                    *applicable(shape, [s for s in quality
                                                        if s != "calibrated"])]))
        baked = baked_plan(args.model)
        if baked is not None:
            specs.append(baked)
        plan = make_plan(shape, specs, memory, args.prefill_step, args.contexts,
                         args.concurrency)
        plan.quality_source = source
        for r in plan.rows:
            r.quality = quality.get(str(r.spec))
    except (PlanError, ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    print(format_plan(plan))
    left_out = [_short_spec(parse_spec(x)) for x in PRECISIONS if parse_spec(x) not in specs]
    if left_out:
        print(f"(not planned: {', '.join(left_out)}: their group size does not divide "
              f"head_dim {shape.head_dim}{f' / {shape.dv}' if shape.v_head_dim else ''}; "
              "per-channel keys alone still quantize: --kv k4v16)")
    print(recommend(plan, args.target_context, args.target_chats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan_dict(plan), f, indent=1)
    if args.plot:
        from . import plots

        for path in plots.plan_plots(plan, args.plot):
            print(f"plot:       {path}")
    return plan


def plan_dict(plan: Plan) -> dict:
    s = plan.shape
    return {
        "model": vars(s) | {"windows": list(s.windows)},
        "memory": plan.memory,
        "prefill_step": plan.prefill_step,
        "rows": [{"spec": str(r.spec), "name": _short_spec(r.spec), "describe": r.spec.describe(),
                  "bits_per_element": r.bits,
                  "bytes_per_token": {str(c): v for c, v in r.per_token.items()},
                  "max_context": {str(n): v for n, v in r.max_context.items()},
                  "max_chats": {str(c): v for c, v in r.max_chats.items()},
                  "quality": r.quality and {k: v for k, v in r.quality.items() if k != "klds"}}
                 for r in plan.rows],
        "quality_source": plan.quality_source,
    }


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
