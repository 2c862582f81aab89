"""Save and load quantized prompt caches.

Files are mlx-lm prompt-cache files (mlx_lm.models.cache.load_prompt_cache
reads them once mlx_kvq is imported); these wrappers add the KV spec and a
model fingerprint to the metadata and refuse a file made for another model or
spec, or a file that is damaged: save_prompt_cache seals the file with a
sha256 of its metadata and every layer's state, which load_prompt_cache
checks. mlx-lm's own loader checks no digest: a damaged file it reads loads
as a structurally valid cache (KVQCache's state setter checks shapes, dtypes
and token counts) or fails with a ValueError.
"""

import hashlib
import json

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache

from .cache import KVQCache
from .integration import install, model_config
from .spec import KVQuantSpec


def model_fingerprint(model) -> str:
    """Cheap identity of a model: its config and a sample of its weights."""
    # The top-level args only: fingerprints stay those of earlier files.
    cfg = {k: v for k, v in model_config(model, merge_text=False).items()
           if isinstance(v, (int, float, str, bool))}
    # A few values of every weight (norm weights alone may all be ones).
    sample = [
        x.reshape(-1)[:64].astype(mx.float32).sum()
        for _, x in tree_flatten(model.parameters())
    ]
    sample = mx.stack(sample).tolist() if sample else []
    text = json.dumps(cfg, sort_keys=True) + "|" + ",".join(f"{v:.3e}" for v in sample)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _specs(cache):
    return [str(c.spec) if isinstance(c, KVQCache) else type(c).__name__ for c in cache]


def save_prompt_cache(file_name, cache, metadata=None, model=None, fingerprint=None):
    """Save with the KV specs and the model's fingerprint (`fingerprint`, if
    the caller keeps it, saves computing it from `model` again)."""
    meta = dict(metadata or {})
    meta["mlx_kvq_specs"] = json.dumps(_specs(cache))
    if fingerprint is None and model is not None:
        fingerprint = model_fingerprint(model)
    if fingerprint is not None:
        meta["mlx_kvq_model"] = fingerprint
    meta.pop(DIGEST_KEY, None)
    meta[DIGEST_KEY] = _digest(meta, cache)
    mlx_cache.save_prompt_cache(str(file_name), cache, meta)


DIGEST_KEY = "mlx_kvq_sha256"


def _digest(meta: dict, cache) -> str:
    """sha256 of the metadata, the layers' classes and every layer's state
    (arrays: dtype, shape and bytes), as saved and as loaded."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for c in cache:
        h.update(f"|{type(c).__name__}".encode())
        for _, x in tree_flatten(c.state):
            h.update(f"|{x.dtype}{tuple(x.shape)}|".encode() if isinstance(x, mx.array)
                     else repr(x).encode())
            if isinstance(x, mx.array):
                h.update(memoryview(mx.contiguous(x)))
    return h.hexdigest()


def load_prompt_cache(file_name, return_metadata=False, model=None, spec=None,
                      fingerprint=None):
    """Load a cache file; with `model` / `spec`, refuse one made for others
    (`fingerprint`: the model's, if the caller keeps it)."""
    install()
    try:
        cache, meta = mlx_cache.load_prompt_cache(str(file_name), return_metadata=True)
    except Exception as e:  # mx.load and the state setter raise many kinds
        raise ValueError(f"cannot load prompt cache {file_name}: {e}") from e
    if DIGEST_KEY in meta:  # files of earlier versions carry none
        want = meta.pop(DIGEST_KEY)
        if _digest(meta, cache) != want:
            raise ValueError(f"prompt cache {file_name} is damaged: its sha256 differs")
    if model is not None and "mlx_kvq_model" in meta:
        fingerprint = fingerprint or model_fingerprint(model)
        if meta["mlx_kvq_model"] != fingerprint:
            raise ValueError(
                f"prompt cache {file_name} was made with another model "
                f"(fingerprint {meta['mlx_kvq_model']} != {fingerprint})"
            )
    if model is not None and len(cache) != len(getattr(model, "layers", cache)):
        raise ValueError(
            f"prompt cache {file_name} has {len(cache)} layers, the model has "
            f"{len(model.layers)}"
        )
    if spec is not None:
        want = str(spec if isinstance(spec, KVQuantSpec) else KVQuantSpec.from_string(spec))
        have = {str(c.spec) for c in cache if isinstance(c, KVQCache)}
        if have != {want}:
            made = f"KV spec {sorted(have)}" if have else "full-precision mlx-lm caches"
            raise ValueError(f"prompt cache {file_name} was made with {made}, not {want}")
    return (cache, meta) if return_metadata else cache
