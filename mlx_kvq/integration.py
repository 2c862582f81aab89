"""Route mlx-lm's attention to mlx_kvq for layers whose cache is a KVQCache.

mlx-lm model modules import `scaled_dot_product_attention` from
mlx_lm.models.base by name, so patching base alone does not reach them: the
dispatcher is set on base and on every loaded mlx_lm.models module that holds
the original. Other caches go to the original function untouched.
"""

import copy
import sys
import weakref

import mlx.core as mx
import mlx_lm.models.base as base
import mlx_lm.models.cache as mlx_cache
from mlx_lm.generate import batch_generate as mlx_batch_generate
from mlx_lm.models.cache import KVCache

from .attention import kvq_attention
from .cache import CachedTensorUse, KVQCache
from .cache_base import KVQBaseCache
from .spec import SLIDING_DEFAULT, HeadDimError, parse_spec, sliding_base, window_spec

_original = getattr(base.scaled_dot_product_attention, "_kvq_original",
                    base.scaled_dot_product_attention)


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    if isinstance(cache, KVQBaseCache):  # one sequence or a batch
        out = kvq_attention(queries, cache, scale=scale, mask=mask, sinks=sinks)
        if cache.v_smooth is not None:  # values were stored divided by it
            rep = queries.shape[1] // cache.v_smooth.shape[0]
            s = mx.repeat(cache.v_smooth, rep, axis=0)[:, None, :]
            out = (out * s).astype(out.dtype)
        return out
    return _original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                     sinks=sinks)


scaled_dot_product_attention._kvq_original = _original


def install():
    """Patch every loaded mlx-lm model module; idempotent and cheap."""
    # load_prompt_cache looks cache classes up in mlx-lm's cache module.
    mlx_cache.KVQCache = KVQCache
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == base.__name__ or name.startswith("mlx_lm.models.")):
            continue
        if getattr(mod, "scaled_dot_product_attention", None) is _original:
            mod.scaled_dot_product_attention = scaled_dot_product_attention


def model_module_supported(model) -> bool:
    mod = sys.modules.get(type(model).__module__)
    inner = getattr(model, "language_model", None) or getattr(model, "model", None)
    mods = [mod] + ([sys.modules.get(type(inner).__module__)] if inner is not None else [])
    return any(
        m is not None and getattr(m, "scaled_dot_product_attention", None) in
        (_original, scaled_dot_product_attention)
        for m in mods
    )


def model_config(model, merge_text: bool = True) -> dict:
    """The model's ModelArgs as a dict (text_config merged in for multimodal
    models unless merge_text is False); mlx-lm models keep them as .args, a
    few as .config."""
    args = getattr(model, "args", None) or getattr(model, "config", None)
    a = dict(args if isinstance(args, dict) else vars(args)) if args is not None else {}
    text = a.get("text_config")
    if text is not None and merge_text:
        a.update(text if isinstance(text, dict) else vars(text))
    return a


def head_dim_of(model) -> int:
    """head_dim as the model's attention computes it: the config's head_dim,
    else an attention module's head_dim attribute, else hidden / heads."""
    a = model_config(model)
    if a.get("head_dim"):
        return int(a["head_dim"])
    if a.get("qk_nope_head_dim") and a.get("qk_rope_head_dim"):  # MLA keys
        return a["qk_nope_head_dim"] + a["qk_rope_head_dim"]
    for _, m in model.named_modules():
        if isinstance(getattr(m, "head_dim", None), int):
            return m.head_dim
    for hidden, heads in (("hidden_size", "num_attention_heads"), ("n_embd", "n_head")):
        if a.get(hidden) and a.get(heads):
            return a[hidden] // a[heads]
    raise ValueError(f"cannot tell the head_dim of model {type(model).__module__!r}")


def check_model(model, spec=None):
    """Raise ValueError unless mlx_kvq can quantize this model's KV cache
    with `spec`.

    Besides the static checks, one forward step of one token with throwaway
    caches (a lazy graph that is never evaluated) finds models that use the
    cached keys/values outside attention (MLA caches of latents) and value
    head dims the spec does not fit.
    """
    spec = parse_spec(spec)
    passed = _checked.get(id(model))
    if passed is not None and spec in passed:
        return
    if not model_module_supported(model):
        raise ValueError(
            f"architecture {type(model).__module__!r} does not route attention through "
            "mlx_lm.models.base.scaled_dot_product_attention; mlx_kvq cannot "
            "quantize its KV cache"
        )
    spec.validate_for(head_dim_of(model))
    caches = [KVQCache(spec) if type(c) is KVCache else c
              for c in mlx_cache.make_prompt_cache(model)]
    try:
        model(mx.zeros((1, 1), mx.int32), cache=caches)
    except HeadDimError:
        raise  # value head dims are only known once the model runs (MLA)
    except Exception as e:
        if isinstance(e, CachedTensorUse) or "KVQView" in str(e):
            raise ValueError(
                f"architecture {type(model).__module__!r} uses its cached keys/values "
                "outside mlx_lm.models.base.scaled_dot_product_attention; mlx_kvq "
                "cannot quantize its KV cache"
            ) from None
        # Other failures (a model that needs more than tokens) are left to its real call.
        return
    if passed is None:  # forgotten with the model
        passed = _checked[id(model)] = set()
        weakref.finalize(model, _checked.pop, id(model), None)
    passed.add(spec)


# id(model) -> the specs check_model passed for it: a server makes a cache for
# every chat, and the check's forward step costs about a decode step's graph.
_checked = {}


def sliding_layers(caches) -> list:
    """Indices of the sliding-window layers among mlx-lm's default caches."""
    return [i for i, c in enumerate(caches)
            if type(c) is mlx_cache.RotatingKVCache and c.keep == 0]


def make_prompt_cache(model, spec=None, max_kv_size=None, sliding_spec=SLIDING_DEFAULT,
                      plan=None):
    """mlx-lm's make_prompt_cache with the KV caches quantized.

    Layers whose default cache is a plain KVCache get a KVQCache. Sliding-window
    layers (mlx-lm's RotatingKVCache) get a KVQCache of their window with the
    spec's keys at 8 bits or more (`sliding_spec` "auto"), the spec as it is
    ("same"), another spec, or keep mlx-lm's cache in full precision ("keep",
    or when even no residual fits the window); see spec.sliding_base. Such
    a window cache uses window_spec (no sinks, a residual that fits), keeps
    the most recent window plus less than one group, and hides, for every
    query, exactly the keys the model's own window hides. Non-attention caches
    (SSM state) are untouched. With spec None, a plan baked by
    `mlx_kvq.calibrate` (model.kvq_plan, attached by mlx_kvq.load) gives each
    layer it covers its spec and calibration (sliding layers a plan does not
    cover keep mlx-lm's cache); an explicit spec wins over it. `plan` (a
    KVPlan for this model, kvplan.load_plan) stands in for the model's own.
    """
    if spec is None and plan is None:
        plan = getattr(model, "kvq_plan", None)
    elif spec is not None:
        plan = None
    spec = parse_spec(spec)
    install()
    check_model(model, spec)
    caches = mlx_cache.make_prompt_cache(model)
    full = [i for i, c in enumerate(caches) if type(c) is KVCache]
    sliding = sliding_layers(caches)
    if plan is not None and set(plan.layers) not in (set(full), set(full + sliding)):
        raise ValueError(
            f"the model's KV plan covers layers {sorted(plan.layers)}, its attention "
            f"layers are {sorted(full + sliding)}: the plan was made for another model"
        )
    out = list(caches)
    head_dim = head_dim_of(model)
    for i in full:
        if plan is None:
            out[i] = KVQCache(spec, max_size=max_kv_size)
        else:
            out[i] = KVQCache(plan.spec(i).validate_for(head_dim),
                              max_size=max_kv_size, calibration=plan.calibration(i))
    for i in sliding:
        w = caches[i].max_size
        if plan is not None:
            ws, calib = (window_spec(plan.spec(i), w), plan.calibration(i)) \
                if i in plan.layers else (None, None)
        else:
            base = sliding_base(spec, sliding_spec)
            ws, calib = None if base is None else window_spec(base, w), None
        if ws is not None:
            out[i] = KVQCache(ws.validate_for(head_dim), window=w, calibration=calib)
    if not full:
        raise ValueError(
            f"architecture {type(model).__module__!r} has no full-attention KV cache "
            "layers for mlx_kvq to quantize"
        )
    return out


def make_batch_prompt_caches(model, n, spec=None, max_kv_size=None,
                             sliding_spec=SLIDING_DEFAULT):
    """`n` independent prompt caches (as make_prompt_cache makes one) for
    mlx-lm's batch machinery: pass them as `caches=` to
    `BatchGenerator.insert` or `prompt_caches=` to `batch_generate`, which
    merge them into KVQBatchCache (quantized layers) and mlx-lm's batch
    caches (layers left in full precision)."""
    if n < 1:
        raise ValueError(f"n={n}: make at least one prompt cache")
    first = make_prompt_cache(model, spec, max_kv_size, sliding_spec)
    return [first] + [copy.deepcopy(first) for _ in range(n - 1)]


def batch_generate(model, tokenizer, prompts, spec=None, max_kv_size=None,
                   sliding_spec=SLIDING_DEFAULT,
                   **kwargs):
    """mlx_lm.generate.batch_generate with quantized caches: `prompts` are
    token lists, `spec` as in make_prompt_cache; other arguments go to
    mlx-lm's batch_generate (max_tokens, return_prompt_caches, ...).
    Caches given as `prompt_caches` (one list per prompt, for example saved
    conversations) are used as they are."""
    caches = kwargs.pop("prompt_caches", None)
    if caches is None:
        caches = make_batch_prompt_caches(model, len(prompts), spec, max_kv_size, sliding_spec)
    return mlx_batch_generate(model, tokenizer, prompts, prompt_caches=caches, **kwargs)


def prefill_chunk(model, cache, chunk):
    """Run one chunk of tokens (a list or 1-D array) through the model into
    `cache`, and free its workspace."""
    model(mx.array(chunk)[None], cache=cache)
    mx.eval([c.state for c in cache])
    mx.clear_cache()


def prefill(model, cache, tokens, step: int, progress=None):
    """Run `tokens` through the model into `cache`, `step` tokens at a time (as
    mlx_lm.generate_step prefills); progress(done, total) after each chunk."""
    for start in range(0, len(tokens), step):
        prefill_chunk(model, cache, tokens[start:start + step])
        if progress is not None:
            progress(min(start + step, len(tokens)), len(tokens))
