"""Where cached tokens sit: the storage of one part of a cache (Layout), a
stretch of cached tokens as attention reads it (Segment), and the layouts a
spec stores its body in.

A body part is either 16-bit [B, H, T, D], or a quantized triple (codes,
scales, biases) in mx.quantize's packing: per token along head_dim, or per
channel, transposed to [B, H, D, T] and grouped along tokens (keys of a
channel-key spec). The caches (cache_base, cache, batch_cache) write and
slice their buffers only through Layout; attention reads Segments.
"""

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import mlx.core as mx

from . import quant


@dataclass(frozen=True)
class Layout:
    """Where tokens sit in one body part: fp [B, H, T, D], or a quantized
    triple along the last axis (per-token) or transposed (per-channel keys).

    hi: per-channel keys only: the first `hi` channels (the outlier channels,
    stored first) are a triple of their own at bits + 1, the other D - hi at
    `bits`; the part is then the two triples flattened into six arrays.
    """

    bits: Optional[int]
    group: int
    transposed: bool
    hi: int = 0

    def pieces(self, D):
        """(bits, first channel, end channel) of each quantized triple."""
        if self.hi:
            return [(self.bits + 1, 0, self.hi), (self.bits, self.hi, D)]
        return [(self.bits, 0, D)]

    def split(self, part):
        """A quantized part as its triples, one per piece."""
        return [tuple(part[i:i + 3]) for i in range(0, len(part), 3)]

    def shapes(self, B, H, cap, D):
        """Shapes and dtypes of the arrays holding `cap` tokens (fp: None dtype,
        the storage dtype)."""
        if self.bits is None:
            return [((B, H, cap, D), None)]
        G, out = self.group, []
        for bits, d0, d1 in self.pieces(D):
            if self.transposed:  # codes [B, H, D, T]
                codes = (B, H, d1 - d0, quant.packed_width(cap, bits))
                scales = (B, H, d1 - d0, cap // G)
            else:
                codes, scales = (B, H, cap, quant.packed_width(D, bits)), (B, H, cap, D // G)
            out += [(codes, mx.uint32), (scales, quant.SCALE_DTYPE), (scales, quant.SCALE_DTYPE)]
        return out

    def alloc(self, B, H, cap, D, fp):
        parts = [mx.zeros(shape, dtype or fp) for shape, dtype in self.shapes(B, H, cap, D)]
        return parts[0] if self.bits is None else tuple(parts)

    def nbytes(self, H, cap, D) -> int:
        """Bytes of one sequence's `cap` tokens in this layout (16-bit fp parts)."""
        return sum(math.prod(shape) * (dtype or quant.FP_DTYPE).size
                   for shape, dtype in self.shapes(1, H, cap, D))

    def _ranges(self, part, a, b):
        """Index ranges of tokens [a, b) in each array of a quantized part."""
        if not self.transposed:
            return [(a, b)] * len(part)
        G, w = self.group, quant.packed_width
        widths = (self.bits + 1, self.bits) if self.hi else (self.bits,)
        out = []
        for bits in widths[:len(part) // 3]:
            out += [(w(a, bits), w(b, bits)), (a // G, b // G), (a // G, b // G)]
        return out

    def slice(self, part, a, b):
        if self.bits is None:
            return part[..., a:b, :]
        if self.transposed:
            return tuple(x[..., i:j] for x, (i, j) in zip(part, self._ranges(part, a, b)))
        return tuple(x[..., a:b, :] for x in part)

    def write(self, dst, src, a, row=None):
        """Write `src` at token a of `dst` (of batch row `row` only, if given)."""
        b = a + (src.shape[2] if self.bits is None else self._count(src))
        r = slice(None) if row is None else slice(row, row + 1)
        if self.bits is None:
            dst[r, :, a:b, :] = src
            return dst
        for x, y, (i, j) in zip(dst, src, self._ranges(dst, a, b)):
            if self.transposed:
                x[r, :, :, i:j] = y
            else:
                x[r, :, i:j, :] = y
        return dst

    def encode(self, x):
        """[B, H, T, D] tokens into this layout's storage form."""
        if self.bits is None:
            return x
        if not self.transposed:
            return quant.quantize(x, self.bits, self.group)
        xt = x.swapaxes(-1, -2)
        out = ()
        for bits, d0, d1 in self.pieces(x.shape[-1]):
            out += quant.quantize(xt[..., d0:d1, :], bits, self.group)
        return out

    def decode(self, part, dtype=mx.float32):
        """Tokens as a [B, H, T, D] array (dequantized if quantized)."""
        if self.bits is None:
            return part.astype(dtype)
        if not self.transposed:
            return quant.dequantize(part, self.bits, self.group, dtype)
        widths = (self.bits + 1, self.bits) if self.hi else (self.bits,)
        xs = [quant.dequantize(q, bits, self.group, dtype)
              for q, bits in zip(self.split(part), widths)]
        x = xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=-2)
        return x.swapaxes(-1, -2)

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


@functools.lru_cache(maxsize=256)
def layouts(spec) -> Tuple[Layout, Layout]:
    """The (keys, values) layouts of a spec's quantized body."""
    return (Layout(spec.k_bits, spec.group_size, spec.keys_per_channel, spec.k_outliers),
            Layout(spec.v_bits, spec.value_group, False))


@functools.lru_cache(maxsize=256)
def fp_layout(spec) -> Layout:
    """The layout of a spec's 16-bit parts (sinks, residual)."""
    return Layout(None, spec.group_size, False)


def own_copy(x):
    """A copy of a slice (an array or a quantized part's triple): a view would
    keep its whole source buffer alive, or alias the buffer written next."""
    return tuple(map(mx.contiguous, x)) if isinstance(x, tuple) else mx.contiguous(x)
