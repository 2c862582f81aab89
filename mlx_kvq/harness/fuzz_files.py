"""The loaders fuzz target's files and properties: a prompt-cache file, a
calibrated-plan folder and a tiny GGUF, damaged (truncated, bits flipped) or
forged (a field of a wrong type or value, an array of a wrong shape or dtype,
digests recomputed as a writer with a bug would). A damaged file must give a
clear error of the documented types (or load what was saved); a forged one
an error, or content that works. mlx_kvq.harness.fuzz runs them; a tool: the runtime
never imports it.
"""

import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from mlx_kvq import persist
from mlx_kvq.attention import kvq_attention
from mlx_kvq.cache import KVQCache
from mlx_kvq.integration import install
from mlx_kvq.spec import KVQuantSpec
from mlx_kvq.harness.extras import need

need("hypothesis", "the file fuzz targets (mlx_kvq.harness.fuzz_files)")
from hypothesis import strategies as st  # noqa: E402


@st.composite
def damage(draw, data: bytes, header: int):
    """(kind, bytes): truncated, or with one to three bits flipped (mostly in
    the first `header` bytes, where the layout and metadata are)."""
    b = bytearray(data)
    if draw(st.booleans()):
        return "truncated", bytes(b[:draw(st.integers(0, len(b) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        hi = min(header, len(b)) if draw(st.integers(0, 3)) else len(b)
        b[draw(st.integers(0, hi - 1))] ^= 1 << draw(st.integers(0, 7))
    return "flipped", bytes(b)


def _ours(exc) -> bool:
    """Whether an exception was raised in this package's code."""
    tb = exc.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    return f"{os.sep}mlx_kvq{os.sep}" in tb.tb_frame.f_code.co_filename


def _same_caches(a, b) -> bool:
    """Same layers and contents."""
    if [type(x) for x in a] != [type(x) for x in b]:
        return False
    for x, y in zip(a, b):
        if isinstance(x, KVQCache):
            if (x.spec, x.offset, x.max_size, x.window, x.size()) != \
                    (y.spec, y.offset, y.max_size, y.window, y.size()):
                return False
            if x.size() and not all(mx.array_equal(p, q).item()
                                    for p, q in zip(x.dequantized(), y.dequantized())):
                return False
        elif not all(mx.array_equal(p, q).item()
                                       for p, q in zip(x.state, y.state)):
            return False
    return True


def cache_file(folder: Path) -> tuple:
    """A prompt-cache file of a few layers of different specs, and its caches."""
    rng = np.random.default_rng(0)
    caches = []
    for label, n, kw in (("k4v2-g32-r32-s4", 150, {}), ("k8v4-ktok-r5-s0-rot", 90, {}),
                         ("k3v16-g64-r64-s2", 200, {"max_size": 170}),
                         ("k4v4-g32-r32-s0", 120, {"window": 80})):
        c = KVQCache(label, **kw)
        for L in (n - 1, 1):
            x = mx.array(rng.standard_normal((2, 1, 2, L, 64)).astype(np.float32))
            c.update_and_fetch(x[0], x[1])
        caches.append(c)
    plain = mlx_cache.KVCache()  # a full-precision mlx-lm layer beside them
    x = mx.array(rng.standard_normal((2, 1, 2, 40, 64)).astype(np.float32))
    plain.update_and_fetch(x[0], x[1])
    caches.append(plain)
    path = folder / "cache.safetensors"
    persist.save_prompt_cache(path, caches, metadata={"chat": "fuzz"})
    return path, caches


def check_cache_file(path, original, kind):
    """Our loader: a ValueError/OSError naming the file, or what was saved.
    mlx-lm's (no digest): errors of our code are ValueErrors, and what loads
    is a cache that works."""
    try:
        got, meta = persist.load_prompt_cache(path, return_metadata=True)
    except (ValueError, OSError) as e:
        assert str(path) in str(e), f"persist error names no file: {e}"
    else:
        assert _same_caches(got, original), f"{kind} file loaded other caches unnoticed"
        assert meta.get("chat") == "fuzz", f"{kind} file loaded other metadata {meta}"
    install()
    try:
        got = mlx_cache.load_prompt_cache(str(path))
    except Exception as e:
        assert not _ours(e) or isinstance(e, ValueError), \
            f"mlx-lm's loader: our code raised {type(e).__name__}: {e}"
    else:
        _works(got)


WRONG = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-10 ** 6, 10 ** 12),
                  st.floats(allow_nan=True), st.text(max_size=4),
                  st.lists(st.integers(-2, 300), max_size=5), st.dictionaries(st.text(max_size=2),
                                                                              st.integers()))


@st.composite
def forged_states(draw, caches):
    """Cache states with one JSON field of a wrong type or value, or one array
    of a wrong shape or dtype, sealed by persist as they are: a writer with a bug."""
    caches = [c for c in caches if isinstance(c, KVQCache)]
    states = [list(c.state) for c in caches]
    i = draw(st.integers(0, len(states) - 1), label="layer")
    state = states[i]
    meta = json.loads(state[0])
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(meta) + ["spec.k_bits", "spec.group_size",
                                                     "spec.residual", "spec.sinks"]))
        value = draw(WRONG)
        if field.startswith("spec."):
            meta["spec"][field[5:]] = value
        else:
            meta[field] = value
        what = f"layer {i}: {field} = {value!r}"
    else:
        j = draw(st.integers(1, len(state) - 1))
        x = state[j]
        if isinstance(x, tuple):
            x = list(x)
            k = draw(st.integers(0, 2))
            x[k] = draw(_wrong_array(x[k]))
            what = f"layer {i}: state[{j}][{k}] -> {_shape(x[k])}"
        else:
            x = draw(_wrong_array(x))
            what = f"layer {i}: state[{j}] -> {_shape(x)}"
        state[j] = x
    state[0] = json.dumps(meta)
    return _Forgery(states, what)


class _Forgery(list):
    """Forged states, shown by what was changed."""

    def __init__(self, states, what):
        super().__init__(states)
        self.what = what

    def __repr__(self):
        return self.what


def _shape(x):
    return None if x is None else f"{tuple(x.shape)} {x.dtype}"


@st.composite
def _wrong_array(draw, x):
    if x is None:
        return mx.zeros((1, 2, 3, 64), mx.float16)
    kind = draw(st.sampled_from(["shape", "dtype", "rank", "none"]))
    if kind == "none":
        return None
    if kind == "dtype":
        return x.astype(draw(st.sampled_from([mx.float32, mx.int32, mx.uint8, mx.bfloat16])))
    if kind == "rank":
        return x.reshape(-1)
    shape = list(x.shape)
    if not shape:
        return mx.zeros((3,), x.dtype)
    axis = draw(st.integers(0, len(shape) - 1))
    shape[axis] = max(0, shape[axis] + draw(st.sampled_from([-1, 1, 7])))
    return mx.zeros(shape, x.dtype)


class _Forged(KVQCache):
    """Saves a given state under the class name KVQCache."""

    def __init__(self, state, spec):
        self._forged, self.spec = state, spec

    @property
    def state(self):
        return self._forged


_Forged.__name__ = "KVQCache"


def check_forged(path, states, original):
    """A forged file: a ValueError, or caches that hold what they say and run."""
    forged = [_Forged(s, c.spec) for s, c in zip(states, original)]
    persist.save_prompt_cache(path, forged, metadata={"chat": "fuzz"})
    for load in (persist.load_prompt_cache, lambda p: mlx_cache.load_prompt_cache(str(p))):
        try:
            got = load(path)
        except Exception as e:
            assert isinstance(e, ValueError) or not _ours(e), \
                f"forged file: our code raised {type(e).__name__}: {e}"
            continue
        _works(got)


def _works(caches):
    """Every KVQCache layer reads back, takes a token and attends."""
    for c in caches:
        if not isinstance(c, KVQCache):
            continue
        if c.size():
            c.dequantized()
        B, H, D, Dv = c.dims or (1, 2, 64, 64)
        c.update_and_fetch(mx.zeros((B, H, 1, D)), mx.zeros((B, H, 1, Dv)))
        kvq_attention(mx.zeros((B, H, 1, D)), c, scale=0.125)


def tiny_gguf(folder: Path) -> Path:
    """A one-layer llama GGUF with a byte-level BPE vocabulary (MLX writes it)."""
    tokens = ["a", "b", "c", "ab", "<s>", "</s>"] + [chr(ord("d") + i) for i in range(10)]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {"general.architecture": "llama", "llama.embedding_length": u32(64),
            "llama.attention.head_count": u32(2), "llama.attention.head_count_kv": u32(1),
            "llama.feed_forward_length": u32(128), "llama.block_count": u32(1),
            "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
            "llama.context_length": u32(256), "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": u32(4), "tokenizer.ggml.eos_token_id": u32(5)}
    key = mx.random.key(0)
    shapes = {"token_embd": (len(tokens), 64), "output_norm": (64,), "blk.0.attn_q": (64, 64),
              "blk.0.attn_k": (32, 64), "blk.0.attn_v": (32, 64), "blk.0.attn_output": (64, 64),
              "blk.0.ffn_gate": (128, 64), "blk.0.ffn_up": (128, 64), "blk.0.ffn_down": (64, 128),
              "blk.0.attn_norm": (64,), "blk.0.ffn_norm": (64,)}
    weights = {f"{k}.weight": mx.random.normal(s, key=key) for k, s in shapes.items()}
    path = folder / "tiny.gguf"
    mx.save_gguf(str(path), weights, meta)
    return path


def check_gguf(path, folder):
    from mlx_kvq import gguf

    try:
        gguf.convert(path, folder / "out", overwrite=True)
    except (gguf.GGUFError, OSError) as e:
        assert isinstance(e, OSError) or str(path) in str(e) or "GGUF" in str(e), \
            f"GGUF error names neither file nor format: {e}"


def plan_folder(folder: Path) -> Path:
    """A calibrated-plan folder for a tiny random llama, as calibrate bakes it."""
    import importlib

    from mlx_lm.utils import save_config

    from mlx_kvq.kvplan import STATS, KVPlan, LayerPlan, model_identity

    mod = importlib.import_module("mlx_lm.models.llama")
    cfg = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               vocab_size=64, head_dim=32, tie_word_embeddings=True)
    mx.random.seed(0)
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    rng = np.random.default_rng(0)
    stats = {i: {f"{kv}_{name}": np.abs(rng.standard_normal((2, 32))).astype(np.float32) + 0.1
                 for kv in "kv" for name in STATS} for i in range(2)}
    plan = KVPlan(KVQuantSpec.from_string("k4v4-g32-r32-s4"),
                  {0: LayerPlan(4, 2, "smooth"), 1: LayerPlan(8, 4, "rotate")}, stats,
                  model_identity(model), alpha=0.5)
    save_config(cfg, folder / "config.json")
    plan.save(folder)
    return model


def _same_plan(a, b) -> bool:
    return (a.base, a.layers, a.alpha, a.model) == (b.base, b.layers, b.alpha, b.model) and all(
        np.array_equal(a.stats[i][n], b.stats[i][n]) for i in a.stats for n in a.stats[i])


def check_plan(folder, model, original, kind):
    from mlx_kvq.kvplan import KVPlanError, load_plan

    try:
        got = load_plan(folder, model)
    except KVPlanError as e:
        assert str(folder) in str(e) or "plan" in str(e).lower(), f"plan error: {e}"
    else:
        assert _same_plan(got, original), f"{kind} plan files loaded another plan unnoticed"


@st.composite
def forged_plan(draw, files):
    """Plan files with one JSON field of a wrong type or value, or one tensor
    of a wrong shape or dtype, sha256s recomputed: a writer with a bug."""
    from mlx_kvq.files import sha256_file
    from mlx_kvq.kvplan import PLAN_FILE, SCALES_FILE, sealed

    d = json.loads(files[PLAN_FILE])
    d.pop("json_sha256", None)
    out = dict(files)
    if draw(st.booleans()):
        where = draw(st.sampled_from(["top", "scheme", "layer", "model"]))
        node = {"top": d, "scheme": d["scheme"], "model": d["model"],
                "layer": d["layers"][draw(st.integers(0, len(d["layers"]) - 1))]}[where]
        key = draw(st.sampled_from(sorted(node)))
        node[key] = draw(WRONG)
        what = f"{PLAN_FILE}: {where}.{key} = {node[key]!r}"
    else:
        with tempfile.TemporaryDirectory() as t:
            src, dst = Path(t) / "a.safetensors", Path(t) / "b.safetensors"
            src.write_bytes(files[SCALES_FILE])
            arrays, meta = mx.load(str(src), return_metadata=True)
            name = draw(st.sampled_from(sorted(arrays)))
            arrays[name] = draw(_wrong_array(arrays[name]))
            if arrays[name] is None:
                del arrays[name]
            mx.save_safetensors(str(dst), arrays, metadata=meta)
            out[SCALES_FILE] = dst.read_bytes()
            d["scales"]["sha256"] = sha256_file(dst)
        what = f"{SCALES_FILE}: {name} -> {_shape(arrays.get(name))}"
    out[PLAN_FILE] = (json.dumps(sealed(d), indent=1) + "\n").encode()
    return _Forgery([out], what)


def check_forged_plan(folder, model, files):
    """A KVPlanError, or a plan whose layers' caches can be made and filled."""
    from mlx_kvq.kvplan import KVPlanError, load_plan

    for name, b in files.items():
        (folder / name).write_bytes(b)
    try:
        plan = load_plan(folder, model)
    except KVPlanError:
        return
    for i in plan.layers:
        c = KVQCache(plan.spec(i), calibration=plan.calibration(i))
        c.update_and_fetch(mx.zeros((1, 2, 1, 32)), mx.zeros((1, 2, 1, 32)))
