"""KVQCache: a KV cache stored quantized in memory, for one sequence of an
mlx-lm model.

Tokens live in three segments, in temporal order:
  sinks     the first `spec.sinks` tokens, 16-bit;
  body      quantized; keys per channel (stored transposed, [B, H, D, T],
            quantized along tokens in groups) or per token, values per token;
  residual  the most recent tokens, 16-bit, flushed into the body once more
            than `spec.residual` wait (in whole groups for channel keys).
Attention (attention.py) reads the segments where they are; nothing is
dequantized into a full-precision copy. The queries of an update read the
cache as it was before that update's flush: the tokens it flushed are read
from their 16-bit copy (the residual before the flush), so a prefill chunk
attends to its own tokens, and to the residual before them, at full
precision, and a decode step reads the `residual` tokens before it at full
precision as every step does; the quantized store is what later updates
read. Bytes held do not change: the copy is the update's own input. With
`max_size` the oldest body tokens are evicted in whole flush units; with
`window` (a sliding-window layer) what no new query can see is dropped
before new tokens arrive.

The token counts are ints (`offset`, `body_start`, `n_body`); what this class
shares with KVQBatchCache (buffers, limits, the byte model) is in
cache_base.py, storage layouts in storage.py. Its `state` is what mlx-lm's
prompt-cache files hold, checked on load.
"""

import json
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import create_attention_mask

from . import quant
from .cache_base import (FORMAT_VERSION, CachedTensorUse, Calibration,  # noqa: F401
                         KVQBaseCache, KVQView, permute_channels, round_up)
from .spec import KVQuantSpec
from .storage import Layout, Segment, own_copy  # noqa: F401


class KVQCache(KVQBaseCache):
    batch_class = None  # KVQBatchCache (batch_cache.py sets it)

    def __init__(self, spec=None, max_size: Optional[int] = None,
                 calibration: Optional[Calibration] = None, window: Optional[int] = None):
        super().__init__(spec, max_size=max_size, calibration=calibration, window=window)
        self.offset = 0
        self.body_start = 0
        self.n_body = 0
        self.drift = None  # [2] counts of flushed K, V elements beyond the limits
        self.drift_checked = 0  # flushed K (= V) elements compared

    @classmethod
    def merge(cls, caches):
        """One KVQBatchCache holding these caches' sequences (mlx-lm's batch
        protocol: BatchGenerator merges per-sequence caches this way)."""
        return cls.batch_class.merge(caches)

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
        before = (self.n_body, self.size(), self.res_k, self.res_v)
        self._read = None
        self._flush()
        if self.max_size is not None:
            self._evict(L)
        if self.n_body != before[0] and self.size() == before[1]:  # flushed, evicted nothing
            self._read = (before[0],) + before[2:]
        return KVQView(self), KVQView(self)

    def query_start(self, L):
        """Absolute position of the first of the L tokens just added."""
        return self.offset - L

    def _sink_len(self):
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    def _res_len(self):
        return 0 if self.res_k is None else self.res_k.shape[2]

    def _flush(self):
        n = self.spec.flush_size(self._res_len())
        if n <= 0:
            return
        k, v = self.res_k[..., :n, :], self.res_v[..., :n, :]
        self.res_k, self.res_v = own_copy(self.res_k[..., n:, :]), own_copy(self.res_v[..., n:, :])
        if self.n_body == 0:
            self.body_start = self.offset - self._res_len() - n
        if self.n_body + n > self.capacity:
            self._rebuild(0, self.n_body + n)
        out = self._drift_counts(k, v)
        if out is not None:
            self.drift = out if self.drift is None else self.drift + out
            self.drift_checked += k.size
        self._write_body(k, v, self.n_body)
        self.n_body += n

    def _rebuild(self, drop, need):
        """Reallocate the body for `need` tokens, keeping tokens [drop, n_body)."""
        self._realloc_body(self._capacity(need), drop, self.n_body)
        self.n_body -= drop
        self.body_start += drop

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
        self._shift_body(drop, self.n_body)
        self.n_body = keep
        self.body_start += drop

    def _evict(self, L):
        """Drop the oldest body tokens (keeping sinks and the L just added)
        to stay within max_size."""
        drop = self._evict_size(self.size(), self.n_body, self.body_start, self.offset, L)
        if drop > 0:
            self._rebuild(drop, self.n_body - drop)

    # -- reading ----------------------------------------------------------

    def _reads(self, stored=False):
        """(body tokens, residual K, residual V) attention reads: as stored,
        or, right after an update that flushed (unless `stored`), as they
        were before its flush."""
        if self._read is None or stored:
            return self.n_body, self.res_k, self.res_v
        return self._read

    def segments(self, stored=False):
        """The cached tokens as attention reads them, as Segments in temporal
        order (empty ones left out): after an update that flushed, the body as
        it was before and the 16-bit residual before the flush; with `stored`,
        as they are stored (what later updates read).

        The body segment holds the preallocated buffers (no copy)."""
        fp, (lk, lv) = self._fp_layout(), self._layouts()
        n_body, res_k, res_v = self._reads(stored)
        n_res = 0 if res_k is None else res_k.shape[2]
        out = []
        if self._sink_len():
            out.append(Segment(0, self._sink_len(), self.sink_k, self.sink_v, fp, fp))
        if n_body:
            out.append(Segment(self.body_start, n_body, self.body_k, self.body_v, lk, lv))
        if n_res:
            out.append(Segment(self.offset - n_res, n_res, res_k, res_v, fp, fp))
        return out

    def dequantized(self, stored=True):
        """Every cached token as float32 [B, H, T, D] keys and values in the
        model's space (rotation and smoothing undone), token by token: as
        stored (what the next update's attention reads), or with
        stored=False as the last update's attention read them. Of a batch
        cache, extract(i) a row first."""
        if self.empty():
            raise ValueError("the cache holds no tokens")
        if not self.size():  # trimmed to nothing: no tokens, the cache's dims
            B, H, D, Dv = self.dims
            return mx.zeros((B, H, 0, D)), mx.zeros((B, H, 0, Dv))
        parts = [[s.k_layout.decode(s.k_layout.slice(s.keys, 0, s.length)),
                  s.v_layout.decode(s.v_layout.slice(s.values, 0, s.length))]
                 for s in self.segments(stored)]
        keys, values = (mx.concatenate(x, axis=2) for x in zip(*parts))
        if self.k_order is not None:
            keys = permute_channels(keys, mx.argsort(self.k_order, axis=-1))
        if self.v_smooth is not None:
            values = values * self.v_smooth[:, None, :].astype(mx.float32)
        if self.spec.rotate_values:
            values = quant.hadamard(values)
        if self.spec.rotate_keys:
            keys = quant.hadamard(keys)
        return keys, values

    def size(self):
        return self._sink_len() + self.n_body + self._res_len()

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
        self._read = None
        n = min(n, self.size())
        unit = self.spec.flush_unit
        # Bring back the fewest whole body units (as their dequantized values)
        # for the residual to hold the tokens to drop, in one piece.
        if n > self._res_len() and self.n_body:
            take = min(self.n_body, round_up(n - self._res_len(), unit))
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
        fp = self._fp_dtype()
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
                  body_k, body_v, c.v_smooth, c.k_limit, c.v_limit, self.drift, c.k_order]
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
        self._read = None
        meta = json.loads(v[0])
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown KVQCache format "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
        v = [tuple(p) if isinstance(p, list) else p for p in v]
        if len(v) not in (7, 11, 12):
            raise ValueError(f"{len(v)} state entries, not 12")
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
        extra = (list(v[7:12]) + [None] * 5)[:5]
        self.calibration = None if calib is None else Calibration(
            *extra[:3], source=calib.get("source", ""), k_order=extra[4])
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
        fp = self._fp_dtype()

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
            if self.n_body % self.spec.flush_unit:
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


def _cat(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return mx.concatenate([a, b], axis=2)
