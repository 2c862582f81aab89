"""Convert a llama-architecture GGUF file into an mlx-lm model folder.

The folder holds ``config.json``, ``model.safetensors`` (dequantized to
float32 or float16) and Hugging Face tokenizer files, so that
``mlx_lm.load(folder)`` works.  ``config.json`` also records where the
weights came from under ``"source_weights"``, since a model dequantized from
4-bit GGUF is not the same as the original bf16 checkpoint.

The embedded default model is converted this way on first use
(models.default_model_path); `mlx_kvq.convert_gguf` (converters/gguf_to_mlx.py)
is the command line.
"""

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

from .files import sha256_file

# llama.cpp's general.file_type values (enum llama_ftype) for the types MLX reads.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 32: "BF16"}

DTYPES = {"float32": mx.float32, "float16": mx.float16}

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class GGUFError(ValueError):
    """The GGUF file is missing, unreadable or not a llama model."""


# ggml tensor types MLX reads: (elements per block, bytes per block)
GGML_TYPES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 30: (1, 2)}
# GGUF metadata value types: struct formats of the scalars; 8 string, 9 array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                11: "q", 12: "d"}
MAX_COUNT = 1 << 24  # tensors, keys or array items: more means a damaged header


def check_layout(path: Path):
    """Walk a GGUF file's header (metadata, tensor table) and check that
    every count, string and tensor lies within the file, before MLX's reader
    (which trusts them) maps it: a damaged file is a GGUFError, not a crash."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        def read(n):
            if n < 0 or f.tell() + n > size:
                raise GGUFError(f"{path} is truncated or damaged: the header reaches past "
                                f"the end of the file ({size} bytes)")
            return f.read(n)

        def unpack(fmt):
            return struct.unpack("<" + fmt, read(struct.calcsize(fmt)))[0]

        def count(what):
            n = unpack("Q")
            if n > MAX_COUNT:
                raise GGUFError(f"{path} is damaged: {n} {what}")
            return n

        def string(what):
            raw = read(count(f"bytes in a {what}"))
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GGUFError(f"{path} is damaged: a {what} is not UTF-8") from e

        def value(kind, key):
            if kind == 8:
                return string(f"string value of {key}")
            if kind == 9:
                item, n = unpack("I"), count(f"items in {key}")
                if item == 9:
                    raise GGUFError(f"{path}: nested arrays in {key}")
                return [value(item, key) for _ in range(n)]
            if kind not in GGUF_SCALARS:
                raise GGUFError(f"{path} is damaged: {key} has value type {kind}")
            return unpack(GGUF_SCALARS[kind])

        read(4)
        version = unpack("I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = count("tensors"), count("metadata keys")
        align = 32
        for _ in range(n_kv):
            key = string("metadata key")
            v = value(unpack("I"), key)
            if key == "general.alignment":
                if type(v) is not int or v < 1 or v & (v - 1):
                    raise GGUFError(f"{path}: general.alignment={v!r}")
                align = v
        tensors, names = [], set()
        for _ in range(n_tensors):
            name = string("tensor name")
            n_dims = unpack("I")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{path} is damaged: tensor {name} has {n_dims} dims")
            dims = [unpack("Q") for _ in range(n_dims)]
            kind, offset = unpack("I"), unpack("Q")
            if kind not in GGML_TYPES:
                raise GGUFError(f"{path}: tensor {name} has ggml type {kind}; MLX reads "
                                "F32, F16, BF16, Q4_0, Q4_1 and Q8_0")
            block, nbytes = GGML_TYPES[kind]
            if name in names or min(dims) < 1 or dims[0] % block or offset % align:
                raise GGUFError(f"{path} is damaged: tensor {name} dims {dims} offset {offset}")
            names.add(name)
            tensors.append((name, offset, math.prod(dims) // block * nbytes))
        start = -(-f.tell() // align) * align
    for name, offset, nbytes in tensors:
        if start + offset + nbytes > size:
            raise GGUFError(f"{path} is truncated or damaged: tensor {name} ends past the end "
                            f"of the file")


def read_gguf(path) -> Tuple[Dict[str, mx.array], dict]:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic bytes {magic!r})")
    check_layout(path)
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise GGUFError(f"Could not read GGUF file {path}: {e}") from e


def _scalar(v):
    return v.item() if isinstance(v, mx.array) else v


def _f32(v) -> float:
    # Metadata floats are float32: print them with float32 precision (1e-05, not 9.99e-06).
    return float(str(np.float32(_scalar(v))))


def _meta(meta: dict, key: str):
    if key not in meta:
        raise GGUFError(f"GGUF metadata lacks {key!r}")
    return _scalar(meta[key])


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Invert llama.cpp's row permutation of the Q and K projections.

    ``convert_hf_to_gguf`` reorders each head's rows from the half-split
    rotary layout (HF / mlx-lm) to the interleaved one (llama.cpp) with
    ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``; this undoes it.
    """
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_config(meta: dict, has_output: bool) -> dict:
    arch = _meta(meta, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"Only llama GGUF models are supported, got {arch!r}")
    hidden = int(_meta(meta, "llama.embedding_length"))
    n_head = int(_meta(meta, "llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(_scalar(meta.get("llama.rope.dimension_count", hidden // n_head)))
    vocab = meta.get("llama.vocab_size")
    vocab = int(_scalar(vocab)) if vocab is not None else len(meta["tokenizer.ggml.tokens"])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_meta(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(meta, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_meta(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_traditional": False,
        "rope_scaling": None,
        "max_position_embeddings": int(_meta(meta, "llama.context_length")),
        "vocab_size": vocab,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,
    }
    sizes = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim",
                                     "vocab_size", "max_position_embeddings")}
    bad = {k: v for k, v in sizes.items() if not 0 < v < 1 << 31}
    if bad or n_head % n_kv or head_dim % 2:
        raise GGUFError(f"GGUF metadata gives impossible sizes {bad or sizes}")
    for name in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in meta:
            config[f"{name.replace('padding', 'pad')}_token_id"] = int(_scalar(meta[key]))
    return config


def _dequantize(weights: dict, base: str) -> mx.array:
    w = weights[f"{base}.weight"]
    if f"{base}.scales" not in weights:
        return w.astype(mx.float32)
    scales = weights[f"{base}.scales"].astype(mx.float32)
    biases = weights[f"{base}.biases"].astype(mx.float32)
    # MLX exposes GGUF Q4_0/Q4_1/Q8_0 blocks as affine groups of 32.
    group_size = 32
    bits = w.shape[-1] * 32 // (scales.shape[-1] * group_size)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)


def convert_weights(
    weights: dict, config: dict, dtype=mx.float32, *, _unpermute: bool = True
) -> Dict[str, mx.array]:
    out = {}
    bases = sorted({k.rsplit(".", 1)[0] for k in weights})
    for base in bases:
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
        elif base in TOP_NAMES:
            name = TOP_NAMES[base]
        elif base == "rope_freqs":
            raise GGUFError("GGUF files with rope_freqs (llama 3 rope scaling) are not supported")
        else:
            raise GGUFError(f"Unexpected tensor in GGUF file: {base}")
        w = _dequantize(weights, base)
        heads = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}
        if parts[-1] in heads and w.shape[0] != config[heads[parts[-1]]] * config["head_dim"]:
            raise GGUFError(f"GGUF tensor {base} has {w.shape[0]} rows, the metadata's "
                            f"{heads[parts[-1]]} x head_dim say "
                            f"{config[heads[parts[-1]]] * config['head_dim']}")
        if _unpermute and parts[-1] == "attn_q":
            w = unpermute(w, config["num_attention_heads"])
        elif _unpermute and parts[-1] == "attn_k":
            w = unpermute(w, config["num_key_value_heads"])
        out[f"{name}.weight"] = w.astype(dtype)
        mx.eval(out[f"{name}.weight"])
    return out


def build_tokenizer(meta: dict):
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _meta(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"Only byte-level BPE (gpt2) GGUF tokenizers are supported, got {kind!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   byte_fallback=False))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise GGUFError(f"the GGUF vocabulary and merges disagree: {e}") from e

    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell"):
        # llama.cpp splits every digit on its own before the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt2", "default", "mpt", "olmo"):
        tok.pre_tokenizer = byte_level
    else:
        raise GGUFError(f"Unsupported GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    token_type = meta.get("tokenizer.ggml.token_type")
    if token_type is not None:
        token_type = np.array(token_type).tolist()
        control = [t for t, kind in zip(tokens, token_type) if kind == 3]  # CONTROL
        user = [t for t, kind in zip(tokens, token_type) if kind == 4]  # USER_DEFINED
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        key = f"tokenizer.ggml.{key}_token_id"
        return tokens[int(_scalar(meta[key]))] if key in meta else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_scalar(meta.get("tokenizer.ggml.add_bos_token", False))),
        "add_eos_token": bool(_scalar(meta.get("tokenizer.ggml.add_eos_token", False))),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta.get("llama.context_length", 2048))),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in config.items() if v is not None}


def convert(
    gguf_path,
    out_dir,
    dtype: str = "float32",
    overwrite: bool = False,
    *,
    _unpermute: bool = True,
) -> Path:
    """Convert ``gguf_path`` into the mlx-lm model folder ``out_dir``.

    The folder is written to a temporary sibling and renamed into place, so
    a crash or a concurrent conversion never leaves a half-written model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    weights, meta = read_gguf(gguf_path)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty")

    try:
        return _convert(gguf_path, out_dir, weights, meta, dtype, _unpermute)
    except (KeyError, TypeError, IndexError, AttributeError) as e:  # names or types damaged
        raise GGUFError(f"{gguf_path} is damaged or not a llama GGUF file "
                        f"({type(e).__name__}: {e})") from e
    except GGUFError:
        raise
    except ValueError as e:
        raise GGUFError(f"{gguf_path}: {e}") from e


def _convert(gguf_path, out_dir, weights, meta, dtype, _unpermute) -> Path:
    config = model_config(meta, has_output="output.weight" in weights)
    file_type = int(_scalar(meta.get("general.file_type", -1)))
    gguf_type = FILE_TYPES.get(file_type, f"file_type {file_type}")
    config["source_weights"] = {
        "format": "gguf",
        "gguf_type": gguf_type,
        "dtype": dtype,
        "description": f"GGUF {gguf_type} dequantized to {dtype}",
        "file": gguf_path.name,
        "sha256": sha256_file(gguf_path),
        "name": _scalar(meta.get("general.name", "")),
        "qk_unpermuted": _unpermute,
    }
    mlx_weights = convert_weights(weights, config, DTYPES[dtype], _unpermute=_unpermute)
    tokenizer = build_tokenizer(meta)
    tok_config = tokenizer_config(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), mlx_weights, metadata={"format": "mlx"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, data in (("config.json", config), ("tokenizer_config.json", tok_config)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "model")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
