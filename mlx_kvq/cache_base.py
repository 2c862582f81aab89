"""What a single-sequence cache (KVQCache) and a batch cache (KVQBatchCache)
share: the spec and its limits, the stored form of incoming K/V, the body's
buffers and how they grow and shift, drift counting, and the byte model.

Both hold tokens in three segments, in temporal order: 16-bit sinks (the
first `spec.sinks` tokens), the quantized body and the 16-bit residual (the
most recent tokens, flushed into the body by spec.flush_size). The arrays
are `sink_k/v`, `res_k/v` and the preallocated `body_k/v` (an array or a
quantized triple, `capacity` tokens long; layouts in storage.py). Each class
keeps its own token counts: ints for one sequence, per-row lists for a batch.

Attention (attention.py) reads any cache of this base through `spec`, `dims`
(B, H, D, Dv), `window`, `segments()` and `query_start(L)`, which each class
provides; the keys/values a model gets back are KVQViews.
"""

import copy
from dataclasses import dataclass, replace
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import _BaseCache

from . import quant
from .spec import parse_spec
from .storage import fp_layout, layouts, own_copy

FORMAT_VERSION = 1


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
    k_order: [H, D] int32 key channel order of a spec with outlier channels
        (spec.k_outliers): keys are stored with their channels in this order,
        the outliers first, and queries are read in it (exact: a score is a
        sum over channels).
    source: one line saying where the calibration came from, for reports.
    """

    v_smooth: Optional[mx.array] = None
    k_limit: Optional[mx.array] = None
    v_limit: Optional[mx.array] = None
    source: str = ""
    k_order: Optional[mx.array] = None

    def check(self, spec, H, D, Dv):
        if self.v_smooth is not None and spec.rotate_values:
            raise ValueError("a layer cannot both rotate and smooth its values")
        if self.k_order is not None:
            o = np.asarray(self.k_order)
            if o.shape != (H, D) or (np.sort(o, axis=-1) != np.arange(D)).any():
                raise ValueError(f"calibration k_order must order the {D} key channels of "
                                 f"each of {H} kv heads; got shape {o.shape}")
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


def key_order(keys: mx.array, n_outliers: int) -> mx.array:
    """[H, D] channel order, the `n_outliers` channels of widest range over
    `keys` [B, H, T, D] (all rows) first: what a cache with outlier channels
    uses when no order was given."""
    k = keys.astype(mx.float32)
    width = (k.max(axis=2) - k.min(axis=2)).max(axis=0)  # [H, D]
    return mx.argsort(-width, axis=-1).astype(mx.int32)


def permute_channels(x: mx.array, order: mx.array) -> mx.array:
    """x [B, Hx, L, D] with each head's channels in `order` [H, D] (Hx a
    multiple of H: query heads of a group share their kv head's order)."""
    rep = x.shape[1] // order.shape[0]
    o = mx.repeat(order, rep, axis=0) if rep > 1 else order
    return mx.take_along_axis(x, o[None, :, None, :], axis=-1)


def round_up(n: int, step: int) -> int:
    """n rounded up to whole steps, at least one step."""
    return max(step, -(-n // step) * step)


class KVQBaseCache(_BaseCache):
    step = 256  # body capacity grows in steps (a multiple of every group size)

    _HELD = ("sink_k", "sink_v", "res_k", "res_v", "body_k", "body_v")
    _read = None  # what the last update's queries read, if not what is stored (segments())

    def __init__(self, spec=None, max_size: Optional[int] = None,
                 calibration: Optional[Calibration] = None, window: Optional[int] = None):
        self.spec = parse_spec(spec)
        self.max_size = max_size
        self.window = window  # a sliding-window layer's window (tokens a query sees)
        self.calibration = calibration
        self.spec.check_max_size(max_size).check_window(window)
        self.sink_k = self.sink_v = None
        self.res_k = self.res_v = None
        self.body_k = self.body_v = None  # array or triple, preallocated
        self.capacity = 0
        self.dims = None  # (B, H, D, Dv)

    def _ingest(self, keys, values):
        """Check new K/V against the cache's dims (set them on first use) and
        bring them to their stored form: rotated or smoothed, 16-bit."""
        B, H, L, D = keys.shape
        dims = (B, H, D, values.shape[-1])
        if self.dims is None:
            self.spec.validate_for(D, values.shape[-1])
            if self.spec.k_outliers and self.k_order is None:
                self.calibration = replace(
                    self.calibration or Calibration(source="key channel order: first tokens"),
                    k_order=key_order(keys, self.spec.k_outliers))
            if self.calibration is not None:
                self.calibration.check(self.spec, *dims[1:])
            self.dims = dims
            self.dtype = keys.dtype
        elif dims != self.dims:
            raise ValueError(
                f"cache holds K/V of shape (B, H, D, Dv)={self.dims} but got {dims}; "
                "was it made for another model?"
            )
        if self.spec.rotate_keys:
            keys = quant.hadamard(keys)
        if self.k_order is not None:
            keys = permute_channels(keys, self.k_order)
        if self.spec.rotate_values:
            values = quant.hadamard(values)
        if self.v_smooth is not None:
            values = values / self.v_smooth[:, None, :]
        fp = self._fp_dtype()
        return keys.astype(fp), values.astype(fp)

    def _fp_dtype(self):
        return quant.storage_dtype(self.dtype)

    @property
    def v_smooth(self):
        return None if self.calibration is None else self.calibration.v_smooth

    @property
    def k_order(self):
        """The key channel order keys are stored in (outlier channels), or None."""
        c = self.calibration
        return None if c is None or not self.spec.k_outliers else c.k_order

    def empty(self):
        return self.dims is None

    def __deepcopy__(self, memo):
        # mx.Dtype cannot be copied; it is immutable, so the copy shares it.
        memo[id(getattr(self, "dtype", None))] = getattr(self, "dtype", None)
        out = self.__class__.__new__(self.__class__)
        memo[id(self)] = out
        # A copy reads what is stored (_read: the class default); its next update reads its own.
        out.__dict__.update(copy.deepcopy(
            {k: v for k, v in self.__dict__.items() if k != "_read"}, memo))
        return out

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

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.keys)

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    # -- the body's buffers -------------------------------------------------

    def _layouts(self):
        return layouts(self.spec)

    def _fp_layout(self):
        return fp_layout(self.spec)

    @classmethod
    def _capacity(cls, need: int) -> int:
        """Body capacity allocated for `need` tokens: whole steps."""
        return round_up(need, cls.step)

    def _realloc_body(self, cap: int, a: int, b: int):
        """Move the body into new buffers of `cap` tokens, tokens [a, b) of
        every row first."""
        B, H, D, Dv = self.dims
        fp = self._fp_dtype()
        parts = []
        for lay, old, dim in zip(self._layouts(), (self.body_k, self.body_v), (D, Dv)):
            new = lay.alloc(B, H, cap, dim, fp)
            if old is not None and b > a:
                new = lay.write(new, lay.slice(old, a, b), 0)
            parts.append(new)
        self.body_k, self.body_v = parts
        self.capacity = cap

    def _write_body(self, k, v, at: int, row: Optional[int] = None):
        """Quantize 16-bit tokens into the body at token `at` (of one row)."""
        lk, lv = self._layouts()
        self.body_k = lk.write(self.body_k, lk.encode(k), at, row=row)
        self.body_v = lv.write(self.body_v, lv.encode(v), at, row=row)

    def _shift_body(self, drop: int, n: int, row: Optional[int] = None):
        """Move body tokens [drop, n) to the front of their buffer (of one row)."""
        for name, lay in zip(("body_k", "body_v"), self._layouts()):
            part = getattr(self, name)
            src = part if row is None else batch_row(part, row)
            live = own_copy(lay.slice(src, drop, n))
            setattr(self, name, lay.write(part, live, 0, row=row))

    # -- limits ---------------------------------------------------------------

    def _evict_size(self, size, n_body, body_start, offset, L):
        """Oldest body tokens to drop (whole flush units) to keep `size`
        tokens within max_size, once L new tokens (up to `offset`) came in.
        Tokens of those L stay until the next update, as in mlx-lm's rotating
        cache: their queries see them (a prefill chunk longer than max_size
        is held whole for its step)."""
        excess = size - self.max_size
        unit = self.spec.flush_unit
        older = max(0, min(n_body, offset - L - body_start)) // unit * unit
        return min(-(-excess // unit) * unit, older) if excess > 0 else 0

    def _window_drop(self, offset: int, body_start: int, n_body: int) -> int:
        """Oldest body tokens (whole flush units) that no query from position
        `offset` on can see: those before offset - window + 1."""
        unit = self.spec.flush_unit
        return min(n_body, max(0, (offset - self.window + 1 - body_start) // unit * unit))

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

    # -- the byte model -------------------------------------------------------

    @classmethod
    def bytes_for(cls, spec, tokens: int, H: int, D: int, Dv: Optional[int] = None,
                  held: bool = True, window: Optional[int] = None) -> int:
        """Bytes of a one-sequence cache after `tokens` tokens, from the same
        rules as the cache itself: what `nbytes` reports (held: the body as
        allocated, in whole steps), or what attention reads (its tokens). A
        window cache as decode steps leave it (a prefill chunk's tokens beyond
        the window are held only until the next step)."""
        spec = parse_spec(spec)
        n_sink, n_body, n_res = spec.token_split(tokens, window)
        Dv = Dv or D
        out = (n_sink + n_res) * H * (D + Dv) * quant.FP_DTYPE.size
        if n_body:
            cap = cls._capacity(n_body) if held else n_body
            lk, lv = layouts(spec)
            out += lk.nbytes(H, cap, D) + lv.nbytes(H, cap, Dv)
        return out


def batch_row(part, b):
    """Batch row b of a part (an array or a quantized triple)."""
    if isinstance(part, tuple):
        return tuple(x[b:b + 1] for x in part)
    return part[b:b + 1]
