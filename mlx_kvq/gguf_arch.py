"""What a GGUF architecture means to mlx-lm: the ``config.json`` each mlx-lm
model class expects, built from the file's metadata, and the map from the
file's tensor names to mlx-lm's with the shape each tensor must have.

Architectures: ``llama`` (mlx_lm.models.llama; llama.cpp permutes the Q/K
rows, which mlx_kvq.gguf undoes), ``qwen2`` (QKV biases, not permuted),
``qwen3`` (per-head q_norm/k_norm) and ``gemma3`` (mlx_lm.models.gemma3_text:
four norms per layer, llama.cpp stores the norms as ``1 + weight``, a
sliding window every layer but each sixth, a tied output). An ``Arch``
holds what differs between them; ``ARCHS`` lists them.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np


class GGUFError(ValueError):
    """The GGUF file is missing, unreadable, damaged or of an architecture
    the converter does not map."""


# Per-layer tensors every architecture has: GGUF name -> mlx-lm name.
LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Arch:
    """One GGUF architecture: its mlx-lm model_type, its extra per-layer
    tensors, whether llama.cpp permuted its Q/K rows, whether its norms are
    stored shifted by one, and a function adding its own config keys."""

    model_type: str
    hf_class: str
    layer: Dict[str, str] = field(default_factory=dict)
    qk_norm: bool = False
    qkv_bias: bool = False
    permuted_qk: bool = False
    norm_shift: float = 0.0
    extra: Optional[Callable[[dict, dict, str], None]] = None

    def layer_names(self) -> Dict[str, str]:
        names = dict(LAYER, **self.layer)
        if self.qk_norm:
            names.update(attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")
        return names


def _gemma3(config: dict, meta: dict, arch: str):
    head_dim = config["head_dim"]
    # llama.cpp: 27B scales queries by hidden/heads, the others by head_dim.
    scalar = (config["hidden_size"] // config["num_attention_heads"]
              if config["num_hidden_layers"] == 62 else head_dim)
    config.update(query_pre_attn_scalar=scalar, sliding_window_pattern=6,
                  rope_local_base_freq=10000.0,
                  sliding_window=_int(meta, f"{arch}.attention.sliding_window", 4096))
    config.pop("rope_traditional", None)


ARCHS = {
    "llama": Arch("llama", "LlamaForCausalLM", {"ffn_norm": "post_attention_layernorm"}, permuted_qk=True),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", {"ffn_norm": "post_attention_layernorm"}, qkv_bias=True),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", {"ffn_norm": "post_attention_layernorm"}, qk_norm=True),
    "gemma3": Arch("gemma3_text", "Gemma3ForCausalLM",
                   {"post_attention_norm": "post_attention_layernorm",
                    "ffn_norm": "pre_feedforward_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm"},
                   qk_norm=True, norm_shift=1.0, extra=_gemma3),
}
DEFAULT_ROPE_THETA = {"llama": 10000.0, "qwen2": 1000000.0, "qwen3": 1000000.0,
                      "gemma3": 1000000.0}


def _get(meta: dict, key: str, default=None):
    if key in meta:
        return meta[key]
    if default is None:
        raise GGUFError(f"GGUF metadata lacks {key!r}")
    return default


def _int(meta: dict, key: str, default=None) -> int:
    v = _get(meta, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise GGUFError(f"GGUF metadata {key} is {v!r}, not an integer")
    return int(v)


def _f32(meta: dict, key: str, default=None) -> float:
    # Metadata floats are float32: print them with float32 precision (1e-05, not 9.99e-06).
    v = _get(meta, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        raise GGUFError(f"GGUF metadata {key} is {v!r}, not a number")
    return float(str(np.float32(v)))


def arch_of(meta: dict) -> Tuple[str, Arch]:
    arch = _get(meta, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; the converter maps "
                        f"{', '.join(sorted(ARCHS))}")
    return arch, ARCHS[arch]


def rope_scaling(meta: dict, arch: str, head_dim: int, theta: float, rope_freqs) -> Optional[dict]:
    """mlx-lm's rope_scaling from ``{arch}.rope.scaling.*``, or llama 3's
    recovered from the file's ``rope_freqs`` factors."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    ctx = meta.get(f"{arch}.rope.scaling.original_context_length")
    if rope_freqs is not None:
        return _llama3_scaling(np.asarray(rope_freqs, np.float64), head_dim, theta, ctx)
    if kind == "none":
        return None
    factor = _f32(meta, f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"type": "yarn", "factor": factor}
        if ctx is not None:
            out["original_max_position_embeddings"] = int(ctx)
        return out
    raise GGUFError(f"GGUF rope scaling {kind!r} is not supported (none, linear, yarn, "
                    "llama 3's rope_freqs)")


def _llama3_scaling(freqs, head_dim: int, theta: float, ctx) -> dict:
    """The llama 3 rope_scaling whose per-frequency factors (as
    convert_hf_to_gguf computes them) equal the file's rope_freqs."""
    if freqs.shape != (head_dim // 2,):
        raise GGUFError(f"the GGUF rope_freqs tensor has shape {freqs.shape}, not "
                        f"(head_dim / 2,) = ({head_dim // 2},)")
    factor = float(freqs.max())
    for orig in dict.fromkeys(([int(ctx)] if ctx else []) + [8192]):
        low, high = 1.0, 4.0
        want = []
        for f in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
            wavelen = 2 * math.pi / f
            if wavelen < orig / high:
                want.append(1.0)
            elif wavelen > orig / low:
                want.append(factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                want.append(1 / ((1 - smooth) / factor + smooth))
        if np.allclose(freqs, want, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise GGUFError("the GGUF rope_freqs tensor matches no llama 3 rope scaling "
                    "(low 1, high 4, original context 8192)")


def model_config(meta: dict, tensors, rope_freqs=None) -> dict:
    """config.json for mlx-lm from the metadata; `tensors`: the file's tensor
    names (whether there is an output tensor, biases); `rope_freqs`: the
    values of its rope_freqs tensor, if any."""
    arch, spec = arch_of(meta)
    hidden = _int(meta, f"{arch}.embedding_length")
    n_head = _int(meta, f"{arch}.attention.head_count")
    n_kv = _int(meta, f"{arch}.attention.head_count_kv", n_head)
    default_hd = hidden // n_head if n_head > 0 else 0
    head_dim = _int(meta, f"{arch}.attention.key_length",
                    meta.get(f"{arch}.rope.dimension_count", default_hd))
    vocab = meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
    theta = _f32(meta, f"{arch}.rope.freq_base", DEFAULT_ROPE_THETA[arch])
    config = {
        "architectures": [spec.hf_class],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": _int(meta, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _int(meta, f"{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "rope_traditional": False,
        "max_position_embeddings": _int(meta, f"{arch}.context_length"),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    sizes = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim",
                                     "vocab_size", "max_position_embeddings")}
    bad = {k: v for k, v in sizes.items() if not 0 < v < 1 << 31}
    if bad or n_head % n_kv or head_dim % 2:
        raise GGUFError(f"GGUF metadata gives impossible sizes {bad or sizes}")
    if arch == "qwen2" and head_dim != hidden // n_head:
        raise GGUFError(f"qwen2 in mlx-lm needs head_dim = hidden/heads = {hidden // n_head}; "
                        f"the GGUF says {head_dim}")
    config["rope_scaling"] = rope_scaling(meta, arch, head_dim, theta, rope_freqs)
    if arch == "llama":
        config.update(hidden_act="silu",
                      attention_bias="blk.0.attn_q.bias" in tensors,
                      mlp_bias="blk.0.ffn_up.bias" in tensors)
    if spec.extra is not None:
        spec.extra(config, meta, arch)
    for name in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in meta:
            config[f"{name.replace('padding', 'pad')}_token_id"] = _int(meta, key)
    return config


def tensor_map(meta: dict, config: dict) -> Dict[str, Tuple[str, tuple]]:
    """{GGUF tensor name: (mlx-lm name, shape mlx-lm expects)} for the tensors
    this architecture and config need, biases where the file has them."""
    _, spec = arch_of(meta)
    c = config
    hidden, hd, ffn = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"attn_q": (q, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, q), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn), "attn_q_norm": (hd,), "attn_k_norm": (hd,)}
    out = {"token_embd.weight": (f"{TOP['token_embd']}.weight", (c["vocab_size"], hidden)),
           "output_norm.weight": (f"{TOP['output_norm']}.weight", (hidden,))}
    if not c["tie_word_embeddings"]:
        out["output.weight"] = (f"{TOP['output']}.weight", (c["vocab_size"], hidden))
    biased = set()
    if spec.qkv_bias:
        biased = {"attn_q", "attn_k", "attn_v"}
    elif c.get("attention_bias"):
        biased = {"attn_q", "attn_k", "attn_v", "attn_output"}
    if c.get("mlp_bias"):
        biased |= {"ffn_gate", "ffn_up", "ffn_down"}
    for i in range(c["num_hidden_layers"]):
        for short, name in spec.layer_names().items():
            shape = shapes.get(short, (hidden,))
            out[f"blk.{i}.{short}.weight"] = (f"model.layers.{i}.{name}.weight", shape)
            if short in biased:
                out[f"blk.{i}.{short}.bias"] = (f"model.layers.{i}.{name}.bias", shape[:1])
    return out
