"""What the KV sizing needs to know about a model (ModelShape), read from a
config.json with mlx-lm's own model classes (weights never materialized):
layers by cache kind (full attention, sliding window, none), kv heads, head
dims, dtype and weight bytes; and the calibrated per-layer plan baked into a
model folder, as specs per layer (LayerSpecs).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_make_prompt_cache
from mlx_lm.utils import _get_classes

from .integration import check_model, head_dim_of, install, model_config, sliding_layers
from .models import DEFAULT_MODEL, local_path, _safetensors_dtypes
from .spec import window_spec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
    full_index: tuple = ()  # layer indices of the full-attention layers
    window_index: tuple = ()  # layer indices of the sliding layers
    stateless_layers: int = 0  # layers without a KV cache (SSM state, ...)
    dtype: str = "float16"  # activations and sliding-window caches
    weight_bytes: int = 0
    weight_source: str = ""
    trained_context: Optional[int] = None
    v_head_dim: Optional[int] = None  # when values differ from keys (MLA)
    layer_weight_bytes: tuple = ()  # of weight_bytes, each layer's (the rest: embeddings, head)
    module: str = ""  # the mlx-lm module of the architecture

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)


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


def _param_bytes(model, config: dict, dtype_bytes: int) -> tuple:
    """Weight bytes from parameter shapes: floats in the config's dtype,
    mlx-lm quantized layers as codes plus scales and biases; (all, per layer)."""
    q = config.get("quantization")
    if q:
        nn.quantize(model, group_size=q.get("group_size", 64), bits=q.get("bits", 4))

    def size(module):
        return sum(p.size * dtype_bytes if mx.issubdtype(p.dtype, mx.floating) else p.nbytes
                   for _, p in tree_flatten(module.parameters()))

    return size(model), tuple(size(layer) for layer in model.layers)


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
    full_index = tuple(i for i, c in enumerate(caches) if type(c) is KVCache)
    window_index = tuple(sliding_layers(caches))
    windows = tuple(caches[i].max_size for i in window_index)
    if not full:
        raise PlanError(f"architecture {config['model_type']!r} has no full-attention "
                        "KV cache layers for mlx_kvq to quantize")
    path = Path(weights_dir) if weights_dir is not None else None
    wdtype = dtype or _weights_dtype(path, config)
    if wdtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {wdtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    params, per_layer = _param_bytes(model, config, DTYPE_BYTES[wdtype])
    if path is not None and any(path.glob("*.safetensors")):
        weight_bytes, source = _safetensors_bytes(path), "safetensors file sizes"
    else:
        weight_bytes = params
        source = f"parameter count x {wdtype}" + (
            " (mlx-lm quantized layers)" if config.get("quantization") else "")
    # Each layer's share of the weights (as its parameters' share), for sharding.
    layer_weight_bytes = tuple(b * weight_bytes // max(params, 1) for b in per_layer)
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
        full_index=full_index,
        window_index=window_index,
        stateless_layers=len(caches) - full - len(windows),
        dtype=wdtype,
        weight_bytes=weight_bytes,
        weight_source=source,
        trained_context=text.get("max_position_embeddings"),
        layer_weight_bytes=layer_weight_bytes,
        module=type(model).__module__,
    )


def baked_plan(model: Optional[str] = None,
               shape: Optional[ModelShape] = None) -> "Optional[LayerSpecs]":
    """The per-layer plan mlx_kvq.calibrate baked into the model folder, if
    any; its sliding-window layers as the plan gives them (a plan of the
    full-attention layers only leaves them in full precision)."""
    from .kvplan import load_plan, plan_files

    folder = local_path(model)
    if folder is None or plan_files(folder) is None:
        return None
    baked = load_plan(folder)
    full = [i for i in sorted(baked.layers) if shape is None or i in shape.full_index]
    sliding = None if shape is None else tuple(
        window_spec(baked.spec(i), w) if i in baked.layers else None
        for i, w in zip(shape.window_index, shape.windows))
    return LayerSpecs(tuple(baked.spec(i) for i in full), baked.label(), sliding)


def load_shape(model: Optional[str] = None, dtype: Optional[str] = None) -> ModelShape:
    """A ModelShape from a model folder, a config.json path, a Hugging Face id
    already in the local cache, or the default (embedded) model."""
    if model is not None and Path(model).expanduser().is_file():
        config_file, folder, name = Path(model).expanduser(), None, str(model)
    else:
        folder = local_path(model)
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


@dataclass(frozen=True)
class LayerSpecs:
    """Per-layer specs as the sizing takes them (a plan baked by
    mlx_kvq.calibrate, or the caches a model was given): one spec per
    full-attention layer, and one per sliding-window layer (None: mlx-lm's
    full-precision rotating cache)."""

    specs: tuple
    label: str
    sliding: Optional[tuple] = None  # None: as the full layers' spec would give
    name: str = "calibrated"
    description: Optional[str] = None  # None: "<name> per-layer plan <label>"

    @property
    def quantized(self) -> bool:
        return True

    def describe(self) -> str:
        return self.description or f"{self.name} per-layer plan {self.label}"

    def __str__(self) -> str:
        return self.name
