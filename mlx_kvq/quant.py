"""Affine group quantization of KV blocks on top of mx.quantize.

A quantized block is a (codes, scales, biases) triple in mx.quantize's packing,
quantized along the last axis. Scales and biases are kept in float16 whatever
the model's dtype: they are a large share of the bytes at low bits, and fp16
keeps their error far below the quantization error.
"""

import mlx.core as mx

SCALE_DTYPE = mx.float16
FP_DTYPE = mx.float16


def storage_dtype(dtype):
    """Dtype of the full-precision parts (sinks, residual): 16-bit."""
    return dtype if dtype in (mx.float16, mx.bfloat16) else FP_DTYPE


def quantize(x: mx.array, bits: int, group_size: int):
    """Quantize along the last axis; returns (codes, scales, biases)."""
    codes, scales, biases = mx.quantize(
        x.astype(mx.float32), group_size=group_size, bits=bits
    )
    return codes, scales.astype(SCALE_DTYPE), biases.astype(SCALE_DTYPE)


def dequantize(q, bits: int, group_size: int, dtype=mx.float32) -> mx.array:
    codes, scales, biases = q
    return mx.dequantize(
        codes,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=group_size,
        bits=bits,
    ).astype(dtype)


def packed_width(n: int, bits: int) -> int:
    """uint32 words holding n codes of `bits` bits."""
    return n * bits // 32


def hadamard(x: mx.array) -> mx.array:
    """Orthonormal Hadamard rotation of the last axis (its own inverse)."""
    return mx.hadamard_transform(x, scale=x.shape[-1] ** -0.5)
