"""Where cached tokens sit: the storage of one part of a cache (Layout), a
stretch of cached tokens as attention reads it (Segment), and the layouts a
spec stores its body in.

A body part is either 16-bit [B, H, T, D], or a quantized triple (codes,
scales, biases) in mx.quantize's packing: per token along head_dim, or per
channel, transposed to [B, H, D, T] and grouped along tokens (keys of a
channel-key spec). The caches (cache_base, cache, batch_cache) write and
slice their buffers only through Layout; attention reads Segments.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import mlx.core as mx

from . import quant


@dataclass(frozen=True)
class Layout:
    """Where tokens sit in one body part: fp [B, H, T, D], or a quantized
    triple along the last axis (per-token) or transposed (per-channel keys)."""

    bits: Optional[int]
    group: int
    transposed: bool

    def shapes(self, B, H, cap, D):
        """Shapes and dtypes of the arrays holding `cap` tokens (fp: None dtype,
        the storage dtype)."""
        if self.bits is None:
            return [((B, H, cap, D), None)]
        G = self.group
        if self.transposed:  # codes [B, H, D, T]
            codes, scales = (B, H, D, quant.packed_width(cap, self.bits)), (B, H, D, cap // G)
        else:
            codes, scales = (B, H, cap, quant.packed_width(D, self.bits)), (B, H, cap, D // G)
        return [(codes, mx.uint32), (scales, quant.SCALE_DTYPE), (scales, quant.SCALE_DTYPE)]

    def alloc(self, B, H, cap, D, fp):
        parts = [mx.zeros(shape, dtype or fp) for shape, dtype in self.shapes(B, H, cap, D)]
        return parts[0] if self.bits is None else tuple(parts)

    def nbytes(self, H, cap, D) -> int:
        """Bytes of one sequence's `cap` tokens in this layout (16-bit fp parts)."""
        return sum(math.prod(shape) * (dtype or quant.FP_DTYPE).size
                   for shape, dtype in self.shapes(1, H, cap, D))

    def _ranges(self, a, b):
        """Index ranges of tokens [a, b) in (codes, scales, biases)."""
        if not self.transposed:
            return [(a, b)] * 3
        G, w = self.group, quant.packed_width
        return [(w(a, self.bits), w(b, self.bits)), (a // G, b // G), (a // G, b // G)]

    def slice(self, part, a, b):
        if self.bits is None:
            return part[..., a:b, :]
        if self.transposed:
            return tuple(x[..., i:j] for x, (i, j) in zip(part, self._ranges(a, b)))
        return tuple(x[..., a:b, :] for x in part)

    def write(self, dst, src, a, row=None):
        """Write `src` at token a of `dst` (of batch row `row` only, if given)."""
        b = a + (src.shape[2] if self.bits is None else self._count(src))
        r = slice(None) if row is None else slice(row, row + 1)
        if self.bits is None:
            dst[r, :, a:b, :] = src
            return dst
        for x, y, (i, j) in zip(dst, src, self._ranges(a, b)):
            if self.transposed:
                x[r, :, :, i:j] = y
            else:
                x[r, :, i:j, :] = y
        return dst

    def encode(self, x):
        """[B, H, T, D] tokens into this layout's storage form."""
        if self.bits is None:
            return x
        return quant.quantize(x.swapaxes(-1, -2) if self.transposed else x, self.bits,
                              self.group)

    def decode(self, part, dtype=mx.float32):
        """Tokens as a [B, H, T, D] array (dequantized if quantized)."""
        if self.bits is None:
            return part.astype(dtype)
        x = quant.dequantize(part, self.bits, self.group, dtype)
        return x.swapaxes(-1, -2) if self.transposed else x

    def _count(self, part):
        return part[1].shape[-1] * self.group if self.transposed else part[0].shape[2]


@dataclass
class Segment:
    """One stretch of cached tokens as attention sees it. `keys`/`values` may
    be preallocated buffers longer than `length`; view() gives exact slices.

    In a batch whose sequences hold different numbers of tokens (ragged),
    `start` and `valid` are per sequence: sequence b holds tokens
    [0, valid[b]) of the stretch, the first at absolute position start[b].
    """

    start: Union[int, Tuple[int, ...]]  # absolute position of its first token
    length: int
    keys: object
    values: object
    k_layout: Layout
    v_layout: Layout
    valid: Optional[Tuple[int, ...]] = None  # None: all `length` tokens, every row

    @property
    def ragged(self) -> bool:
        return self.valid is not None

    def view(self, a: int, b: int) -> "Segment":
        """Tokens [a, b) of this segment (a multiple of the group for transposed keys)."""
        if self.ragged:
            start = tuple(s + a for s in self.start)
            valid = tuple(min(max(v - a, 0), b - a) for v in self.valid)
        else:
            start, valid = self.start + a, None
        return Segment(start, b - a, self.k_layout.slice(self.keys, a, b),
                       self.v_layout.slice(self.values, a, b), self.k_layout,
                       self.v_layout, valid)


def layouts(spec) -> Tuple[Layout, Layout]:
    """The (keys, values) layouts of a spec's quantized body."""
    return (Layout(spec.k_bits, spec.group_size, spec.keys_per_channel),
            Layout(spec.v_bits, spec.group_size, False))


def fp_layout(spec) -> Layout:
    """The layout of a spec's 16-bit parts (sinks, residual)."""
    return Layout(None, spec.group_size, False)


def own_copy(x):
    """A copy of a slice (an array or a quantized part's triple): a view would
    keep its whole source buffer alive, or alias the buffer written next."""
    return tuple(map(mx.contiguous, x)) if isinstance(x, tuple) else mx.contiguous(x)
