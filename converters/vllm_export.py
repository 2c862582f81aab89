"""Export a calibrated model's KV scales for vLLM's FP8 KV cache.

vLLM keeps an FP8 (e4m3) KV cache with one static scale per layer for keys
and one for values, read from the checkpoint when config.json's
quantization_config (compressed-tensors) has a kv_cache_scheme. The scales
are absmax / 448 (e4m3's largest finite value) of the keys (after RoPE, as
cached) and values recorded by `mlx_kvq.calibrate`, under the names
llm-compressor writes: model.layers.{i}.self_attn.k_scale / v_scale, float32
of shape [1].

mlx-lm refuses a compressed-tensors quantization_config it cannot map to its
own formats, so the export is its own folder (weights hard-linked when
possible); the mlx_kvq folder stays loadable by mlx-lm.

Usage::

    python -m mlx_kvq.converters.vllm_export --model CALIBRATED_DIR --out DIR
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

from ..files import write_json
from ..kvplan import PLAN_FILE, SCALES_FILE, copy_model, load_plan

FP8_E4M3_MAX = 448.0
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor",
                   "dynamic": False, "symmetric": True}
VLLM_SCALES_FILE = "kv_cache_scales.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def kv_scales(plan) -> dict:
    """Per-layer FP8 scales from the calibrated absmax of keys and values."""
    out = {}
    for i, st in sorted(plan.stats.items()):
        for kind in ("k", "v"):
            amax = max(float(st[f"{kind}_absmax"].max()), 1e-12)
            out[f"model.layers.{i}.self_attn.{kind}_scale"] = mx.array(
                [amax / FP8_E4M3_MAX], dtype=mx.float32)
    return out


def quantization_config(config: dict) -> dict:
    """config.json's quantization_config with the KV cache scheme added."""
    q = dict(config.get("quantization_config") or {})
    if q and q.get("quant_method") != "compressed-tensors":
        raise ValueError(f"the model is already quantized with {q.get('quant_method')!r}; "
                         "only compressed-tensors can carry a kv_cache_scheme")
    q.setdefault("quant_method", "compressed-tensors")
    q.setdefault("format", "dense")
    q.setdefault("config_groups", {})
    q.setdefault("ignore", [])
    q["kv_cache_scheme"] = dict(KV_CACHE_SCHEME)
    return q


def export(model_dir, out_dir) -> Path:
    """Write a vLLM folder: the model's files, the scales, the config entry."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    plan = load_plan(model_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("export into a folder of its own: mlx-lm cannot load a model "
                         "whose config.json carries a compressed-tensors kv_cache_scheme")
    copy_model(model_dir, out_dir)
    scales = kv_scales(plan)
    mx.save_safetensors(str(out_dir / VLLM_SCALES_FILE), scales,
                        metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config.pop("mlx_kvq", None)  # the mlx_kvq plan files are not copied
    config["quantization_config"] = quantization_config(config)
    write_json(out_dir / "config.json", config)
    index = out_dir / INDEX_FILE
    if index.is_file():  # vLLM then loads only the files the index names
        d = json.loads(index.read_text())
        d["weight_map"].update({name: VLLM_SCALES_FILE for name in scales})
        write_json(index, d)
    return out_dir / VLLM_SCALES_FILE


def main(argv=None):
    p = argparse.ArgumentParser(description="Export calibrated FP8 KV scales for vLLM")
    p.add_argument("--model", required=True,
                   help=f"A folder calibrated by mlx_kvq.calibrate ({PLAN_FILE}, {SCALES_FILE})")
    p.add_argument("--out", required=True, help="The vLLM model folder to write")
    args = p.parse_args(argv)
    try:
        print(f"wrote {export(args.model, args.out)}")
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
