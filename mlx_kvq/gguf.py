"""Convert a GGUF file into an mlx-lm model folder, through the ``gguf``
package (ggml's own reader: ``gguf.GGUFReader``, ``gguf.quants.dequantize``).

The folder holds ``config.json``, the weights (dequantized to float32,
float16 or bfloat16, or re-quantized with mlx-lm's own ``quantize_model``)
and Hugging Face tokenizer files, so that ``mlx_lm.load(folder)`` works.
Architectures and their tensor maps are mlx_kvq.gguf_arch (llama, qwen2,
qwen3, gemma3); the tokenizer is mlx_kvq.gguf_tokenizer. Every ggml type the
``gguf`` package dequantizes is read (F32, F16, BF16, Q4_0 ... Q8_0, the
K-quants, the I-quants, TQ1_0/TQ2_0, MXFP4). ``config.json`` records where
the weights came from under ``"source_weights"``, since a model dequantized
from a 4-bit GGUF is not the same as the original checkpoint.

What is read is checked: the magic bytes, the header (a damaged or truncated
file, whatever the reader raises, is a GGUFError saying so), the metadata's
sizes, the tensor names (none missing, none unknown) and each tensor's shape
against the metadata, before any tensor is dequantized.

The embedded default model is converted this way on first use
(models.default_model_path); `mlx_kvq.convert_gguf` (converters/gguf_to_mlx.py)
is the command line.
"""

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from .files import sha256_file
from .gguf_arch import ARCHS, GGUFError, arch_of, model_config, tensor_map  # noqa: F401
from .gguf_tokenizer import build_tokenizer, tokenizer_config

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _checked_reader(path):
    """gguf.GGUFReader with each metadata array's item count checked against
    the bytes left, and nested arrays refused, before the reader loops over
    the items: on a damaged count it loops (and allocates) without end, as
    a read past the end of the file yields empty items that do not advance."""
    import gguf

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type == gguf.GGUFValueType.ARRAY:
                item = int(self._get(orig_offs, np.uint32)[0])
                count = int(self._get(orig_offs + 4, np.uint64)[0])
                scalar = self.gguf_scalar_to_np.get(item)
                size = np.dtype(scalar).itemsize if scalar is not None else 8
                if item == gguf.GGUFValueType.ARRAY:
                    raise ValueError(f"nested arrays at byte {orig_offs}")
                if count * size > len(self.data) - orig_offs - 12:
                    raise ValueError(f"an array of {count} items at byte {orig_offs} reaches "
                                     f"past the end of the file")
            return super()._get_field_parts(orig_offs, raw_type)

    return Reader(path)


class GGUFFile:
    """A GGUF file as the ``gguf`` package reads it: ``meta`` (key -> value,
    arrays as lists) and ``tensors`` (name -> gguf.ReaderTensor)."""

    def __init__(self, path):
        self.path = path = Path(path)
        if not path.is_file():
            raise GGUFError(f"GGUF file not found: {path}")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (magic bytes {magic!r})")
        try:
            reader = _checked_reader(path)
            self.meta = {k: f.contents() for k, f in reader.fields.items()
                         if not k.startswith("GGUF.")}
        except Exception as e:  # the reader raises whatever numpy raises on damage
            raise GGUFError(f"{path} is truncated or damaged: the gguf reader failed "
                            f"({type(e).__name__}: {e})") from e
        self.tensors = {t.name: t for t in reader.tensors}
        self.file_type = self.meta.get("general.file_type")

    def shape(self, name: str) -> tuple:
        """A tensor's shape in numpy (row-major) order."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def dequantize(self, name: str) -> np.ndarray:
        """A tensor as float32, dequantized by ``gguf.quants.dequantize``."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{self.path}: tensor {name} is of ggml type {t.tensor_type.name}, "
                            f"which the gguf package cannot dequantize ({e})") from e
        return np.asarray(w, dtype=np.float32).reshape(self.shape(name))

    def types(self) -> Dict[str, int]:
        """How many tensors of each ggml type the file holds."""
        return dict(Counter(t.tensor_type.name for t in self.tensors.values()))

    def type_name(self) -> str:
        """The file's type as llama.cpp names it (general.file_type), e.g. Q4_K_M."""
        import gguf

        try:
            name = gguf.LlamaFileType(int(self.file_type)).name
        except (TypeError, ValueError):
            return "/".join(sorted(self.types()))
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_gguf(path) -> GGUFFile:
    return GGUFFile(path)


def unpermute(w, n_head: int):
    """Invert llama.cpp's row permutation of the Q and K projections.

    ``convert_hf_to_gguf`` reorders each head's rows from the half-split
    rotary layout (HF / mlx-lm) to the interleaved one (llama.cpp) with
    ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``; this undoes it.
    """
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_of(gf: GGUFFile) -> dict:
    """The mlx-lm config.json of a GGUF file (gguf_arch.model_config)."""
    rope_freqs = gf.dequantize("rope_freqs.weight") if "rope_freqs.weight" in gf.tensors else None
    return model_config(gf.meta, gf.tensors, rope_freqs)


def check_tensors(gf: GGUFFile, config: dict) -> dict:
    """{GGUF name: (mlx-lm name, shape)}: every tensor the config needs is in
    the file with that shape, and the file holds no other."""
    layers = {n.split(".")[1] for n in gf.tensors if n.startswith("blk.")}
    if len(layers) != config["num_hidden_layers"]:
        raise GGUFError(f"{gf.path}: the metadata says {config['num_hidden_layers']} layers, "
                        f"the file holds tensors of {len(layers)}")
    want = tensor_map(gf.meta, config)
    have = set(gf.tensors) - {"rope_freqs.weight"}
    missing, extra = sorted(set(want) - have), sorted(have - set(want))
    if missing:
        raise GGUFError(f"{gf.path} lacks the tensor(s) {', '.join(missing[:5])} that a "
                        f"{config['model_type']} model of this metadata needs")
    if extra:
        raise GGUFError(f"{gf.path}: unexpected tensor(s) {', '.join(extra[:5])} for a "
                        f"{config['model_type']} model of this metadata")
    for name, (_, shape) in want.items():
        if gf.shape(name) != shape:
            raise GGUFError(f"{gf.path}: tensor {name} has shape {gf.shape(name)}; the metadata "
                            f"(sizes, head counts, head_dim) says {shape}")
    return want


def convert_weights(gf: GGUFFile, config: dict, dtype=mx.float32, *,
                    _unpermute: bool = True) -> Dict[str, mx.array]:
    """The file's tensors as mlx-lm weights: dequantized by the gguf package,
    llama's Q/K rows un-permuted, Gemma's norms unshifted, cast to dtype."""
    _, arch = arch_of(gf.meta)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for name, (mlx_name, _) in check_tensors(gf, config).items():
        w = gf.dequantize(name)
        short = name.split(".")[-2]
        if arch.permuted_qk and _unpermute and short in heads:
            w = unpermute(w, heads[short])
        if arch.norm_shift and short.endswith("norm"):
            w = w - np.float32(arch.norm_shift)
        out[mlx_name] = mx.array(w).astype(dtype)
        mx.eval(out[mlx_name])
    return out


def convert(gguf_path, out_dir, dtype: str = "float32", overwrite: bool = False, *,
            q_bits: Optional[int] = None, q_group_size: Optional[int] = None,
            quantize: bool = False, _unpermute: bool = True) -> Path:
    """Convert ``gguf_path`` into the mlx-lm model folder ``out_dir``, in
    ``dtype``, or with ``quantize`` re-quantized by mlx-lm's quantize_model
    (``q_bits``, ``q_group_size``: mlx-lm's defaults 4 and 64 if None).

    The folder is written to a temporary sibling and renamed into place, so
    a crash or a concurrent conversion never leaves a half-written model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if (q_bits or q_group_size) and not quantize:
        raise ValueError("q_bits and q_group_size need quantize=True (-q/--quantize)")
    out_dir = Path(out_dir)
    gf = read_gguf(gguf_path)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    quant = (q_bits, q_group_size) if quantize else None
    try:
        return _convert(gf, out_dir, dtype, quant, _unpermute)
    except (KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError,
            OverflowError) as e:  # names or types damaged
        raise GGUFError(f"{gf.path} is damaged or not a GGUF model the converter maps "
                        f"({type(e).__name__}: {e})") from e
    except GGUFError:
        raise
    except ValueError as e:
        raise GGUFError(f"{gf.path}: {e}") from e


def _quantize(weights: dict, config: dict, quant) -> tuple:
    """Weights and config re-quantized by mlx-lm (utils.quantize_model)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(dict(weights)) if hasattr(model, "sanitize") else weights
    model.load_weights(list(weights.items()))
    model, config = quantize_model(model, config, group_size=quant[1], bits=quant[0])
    return dict(tree_flatten(model.parameters())), config


def _convert(gf: GGUFFile, out_dir: Path, dtype: str, quant, _unpermute: bool) -> Path:
    config = config_of(gf)
    gguf_type = gf.type_name()
    description = f"GGUF {gguf_type} dequantized to {dtype}"
    mlx_weights = convert_weights(gf, config, DTYPES[dtype], _unpermute=_unpermute)
    tokenizer = build_tokenizer(gf.meta)
    tok_config = tokenizer_config(gf.meta, config["max_position_embeddings"])
    if quant is not None:
        mlx_weights, config = _quantize(mlx_weights, config, quant)
        q = config["quantization"]
        description = (f"GGUF {gguf_type} dequantized to {dtype}, re-quantized by mlx-lm to "
                       f"{q['bits']}-bit (group size {q['group_size']})")
    config["source_weights"] = {
        "format": "gguf",
        "architecture": gf.meta["general.architecture"],
        "gguf_type": gguf_type,
        "tensor_types": gf.types(),
        "dtype": dtype,
        "description": description,
        "file": gf.path.name,
        "sha256": sha256_file(gf.path),
        "name": gf.meta.get("general.name", ""),
        "qk_unpermuted": _unpermute and arch_of(gf.meta)[1].permuted_qk,
    }

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
