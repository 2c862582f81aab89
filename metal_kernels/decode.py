"""Metal decode-attention kernels that read the quantized KV cache directly.

``metal_decode_partials`` computes exactly what
``mlx_kvq.attention.quantized_segment_partials`` computes -- per (b, kv head,
query row) the softmax partials ``m = max_t s_t``, ``l = sum_t exp(s_t - m)``,
``o = sum_t exp(s_t - m) V_t`` over the first ``n_tokens`` cached tokens --
with one fused kernel (``metal_kernels/dequant_attention.metal``) that
dequantizes K and V in registers instead of materializing them.
``n_tokens`` is one count for every batch row or one count per row (a ragged
batch: row b sees tokens ``[0, n_tokens[b])``; a row with no token gets
``m = -inf, l = 0, o = 0``); ``first_token`` (likewise) hides the oldest
tokens, as a sliding window does: row b sees ``[first_token[b], n_tokens[b])``.
Keys split by width (``k_hi`` outlier channels one bit wider, the others in
``k_lo``) are scored in one pass over the channels; values may have a group
of their own (``v_group_size``).

Design (split-K flash decoding):

* grid ``(128, B*Hkv, n_splits)``, threadgroup 128 threads = 4 simdgroups;
  threadgroup (bh, s) takes a contiguous slice of ``split_tokens`` tokens
  (a multiple of 128, hence of every group size) and all R query rows of kv
  head bh, so each K/V byte is read by exactly one threadgroup, once;
* the kernel reads each batch row's token count from the ``lengths`` input
  and its first visible token from ``starts`` (int32 [B] each) and clips its
  slices to them; the splits are sized from the largest count, and splits
  outside a row's tokens write empty partials (m = -inf, l = 0, o = 0) that
  the merge ignores;
* per block of 128 tokens: one token per thread for the scores (K^T rows are
  contiguous in tokens), block max via ``simd_max`` + threadgroup memory,
  online-softmax rescale, then each simdgroup accumulates its 32 tokens of V
  with lanes owning D/32 channels; o is summed across simdgroups at the end;
* each split writes (m, l, o); the splits are merged here in MLX (a few tiny
  element-wise ops), not in a second kernel.

Selection: ``use_metal()`` is true when Metal is available, unless the
environment variable ``MLX_KVQ_KERNELS`` says otherwise:
``mlx`` -- always the pure-MLX path; ``cpu`` -- the native CPU kernel
(``mlx_kvq.cpu_kernels``), not this one; ``metal`` -- always the kernel (error if no
Metal); ``emu`` -- the kernel through the CPU emulation (``metal_emu``; slow,
for tests); ``auto`` or unset -- the default.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from pathlib import Path
from typing import Sequence

import mlx.core as mx

__all__ = [
    "ENV_VAR",
    "kernel_mode",
    "use_metal",
    "supports",
    "metal_decode_partials",
    "kernel_sources",
]

ENV_VAR = "MLX_KVQ_KERNELS"
_MODES = ("auto", "mlx", "cpu", "metal", "emu")

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_GROUP_SIZES = (32, 64, 128)

NSG = 4                 # simdgroups per threadgroup
THREADS = 32 * NSG      # threads per threadgroup == tokens per block
MAX_ROWS = 16           # query rows per launch (registers: ROWS * D/32 floats per lane)
TG_MEM_BYTES = 32768    # threadgroup memory on Apple GPUs
TARGET_THREADGROUPS = 256

_INPUTS = ["qg", "k_codes", "k_scales", "k_biases", "kl_codes", "kl_scales", "kl_biases",
           "v_codes", "v_scales", "v_biases", "lengths", "starts", "params"]
_OUTPUTS = ["m_out", "l_out", "o_out"]


# ---------------------------------------------------------------- selection
def kernel_mode() -> str:
    """The value of ``MLX_KVQ_KERNELS`` (``auto`` when unset)."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def _metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


def use_metal() -> bool:
    """Whether decode attention should use the fused kernel."""
    mode = kernel_mode()
    if mode in ("mlx", "cpu"):
        return False
    if mode == "emu":
        return True
    if mode == "metal":
        if not _metal_available():
            raise RuntimeError(
                f"{ENV_VAR}=metal but Metal is not available on this machine "
                f"(use {ENV_VAR}=mlx for the pure-MLX path or {ENV_VAR}=emu for the CPU emulation)"
            )
        return True
    return _metal_available()


def _backend() -> str:
    mode = kernel_mode()
    if mode == "emu":
        return "emu"
    if not _metal_available():
        raise RuntimeError(
            f"metal_decode_partials needs a Metal GPU (or {ENV_VAR}=emu for the CPU emulation)"
        )
    return "metal"


# ------------------------------------------------------------------ sources
def _source_dir():
    return Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def kernel_sources() -> tuple[str, str]:
    """(header, body) text of the decode-attention kernel."""
    d = _source_dir()
    header = d.joinpath("dequant_attention.h").read_text()
    body = d.joinpath("dequant_attention.metal").read_text()
    return header, body


@functools.lru_cache(maxsize=None)
def _decode_kernel(backend: str):
    header, body = kernel_sources()
    if backend == "emu":
        from . import emulator as metal_emu

        factory = metal_emu.metal_kernel
    else:
        factory = mx.fast.metal_kernel
    return factory(
        name="kvq_dequant_decode",
        input_names=_INPUTS,
        output_names=_OUTPUTS,
        source=body,
        header=header,
        ensure_row_contiguous=True,
    )


# -------------------------------------------------------------------- shape
def _tg_bytes(rows: int, head_dim: int) -> int:
    return 4 * (rows * head_dim + rows * THREADS + NSG * rows)


def supports(k_bits, v_bits, head_dim: int | None = None, group_size: int | None = None,
             v_group_size: int | None = None, k_hi: int = 0) -> bool:
    """Whether the fused kernel handles this cache configuration (bits of
    None mean an unquantized tensor: not handled). Pass head_dim and the
    group sizes too when known; they are checked only if given. k_hi:
    outlier key channels at k_bits + 1 (fewer than head_dim)."""
    if k_bits not in SUPPORTED_BITS or v_bits not in SUPPORTED_BITS:
        return False
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        return False
    if k_hi and (k_hi < 0 or k_bits + 1 not in SUPPORTED_BITS
                 or head_dim is not None and k_hi >= head_dim):
        return False
    for g in (group_size, v_group_size):
        if g is not None and g not in SUPPORTED_GROUP_SIZES:
            return False
        if head_dim is not None and g is not None and head_dim % g:
            return False
    return True


def _split_tokens(n_tokens: int, n_heads: int) -> int:
    """Tokens per split: a multiple of the block size, enough splits to give
    the GPU ~TARGET_THREADGROUPS threadgroups."""
    blocks = max(1, math.ceil(n_tokens / THREADS))
    want = max(1, min(blocks, math.ceil(TARGET_THREADGROUPS / max(1, n_heads))))
    return math.ceil(blocks / want) * THREADS


def _token_counts(n_tokens, batch: int, name: str = "n_tokens") -> tuple[list[int], bool]:
    """``n_tokens`` (one int for all rows, or one per batch row) as a list of
    ``batch`` ints, and whether it was given per row."""
    if hasattr(n_tokens, "tolist"):  # numpy / MLX arrays and their scalars
        n_tokens = n_tokens.tolist()
    try:
        return [operator.index(n_tokens)] * batch, False
    except TypeError:
        pass
    try:
        counts = [operator.index(n) for n in n_tokens]
    except TypeError:
        raise TypeError(
            f"{name} must be an int or a sequence of {batch} ints (one per batch row), "
            f"got {n_tokens!r}"
        ) from None
    if len(counts) != batch:
        raise ValueError(
            f"{name} has {len(counts)} per-row counts but the batch has {batch} rows"
        )
    return counts, True


def _merge_splits(m, l, o):
    """Combine per-split partials [B, H, S, R(, D)] into [B, H, R(, D)]."""
    if m.shape[2] == 1:
        return m[:, :, 0], l[:, :, 0], o[:, :, 0]
    m_all = mx.max(m, axis=2)
    # Heads without tokens keep m = -inf; avoid (-inf) - (-inf).
    m_ref = mx.where(mx.isinf(m_all), mx.zeros_like(m_all), m_all)
    w = mx.exp(m - m_ref[:, :, None, :])
    l_all = mx.sum(w * l, axis=2)
    o_all = mx.sum(w[..., None] * o, axis=2)
    return m_all, l_all, o_all


def metal_decode_partials(
    qg,
    k_codes,
    k_scales,
    k_biases,
    v_codes,
    v_scales,
    v_biases,
    *,
    k_bits: int,
    v_bits: int,
    group_size: int,
    n_tokens: int | Sequence[int],
    first_token: int | Sequence[int] = 0,
    v_group_size: int | None = None,
    k_hi: int = 0,
    k_lo: tuple | None = None,
    split_tokens: int | None = None,
    backend: str | None = None,
):
    """Fused-kernel version of ``attention.quantized_segment_partials``.

    Keys split by width (outlier channels): ``k_hi`` > 0 channels at
    ``k_bits + 1`` in k_codes/k_scales/k_biases (``[B, H, k_hi, ...]``) and
    the other ``D - k_hi`` at ``k_bits`` in ``k_lo`` (codes, scales,
    biases). ``v_group_size``: the values' group when it is not the keys'.

    ``n_tokens``: tokens held, one int for every batch row or a sequence of
    B ints, one per row (ragged batch; row b sees tokens [0, n_tokens[b]));
    each a multiple of ``group_size`` within the cache capacity.
    ``first_token``: the first token each row's query sees (one int or one
    per row, any position up to the row's count; a sliding window's).
    Pass the cache's full preallocated buffers (not slices): inputs must be
    row-contiguous, and a sliced view would be copied every step.
    ``split_tokens`` overrides the split size (multiple of 128);
    ``backend`` is ``"metal"`` or ``"emu"`` (default: from ``MLX_KVQ_KERNELS``).
    Returns (m, l, o) float32 of shapes [B, Hkv, R], [B, Hkv, R], [B, Hkv, R, D].
    """
    B, H, R, D = qg.shape
    G = int(group_size)
    Gv = int(v_group_size or G)
    counts, per_row = _token_counts(n_tokens, B)
    firsts, _ = _token_counts(first_token, B, "first_token")
    if not supports(k_bits, v_bits, head_dim=D, group_size=G, v_group_size=Gv, k_hi=k_hi):
        raise ValueError(
            f"fused decode kernel does not support head_dim={D}, k_bits={k_bits}, "
            f"v_bits={v_bits}, group_size={G}, v_group_size={Gv}, k_hi={k_hi}"
        )
    if (k_hi > 0) != (k_lo is not None):
        raise ValueError("keys split by width need both k_hi > 0 and k_lo (the other "
                         "channels' codes, scales and biases)")
    kl_codes, kl_scales, kl_biases = k_lo if k_hi else (k_codes, k_scales, k_biases)
    if k_codes.shape[:3] != (B, H, k_hi or D) or (
            k_hi and kl_codes.shape[:3] != (B, H, D - k_hi)) \
            or v_codes.shape[:2] != (B, H) or v_codes.shape[3] * 32 != D * v_bits:
        raise ValueError(f"cache shapes {k_codes.shape}, {v_codes.shape} do not match qg {qg.shape}")
    if v_scales.shape[-1] * Gv != D:
        raise ValueError(f"value scales {v_scales.shape} hold {v_scales.shape[-1]} groups per "
                         f"token, v_group_size {Gv} gives {D // Gv}: pass the values' group")
    k_words = k_codes.shape[-1]
    k_groups = k_scales.shape[-1]
    kl_words = kl_codes.shape[-1]
    v_cap = v_codes.shape[2]
    capacity = min(v_cap, k_words * 32 // (k_bits + (k_hi > 0)), kl_words * 32 // k_bits,
                   k_groups * G)
    for b, n in enumerate(counts):
        if n < 0 or n % G or n > capacity:
            row = f" (batch row {b})" if per_row else ""
            raise ValueError(
                f"n_tokens={n}{row} must be a non-negative multiple of {G} "
                f"within the cache capacity of {capacity} tokens"
            )
    for b, (f, n) in enumerate(zip(firsts, counts)):
        if not 0 <= f <= n:
            raise ValueError(f"first_token={f} (batch row {b}) must be within the row's "
                             f"0..{n} tokens")
    max_tokens = max(counts, default=0)
    if split_tokens is None:
        split_tokens = _split_tokens(max_tokens, B * H)
    if split_tokens <= 0 or split_tokens % THREADS:
        raise ValueError(f"split_tokens must be a positive multiple of {THREADS}")
    n_splits = max(1, math.ceil(max_tokens / split_tokens))

    if k_scales.dtype not in (mx.float16, mx.float32):
        k_scales, k_biases = k_scales.astype(mx.float32), k_biases.astype(mx.float32)
    if kl_scales.dtype != k_scales.dtype:
        kl_scales, kl_biases = kl_scales.astype(k_scales.dtype), kl_biases.astype(k_scales.dtype)
    if v_scales.dtype not in (mx.float16, mx.float32):
        v_scales, v_biases = v_scales.astype(mx.float32), v_biases.astype(mx.float32)
    qg = qg.astype(mx.float32)
    lengths = mx.array(counts, dtype=mx.int32)
    starts = mx.array(firsts, dtype=mx.int32)
    params = mx.array([H, split_tokens, k_words, k_groups, v_cap, kl_words], dtype=mx.int32)
    kernel = _decode_kernel(backend or _backend())

    # Rows are processed together (each K/V byte read once) up to MAX_ROWS;
    # beyond that (multi-token queries) rows go in balanced chunks.
    n_chunks = math.ceil(R / MAX_ROWS)
    step = math.ceil(R / n_chunks)
    parts = []
    for r0 in range(0, R, step):
        rows = min(step, R - r0)
        assert _tg_bytes(rows, D) <= TG_MEM_BYTES
        q = qg if n_chunks == 1 else qg[:, :, r0 : r0 + rows]
        m, l, o = kernel(
            inputs=[q, k_codes, k_scales, k_biases, kl_codes, kl_scales, kl_biases, v_codes,
                    v_scales, v_biases, lengths, starts, params],
            template=[
                ("KBITS", int(k_bits)),
                ("VBITS", int(v_bits)),
                ("GROUP", G),
                ("VGROUP", Gv),
                ("KHI", int(k_hi)),
                ("HEAD_DIM", int(D)),
                ("ROWS", int(rows)),
                ("NSG", NSG),
            ],
            grid=(THREADS, B * H, n_splits),
            threadgroup=(THREADS, 1, 1),
            output_shapes=[(B, H, n_splits, rows), (B, H, n_splits, rows), (B, H, n_splits, rows, D)],
            output_dtypes=[mx.float32, mx.float32, mx.float32],
        )
        parts.append(_merge_splits(m, l, o))
    if len(parts) == 1:
        return parts[0]
    return tuple(mx.concatenate([p[i] for p in parts], axis=2) for i in range(3))


