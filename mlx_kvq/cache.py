"""KVQCache: a KV cache stored quantized in memory, for mlx-lm models.

Tokens live in three segments, in temporal order:
  sinks     the first `spec.sinks` tokens, 16-bit;
  body      quantized; keys per channel (stored transposed, [B, H, D, T],
            quantized along tokens in groups) or per token, values per token;
  residual  the most recent tokens, 16-bit, flushed into the body once more
            than `spec.residual` wait (in whole groups for channel keys).
Attention (attention.py) reads the segments where they are; nothing is
dequantized into a full-precision copy.
"""

import copy
import json
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from . import quant
from .spec import KVQuantSpec, parse_spec, short_label

FORMAT_VERSION = 1


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


@dataclass
class Calibration:
    """Static per-channel data of one layer, baked by a calibration run.

    v_smooth: [H, D] factors values are divided by before they are stored
        (SmoothQuant-style: outlier channels shrink so they stop widening
        every per-token group); attention multiplies its output back, which
        is exact in full precision.
    k_limit / v_limit: [H, D] calibrated |x| range of keys / values as
        stored (after rotation or smoothing). Flushed tokens beyond it are
        counted as drift; they are still quantized with their own dynamic
        per-group scales, never clipped.
    source: one line saying where the calibration came from, for reports.
    """

    v_smooth: Optional[mx.array] = None
    k_limit: Optional[mx.array] = None
    v_limit: Optional[mx.array] = None
    source: str = ""

    def check(self, spec, H, D, Dv):
        if self.v_smooth is not None and spec.rotate_values:
            raise ValueError("a layer cannot both rotate and smooth its values")
        for name, d in (("v_smooth", Dv), ("k_limit", D), ("v_limit", Dv)):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (H, d):
                raise ValueError(
                    f"calibration {name} has shape {tuple(x.shape)}, the layer's "
                    f"{'keys' if name[0] == 'k' else 'values'} have (kv_heads, head_dim)="
                    f"({H}, {d}); was it calibrated for another model?"
                )


class CachedTensorUse(TypeError):
    """A model used the keys/values a KVQCache returned as arrays."""


class KVQView:
    """Stands in for keys/values returned by update_and_fetch.

    The patched scaled_dot_product_attention reads the cache itself; a model
    that operates on the returned keys directly is not supported.
    """

    def __init__(self, cache):
        self.cache = cache

    @property
    def dtype(self):
        # Models cast the attention output back to the cached dtype (phi).
        return self.cache.dtype

    def __getattr__(self, name):
        raise CachedTensorUse(
            f"this model uses cached keys/values directly (.{name}); mlx_kvq "
            "supports models that route attention through "
            "mlx_lm.models.base.scaled_dot_product_attention"
        )


class KVQCache(_BaseCache):
    step = 256  # body capacity grows in steps (a multiple of every group size)

    def __init__(self, spec=None, max_size: Optional[int] = None,
                 calibration: Optional[Calibration] = None, window: Optional[int] = None):
        self.spec = parse_spec(spec)
        self.max_size = max_size
        self.window = window  # a sliding-window layer's window (tokens a query sees)
        self.calibration = calibration
        self.drift = None  # [2] counts of flushed K, V elements beyond the limits
        self.drift_checked = 0  # flushed K (= V) elements compared
        if max_size is not None and max_size < self.spec.sinks + self._min_window():
            raise ValueError(
                f"max_kv_size={max_size} is too small for {self.spec}: it must hold "
                f"{self.spec.sinks} sinks and {self._min_window()} recent tokens"
            )
        if window is not None and (self.spec.sinks or window < self._min_window()):
            raise ValueError(
                f"a sliding-window cache of {window} tokens with {self.spec} must keep no "
                f"sinks and a window of at least residual + {self._flush_unit()} tokens: "
                "use sinks=0 and a smaller residual (window_spec() picks them)")
        self.offset = 0
        self.body_start = 0
        self.n_body = 0
        self.sink_k = self.sink_v = None
        self.res_k = self.res_v = None
        self.body_k = self.body_v = None  # array or triple, preallocated
        self.capacity = 0
        self.dims = None  # (B, H, D, Dv)

    def _min_window(self):
        return self.spec.residual + self._flush_unit()

    def _flush_unit(self):
        s = self.spec
        return s.group_size if s.k_bits is not None and s.key_axis == "channel" else 1

    # -- writing ----------------------------------------------------------

    def update_and_fetch(self, keys, values):
        L = keys.shape[2]
        if self.window is not None:
            self._slide()
        keys, values = self._ingest(keys, values)
        n_sink = self._sink_len()
        if self.offset == n_sink and n_sink < self.spec.sinks:
            take = min(L, self.spec.sinks - n_sink)
            self.sink_k = _cat(self.sink_k, own_copy(keys[..., :take, :]))
            self.sink_v = _cat(self.sink_v, own_copy(values[..., :take, :]))
            keys, values = keys[..., take:, :], values[..., take:, :]
        if keys.shape[2]:
            self.res_k = _cat(self.res_k, keys)
            self.res_v = _cat(self.res_v, values)
        self.offset += L
        self._flush()
        if self.max_size is not None:
            self._evict(L)
        return KVQView(self), KVQView(self)

    def _ingest(self, keys, values):
        """Check new K/V against the cache's dims (set them on first use) and
        bring them to their stored form: rotated or smoothed, 16-bit."""
        B, H, L, D = keys.shape
        dims = (B, H, D, values.shape[-1])
        if self.dims is None:
            self.spec.validate_for(D, values.shape[-1])
            if self.calibration is not None:
                self.calibration.check(self.spec, *dims[1:])
            self.dims = dims
            self.dtype = keys.dtype
        elif dims[1:] != self.dims[1:] or (dims[0] != self.dims[0] and not self.batched):
            raise ValueError(
                f"cache holds K/V of shape (B, H, D, Dv)={self.dims} but got {dims}; "
                "was it made for another model?"
            )
        if self.spec.rotate_keys:
            keys = quant.hadamard(keys)
        if self.spec.rotate_values:
            values = quant.hadamard(values)
        if self.v_smooth is not None:
            values = values / self.v_smooth[:, None, :]
        fp = quant.storage_dtype(keys.dtype)
        return keys.astype(fp), values.astype(fp)

    batched = False

    def query_start(self, L):
        """Absolute position of the first of the L tokens just added."""
        return self.offset - L

    @property
    def v_smooth(self):
        return None if self.calibration is None else self.calibration.v_smooth

    def __deepcopy__(self, memo):
        # mx.Dtype cannot be copied; it is immutable, so the copy shares it.
        memo[id(getattr(self, "dtype", None))] = getattr(self, "dtype", None)
        out = self.__class__.__new__(self.__class__)
        memo[id(self)] = out
        out.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return out

    batch_class = None  # KVQBatchCache (batch_cache.py sets it)

    _HELD = ("sink_k", "sink_v", "res_k", "res_v", "body_k", "body_v")

    @property
    def keys(self):
        """The arrays the cache holds, flat. mlx-lm's pipeline-parallel models
        chain their send to the next rank onto the last layer's cache
        (`cache.keys = mx.depends(cache.keys, h)`) so that evaluating the
        cache's state also sends; this property and its setter carry that
        dependency into the arrays `state` returns."""
        out = []
        for name in self._HELD:
            part = getattr(self, name)
            out.extend(part if isinstance(part, (tuple, list)) else [] if part is None else [part])
        return out

    @keys.setter
    def keys(self, arrays):
        it = iter(arrays)
        for name in self._HELD:
            part = getattr(self, name)
            if isinstance(part, (tuple, list)):
                setattr(self, name, tuple(next(it) for _ in part))
            elif part is not None:
                setattr(self, name, next(it))

    @classmethod
    def merge(cls, caches):
        """One KVQBatchCache holding these caches' sequences (mlx-lm's batch
        protocol: BatchGenerator merges per-sequence caches this way)."""
        return cls.batch_class.merge(caches)

    def _sink_len(self):
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    def _res_len(self):
        return 0 if self.res_k is None else self.res_k.shape[2]

    def _flush_size(self, n_res):
        """Residual tokens to flush into the body when n_res wait there."""
        keep = self.spec.residual if self.spec.quantized else 0
        unit = self._flush_unit()
        return max(0, (n_res - keep) // unit * unit)

    def _evict_size(self, size, n_body, body_start, offset, L):
        """Oldest body tokens to drop (whole flush units) to keep `size`
        tokens within max_size, once L new tokens (up to `offset`) came in.
        Tokens of those L stay until the next update, as in mlx-lm's rotating
        cache: their queries see them (a prefill chunk longer than max_size
        is held whole for its step)."""
        excess = size - self.max_size
        unit = self._flush_unit()
        older = max(0, min(n_body, offset - L - body_start)) // unit * unit
        return min(-(-excess // unit) * unit, older) if excess > 0 else 0

    def _drift_counts(self, k, v):
        """[2] flushed K, V elements beyond the calibrated limits (None
        without limits); evaluated now, so no flushed block stays alive."""
        c = self.calibration
        if c is None or c.k_limit is None or c.v_limit is None:
            return None
        out = mx.stack([(mx.abs(k) > c.k_limit[:, None, :]).sum(),
                        (mx.abs(v) > c.v_limit[:, None, :]).sum()])
        mx.async_eval(out)
        return out

    def _flush(self):
        n = self._flush_size(self._res_len())
        if n <= 0:
            return
        k, v = self.res_k[..., :n, :], self.res_v[..., :n, :]
        self.res_k, self.res_v = own_copy(self.res_k[..., n:, :]), own_copy(self.res_v[..., n:, :])
        if self.n_body == 0:
            self.body_start = self.offset - self._res_len() - n
        self._append_body(k, v)

    def _layouts(self):
        s = self.spec
        k_t = s.k_bits is not None and s.key_axis == "channel"
        return Layout(s.k_bits, s.group_size, k_t), Layout(s.v_bits, s.group_size, False)

    def _fp_layout(self):
        return Layout(None, self.spec.group_size, False)

    def _append_body(self, k, v):
        if self.n_body + k.shape[2] > self.capacity:
            self._rebuild(0, self.n_body + k.shape[2])
        self._count_drift(k, v)
        lk, lv = self._layouts()
        self.body_k = lk.write(self.body_k, lk.encode(k), self.n_body)
        self.body_v = lv.write(self.body_v, lv.encode(v), self.n_body)
        self.n_body += k.shape[2]

    def _count_drift(self, k, v):
        out = self._drift_counts(k, v)
        if out is not None:
            self.drift = out if self.drift is None else self.drift + out
            self.drift_checked += k.size

    def _rebuild(self, drop, need):
        """Reallocate the body for `need` tokens, keeping tokens [drop, n_body)."""
        cap = self._capacity(need)
        B, H, D, Dv = self.dims
        fp = quant.storage_dtype(self.dtype)
        parts = []
        for lay, old, dim in zip(self._layouts(), (self.body_k, self.body_v), (D, Dv)):
            new = lay.alloc(B, H, cap, dim, fp)
            if old is not None and self.n_body > drop:
                new = lay.write(new, lay.slice(old, drop, self.n_body), 0)
            parts.append(new)
        self.body_k, self.body_v = parts
        self.n_body -= drop
        self.body_start += drop
        self.capacity = cap

    @classmethod
    def _capacity(cls, need: int) -> int:
        """Body capacity allocated for `need` tokens: whole steps."""
        return max(cls.step, -(-need // cls.step) * cls.step)

    def _window_drop(self, offset: int, body_start: int, n_body: int) -> int:
        """Oldest body tokens (whole flush units) that no query from position
        `offset` on can see: those before offset - window + 1."""
        unit = self._flush_unit()
        return min(n_body, max(0, (offset - self.window + 1 - body_start) // unit * unit))

    def _slide(self):
        """Before new tokens arrive: drop what their queries cannot see. The
        body shifts within its buffer, or moves to a smaller one after a
        prefill chunk grew it."""
        drop = self._window_drop(self.offset, self.body_start, self.n_body)
        if not drop:
            return
        keep = self.n_body - drop
        if self.capacity != self._capacity(keep):
            self._rebuild(drop, keep)
            return
        for name, lay in zip(("body_k", "body_v"), self._layouts()):
            part = getattr(self, name)
            live = own_copy(lay.slice(part, drop, self.n_body))
            setattr(self, name, lay.write(part, live, 0))
        self.n_body = keep
        self.body_start += drop

    def _evict(self, L):
        """Drop the oldest body tokens (keeping sinks and the L just added)
        to stay within max_size."""
        drop = self._evict_size(self.size(), self.n_body, self.body_start, self.offset, L)
        if drop > 0:
            self._rebuild(drop, self.n_body - drop)

    # -- reading ----------------------------------------------------------

    def segments(self):
        """The cached tokens as Segments in temporal order (empty ones left out).

        The body segment holds the preallocated buffers (no copy)."""
        fp, (lk, lv) = self._fp_layout(), self._layouts()
        out = []
        if self._sink_len():
            out.append(Segment(0, self._sink_len(), self.sink_k, self.sink_v, fp, fp))
        if self.n_body:
            out.append(Segment(self.body_start, self.n_body, self.body_k, self.body_v,
                               lk, lv))
        n_res = self._res_len()
        if n_res:
            out.append(Segment(self.offset - n_res, n_res, self.res_k, self.res_v, fp, fp))
        return out

    def dequantized(self):
        """Every cached token as float32 [B, H, T, D] keys and values in the
        model's space (rotation and smoothing undone): what attention reads,
        token by token. For one sequence per cache (extract a batch row first)."""
        if self.batched:
            raise ValueError("dequantized() reads one sequence: extract(i) a batch row first")
        if self.empty():
            raise ValueError("the cache holds no tokens")
        if not self.size():  # trimmed to nothing: no tokens, the cache's dims
            B, H, D, Dv = self.dims
            return mx.zeros((B, H, 0, D)), mx.zeros((B, H, 0, Dv))
        parts = [[s.k_layout.decode(s.k_layout.slice(s.keys, 0, s.length)),
                  s.v_layout.decode(s.v_layout.slice(s.values, 0, s.length))]
                 for s in self.segments()]
        keys, values = (mx.concatenate(x, axis=2) for x in zip(*parts))
        if self.v_smooth is not None:
            values = values * self.v_smooth[:, None, :].astype(mx.float32)
        if self.spec.rotate_values:
            values = quant.hadamard(values)
        if self.spec.rotate_keys:
            keys = quant.hadamard(keys)
        return keys, values

    def size(self):
        return self._sink_len() + self.n_body + self._res_len()

    # -- the byte model ----------------------------------------------------

    @classmethod
    def token_split(cls, spec, tokens: int, window: Optional[int] = None) -> Tuple[int, int, int]:
        """(sinks, body, residual) tokens a one-sequence cache holds after
        `tokens` tokens (no max_size eviction), whatever the chunks they came
        in: each flush leaves whole units in the body, so the residual ends
        with `residual` plus fewer than one unit of tokens. With a window, as
        a decode step leaves it: the body starts at the last whole unit at or
        before tokens - window."""
        c = cls(spec)
        n_sink = min(c.spec.sinks, tokens)
        flushed = c._flush_size(tokens - n_sink)
        start = 0
        if window is not None:
            unit = c._flush_unit()
            start = min(flushed, max(0, (tokens - window) // unit * unit))
        return n_sink, flushed - start, tokens - n_sink - flushed

    @classmethod
    def bytes_for(cls, spec, tokens: int, H: int, D: int, Dv: Optional[int] = None,
                  held: bool = True, window: Optional[int] = None) -> int:
        """Bytes of a one-sequence cache after `tokens` tokens, from the same
        rules as the cache itself: what `nbytes` reports (held: the body as
        allocated, in whole steps), or what attention reads (its tokens). A
        window cache as decode steps leave it (a prefill chunk's tokens beyond
        the window are held only until the next step)."""
        c = cls(spec)
        n_sink, n_body, n_res = cls.token_split(c.spec, tokens, window)
        Dv = Dv or D
        out = (n_sink + n_res) * H * (D + Dv) * quant.FP_DTYPE.size
        if n_body:
            cap = cls._capacity(n_body) if held else n_body
            lk, lv = c._layouts()
            out += lk.nbytes(H, cap, D) + lv.nbytes(H, cap, Dv)
        return out

    def empty(self):
        return self.dims is None

    @property
    def nbytes(self):
        arrays = [self.sink_k, self.sink_v, self.res_k, self.res_v]
        for part in (self.body_k, self.body_v):
            arrays.extend(part if isinstance(part, (tuple, list)) else [part])
        return sum(a.nbytes for a in arrays if a is not None)

    def make_mask(self, N, return_array=False, window_size=None):
        if self.window is not None:  # attention applies the window by positions
            if window_size is not None and window_size != self.window:
                raise ValueError(f"the model asks for a {window_size}-token window, this "
                                 f"cache was made for {self.window}")
            return None if N == 1 else "causal"
        return create_attention_mask(
            N, offset=self.offset, return_array=return_array, window_size=window_size
        )

    # -- trimming ---------------------------------------------------------

    def is_trimmable(self):
        # Until max_size evicts, the body starts right after the sinks.
        return (self.max_size is None and self.window is None) or \
            self.body_start <= self._sink_len()

    def trim(self, n):
        n = min(n, self.size())
        unit = self._flush_unit()
        # Bring back whole body groups (as their dequantized values) until the
        # residual holds the tokens to drop.
        while n > self._res_len() and self.n_body:
            take = min(self.n_body, unit if unit > 1 else n - self._res_len())
            k, v = self._decode_body(self.n_body - take, self.n_body)
            self.res_k, self.res_v = _cat(k, self.res_k), _cat(v, self.res_v)
            self.n_body -= take
        from_res = min(n, self._res_len())
        if from_res:
            keep = self._res_len() - from_res
            self.res_k, self.res_v = own_copy(self.res_k[..., :keep, :]), own_copy(self.res_v[..., :keep, :])
        from_sink = n - from_res
        if from_sink:
            keep = self._sink_len() - from_sink
            self.sink_k, self.sink_v = own_copy(self.sink_k[..., :keep, :]), own_copy(self.sink_v[..., :keep, :])
        self.offset -= n
        return n

    def _decode_body(self, a, b):
        fp = quant.storage_dtype(self.dtype)
        lk, lv = self._layouts()
        return (lk.decode(lk.slice(self.body_k, a, b), fp),
                lv.decode(lv.slice(self.body_v, a, b), fp))

    # -- serialization ----------------------------------------------------

    @property
    def meta_state(self):
        meta = {
            "format": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "offset": self.offset,
            "body_start": self.body_start,
            "n_body": self.n_body,
            "max_size": self.max_size,
            "window": self.window,
            "dims": self.dims,
            "dtype": None if self.dims is None else str(self.dtype),
            "calibration": None if self.calibration is None else {
                "source": self.calibration.source, "drift_checked": self.drift_checked},
        }
        return json.dumps(meta)

    @meta_state.setter
    def meta_state(self, v):
        pass  # carried inside `state`; accepted for mlx-lm's loader

    @property
    def state(self):
        """[meta JSON, sinks, residual, body, calibration, drift]. mlx-lm reads
        it after every prefill step to evaluate the cache, so it is only a
        list of what the cache holds (files are sealed by persist, not here);
        the setter checks that a state is one this class could have made."""
        lk, lv = self._layouts()
        body_k = body_v = None
        if self.n_body:
            body_k = lk.slice(self.body_k, 0, self.n_body)
            body_v = lv.slice(self.body_v, 0, self.n_body)
        c = self.calibration or Calibration()
        arrays = [self.sink_k, self.sink_v, self.res_k, self.res_v,
                  body_k, body_v, c.v_smooth, c.k_limit, c.v_limit, self.drift]
        return [self.meta_state] + arrays

    @state.setter
    def state(self, v):
        try:
            self._set_state(v)
            self._check_state()
        except ValueError as e:
            raise ValueError(f"corrupt KVQCache state: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"corrupt KVQCache state: {type(e).__name__}: {e}") from e

    def _set_state(self, v):
        meta = json.loads(v[0])
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown KVQCache format "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
        v = [tuple(p) if isinstance(p, list) else p for p in v]
        if len(v) not in (7, 11):
            raise ValueError(f"{len(v)} state entries, not 11")
        self.spec = KVQuantSpec.from_dict(meta["spec"])
        self.max_size = meta["max_size"]
        self.window = meta.get("window")
        self.offset, self.body_start = meta["offset"], meta["body_start"]
        self.n_body = meta["n_body"]
        self.dims = None if meta["dims"] is None else tuple(meta["dims"])
        self.sink_k, self.sink_v, self.res_k, self.res_v = v[1:5]
        self.body_k, self.body_v = v[5:7]
        self.capacity = self.n_body
        calib = meta.get("calibration")
        extra = (list(v[7:11]) + [None] * 4)[:4]
        self.calibration = None if calib is None else Calibration(
            *extra[:3], source=calib.get("source", ""))
        self.drift = extra[3]
        self.drift_checked = 0 if calib is None else calib.get("drift_checked", 0)
        if self.dims is not None:
            name = meta["dtype"].split(".")[-1]
            if name not in ("float32", "float16", "bfloat16"):
                raise ValueError(f"dtype {meta['dtype']!r}")
            self.dtype = getattr(mx, name)

    def _check_state(self):
        """A loaded state must be one this class could have made: field
        types, array shapes and dtypes, and token counts that add up."""
        for name in ("offset", "body_start", "n_body"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}")
        for name in ("max_size", "window"):
            if getattr(self, name) is not None and (
                    type(getattr(self, name)) is not int or getattr(self, name) < 1):
                raise ValueError(f"{name}={getattr(self, name)!r}")
        parts = (self.sink_k, self.sink_v, self.res_k, self.res_v, self.body_k, self.body_v)
        if self.dims is None:
            if self.offset or any(p is not None for p in parts):
                raise ValueError("tokens without dims")
            return
        if len(self.dims) != 4 or any(type(d) is not int or d < 1 for d in self.dims):
            raise ValueError(f"dims={self.dims!r}")
        B, H, D, Dv = self.dims
        self.spec.validate_for(D, Dv)
        fp = quant.storage_dtype(self.dtype)

        def check(x, shape, dtype, what):
            if not isinstance(x, mx.array) or tuple(x.shape) != tuple(shape) or x.dtype != dtype:
                got = (tuple(x.shape), x.dtype) if isinstance(x, mx.array) else type(x).__name__
                raise ValueError(f"{what} is {got}, expected {(tuple(shape), dtype)}")

        n_sink, n_res = self._sink_len(), self._res_len()
        for what, x, d in (("sink_k", self.sink_k, D), ("sink_v", self.sink_v, Dv),
                           ("res_k", self.res_k, D), ("res_v", self.res_v, Dv)):
            n = n_sink if what.startswith("sink") else n_res
            if x is not None or (what[-1] == "v" and n):
                check(x, (B, H, n, d), fp, what)
        if n_sink > self.spec.sinks:
            raise ValueError(f"{n_sink} sinks, the spec keeps {self.spec.sinks}")
        for what, lay, part, d in zip(("body_k", "body_v"), self._layouts(),
                                      (self.body_k, self.body_v), (D, Dv)):
            if not self.n_body:
                if part is not None:
                    raise ValueError(f"{what} without body tokens")
                continue
            if self.n_body % self._flush_unit():
                raise ValueError(f"n_body={self.n_body} is not whole flush units")
            shapes = lay.shapes(B, H, self.n_body, d)
            part = part if lay.bits is not None else (part,)
            if not isinstance(part, tuple) or len(part) != len(shapes):
                raise ValueError(f"{what} has {type(part).__name__}")
            for i, (x, (shape, dtype)) in enumerate(zip(part, shapes)):
                check(x, shape, dtype or fp, f"{what}[{i}]")
        c = self.calibration
        if c is not None:
            for what, x, d in (("v_smooth", c.v_smooth, Dv), ("k_limit", c.k_limit, D),
                               ("v_limit", c.v_limit, Dv)):
                if x is not None:
                    check(x, (H, d), x.dtype if isinstance(x, mx.array) else None, what)
            c.check(self.spec, H, D, Dv)
        if self.drift is not None:
            check(self.drift, (2,), self.drift.dtype if isinstance(self.drift, mx.array)
                  else None, "drift")
        held = n_sink + self.n_body + n_res
        contiguous = not self.n_body or (
            self.body_start >= n_sink and self.body_start + self.n_body + n_res == self.offset)
        if held > self.offset or not contiguous or (
                self.max_size is None and self.window is None and held != self.offset):
            raise ValueError(f"token counts do not add up (sinks {n_sink}, body {self.n_body} "
                             f"from {self.body_start}, residual {n_res}, offset {self.offset})")

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.state = state
        return obj


def own_copy(x):
    """A copy of a slice (an array or a quantized part's triple): a view would
    keep its whole source buffer alive, or alias the buffer written next."""
    return tuple(map(mx.contiguous, x)) if isinstance(x, tuple) else mx.contiguous(x)


def _cat(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return mx.concatenate([a, b], axis=2)


SLIDING_DEFAULT = "auto"
WINDOW_KEY_BITS = 8  # "auto": keys of sliding-window layers at least this wide


def sliding_base(spec, sliding=SLIDING_DEFAULT):
    """The spec sliding-window layers start from (window_spec then fits it to
    each window), or None for mlx-lm's full-precision rotating cache.

    sliding: "auto" (default: `spec` with keys at least WINDOW_KEY_BITS wide:
    a window layer's bytes are bounded by its window, not the context, and
    its keys cost most of the quality it loses), "same" (`spec` as it is),
    "keep", or another spec; None as "auto"."""
    sliding = SLIDING_DEFAULT if sliding is None else sliding
    if sliding == "keep":
        return None
    spec = parse_spec(spec)
    if sliding == "same":
        return spec
    if sliding == "auto":
        k_bits = spec.k_bits if spec.k_bits is None else max(spec.k_bits, WINDOW_KEY_BITS)
        return replace(spec, k_bits=k_bits)
    return parse_spec(sliding)


def describe_sliding(spec, sliding=SLIDING_DEFAULT) -> str:
    """What sliding-window layers get, for reports: "sliding-window layers at
    k8v4, without sinks" or "... in full precision"."""
    base = sliding_base(spec, sliding)
    how = "in full precision" if base is None else f"at {short_label(base)}, without sinks"
    return f"sliding-window layers {how}"


def window_spec(spec, window: int):
    """The spec a sliding-window layer of `window` tokens uses for `spec`: no
    sinks (the model's window hides the first tokens), and a residual small
    enough for the window (whole groups for per-channel keys); None when even
    no residual fits."""
    spec = parse_spec(spec)
    unit = KVQCache(spec)._flush_unit()
    room = (window - unit) // unit * unit
    if room < 0:
        return None
    return replace(spec, sinks=0, residual=min(spec.residual, room))
