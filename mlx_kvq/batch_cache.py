"""KVQBatchCache: quantized KV caches of many sequences decoded together.

It follows mlx-lm's batch-cache protocol (`merge` from single caches,
`extract(i)` back to one, `filter`, `extend`, `prepare`/`finalize`,
`make_mask`, an array `offset` for RoPE), so mlx-lm's `BatchGenerator` and
`batch_generate` run with quantized caches: they merge the per-sequence
`KVQCache`s they are given through `KVQCache.merge`.

Layout: the three segments of `KVQCache` with a batch axis, each sequence
left-aligned in its own row and holding its own number of tokens:
  sinks     [B, H, sinks, D] 16-bit, n_sink[b] filled;
  body      quantized like KVQCache's body, n_body[b] tokens per row (whole
            groups for channel keys), row b's first token at position
            body_start[b];
  residual  [B, H, cap, D] 16-bit, res_len[b] tokens per row.
No padding token is written: left padding given to `prepare` is skipped as
it arrives, and the right padding of a batched prompt (`prepare(lengths=)`)
is never stored. Buffers are allocated alike for every row, as long as the
longest row needs. Each row flushes its residual into its body by the same
rule as a single cache, so an extracted cache holds exactly what the same
sequence served alone would hold. Attention (attention.py) masks each row to
its own tokens and positions; per-row counts are kept on the host, so
bookkeeping needs no device sync.

It is a sibling of KVQCache over KVQBaseCache (cache_base.py): the buffers,
limits and byte model are shared, the token counts here are per-row lists.
"""

import functools
import json
from typing import List, Optional

import mlx.core as mx

from .cache import KVQCache
from .cache_base import FORMAT_VERSION, KVQBaseCache, KVQView, batch_row, round_up
from .storage import Segment, own_copy


# Per-sequence bookkeeping, one list entry per batch row.
ROW_FIELDS = ("offsets", "n_sink", "n_body", "body_start", "res_len", "skip", "q_start",
              "drift", "drift_checked")


class KVQBatchCache(KVQBaseCache):
    def __init__(self, spec=None, batch_size: int = 0, max_size: Optional[int] = None,
                 calibration=None, window: Optional[int] = None):
        super().__init__(spec, max_size=max_size, calibration=calibration, window=window)
        B = batch_size
        self.offsets = [0] * B  # absolute position of each row's next token
        self.n_sink = [0] * B
        self.n_body = [0] * B
        self.body_start = [0] * B
        self.res_len = [0] * B
        self.skip = [0] * B  # left padding still to arrive
        self.remaining = None  # real tokens still to arrive in a right-padded prompt
        self.q_start = [0] * B
        self.drift = [None] * B
        self.drift_checked = [0] * B
        self.res_cap = 0

    # -- mlx-lm's view of the batch ---------------------------------------

    @property
    def offset(self):
        # Models read it for every RoPE call: one array per change of offsets.
        key = tuple(self.offsets)
        if getattr(self, "_offset_key", None) != key:
            self._offset_key, self._offset_arr = key, mx.array(self.offsets)
        return self._offset_arr

    @offset.setter
    def offset(self, v):
        pass  # set per row through `offsets`

    @property
    def batch_size(self):
        return len(self.offsets)

    def query_start(self, L):
        return mx.array(self.q_start)

    def make_mask(self, N, return_array=False, window_size=None, **kwargs):
        # Attention builds each row's mask from the rows' own counts.
        return None if N == 1 else "causal"

    def size(self):
        return max(self._row_size(b) for b in range(self.batch_size)) if self.offsets else 0

    def _row_size(self, b):
        return self.n_sink[b] + self.n_body[b] + self.res_len[b]

    # -- writing ----------------------------------------------------------

    def update_and_fetch(self, keys, values):
        B, _, L, _ = keys.shape
        if B != self.batch_size:
            raise ValueError(f"the batch cache holds {self.batch_size} sequences, "
                             f"got K/V for {B}")
        if self.window is not None and self.dims is not None:
            for b in range(B):  # what the new queries cannot see
                self._drop_row(b, self._window_drop(self.offsets[b], self.body_start[b],
                                                    self.n_body[b]))
        keys, values = self._ingest(keys, values)
        self._alloc_rows()
        fronts, reals = [0] * B, [L] * B
        if any(self.skip) or self.remaining is not None:
            for b in range(B):
                front = min(self.skip[b], L)
                self.skip[b] -= front
                real = L - front
                if self.remaining is not None:
                    real = min(real, self.remaining[b])
                    self.remaining[b] -= real
                fronts[b], reals[b] = front, real
        self.q_start = list(self.offsets)
        takes = [0] * B  # tokens each row puts into its sinks
        if min(self.n_sink, default=0) < self.spec.sinks:
            takes = [min(r, self.spec.sinks - self.n_sink[b])
                     if self.n_body[b] == 0 and self.res_len[b] == 0 else 0
                     for b, r in enumerate(reals)]
        self._grow_residual(max(n + L for n in self.res_len))
        if any(fronts) or any(takes):
            for b in range(B):  # the first tokens of a sequence: per row
                f, t, r = fronts[b], takes[b], reals[b]
                if t:
                    n = self.n_sink[b]
                    self.sink_k[b:b + 1, :, n:n + t] = keys[b:b + 1, :, f:f + t]
                    self.sink_v[b:b + 1, :, n:n + t] = values[b:b + 1, :, f:f + t]
                    self.n_sink[b] += t
                if r > t:
                    c = self.res_len[b]
                    self.res_k[b:b + 1, :, c:c + r - t] = keys[b:b + 1, :, f + t:f + r]
                    self.res_v[b:b + 1, :, c:c + r - t] = values[b:b + 1, :, f + t:f + r]
        elif len(set(self.res_len)) == 1:
            c = self.res_len[0]
            self.res_k[..., c:c + L, :] = keys
            self.res_v[..., c:c + L, :] = values
        else:  # rows at different lengths: scatter each row at its own end
            self.res_k = mx.put_along_axis(
                self.res_k, _ends(tuple(self.res_len), keys.shape), keys, axis=2)
            self.res_v = mx.put_along_axis(
                self.res_v, _ends(tuple(self.res_len), values.shape), values, axis=2)
        self.res_len = [n + r - t for n, r, t in zip(self.res_len, reals, takes)]
        self.offsets = [o + f + r for o, f, r in zip(self.offsets, fronts, reals)]
        due = self.spec.flush_size(max(self.res_len, default=0)) > 0  # some row has a unit to flush
        self._read = None
        if due:  # this update's queries read the residual before the flush
            n = max(self.res_len)
            before = (list(self.n_body), list(self.res_len), self.res_k[..., :n, :],
                      self.res_v[..., :n, :], [self._row_size(b) for b in range(B)])
        for b in range(B) if due or self.max_size is not None else ():
            self._flush_row(b)
            if self.max_size is not None:
                self._evict_row(b, fronts[b] + reals[b])
        if due and before[4] == [self._row_size(b) for b in range(B)]:  # nothing evicted
            self._read = before[:4]
        self._shrink_residual()
        return KVQView(self), KVQView(self)

    def _alloc_rows(self):
        if self.sink_k is not None:
            return
        B, H, D, Dv = self.dims
        fp = self._fp_dtype()
        S = self.spec.sinks
        self.sink_k, self.sink_v = mx.zeros((B, H, S, D), fp), mx.zeros((B, H, S, Dv), fp)
        self.res_k, self.res_v = mx.zeros((B, H, 0, D), fp), mx.zeros((B, H, 0, Dv), fp)
        self.res_cap = 0

    # The residual buffer grows and shrinks in whole groups: between flushes
    # a row holds residual..residual+group-1 tokens, so decoding reallocates
    # nothing and no row carries more than a group of slack.

    def _grow_residual(self, need):
        if need <= self.res_cap:
            return
        self._resize_residual(round_up(need, self.spec.group_size))

    def _shrink_residual(self):
        fit = round_up(max(self.res_len, default=0) + 1, self.spec.group_size)
        if self.res_cap > fit:
            self._resize_residual(fit)

    def _resize_residual(self, cap):
        n = min(cap, self.res_cap)
        parts = []
        for x in (self.res_k, self.res_v):
            B, H, _, D = x.shape
            new = mx.zeros((B, H, cap, D), x.dtype)
            new[..., :n, :] = x[..., :n, :]
            parts.append(new)
        self.res_k, self.res_v = parts
        self.res_cap = cap

    def _flush_row(self, b):
        n = self.spec.flush_size(self.res_len[b])
        if n <= 0:
            return
        r = self.res_len[b]
        k, v = self.res_k[b:b + 1, :, :n], self.res_v[b:b + 1, :, :n]
        if self.n_body[b] == 0:
            self.body_start[b] = self.offsets[b] - r
        self._grow_body(self.n_body[b] + n)
        out = self._drift_counts(k, v)
        if out is not None:
            self.drift[b] = out if self.drift[b] is None else self.drift[b] + out
            self.drift_checked[b] += k.size
        self._write_body(k, v, self.n_body[b], row=b)
        self.n_body[b] += n
        self.res_k[b:b + 1, :, :r - n] = self.res_k[b:b + 1, :, n:r]
        self.res_v[b:b + 1, :, :r - n] = self.res_v[b:b + 1, :, n:r]
        self.res_len[b] = r - n

    def _grow_body(self, need):
        if need > self.capacity:
            self._realloc_body(self._capacity(need), 0, self.capacity)

    def _evict_row(self, b, L):
        """Drop row b's oldest body tokens (keeping sinks and the L it just
        took) to stay within max_size."""
        self._drop_row(b, self._evict_size(self._row_size(b), self.n_body[b],
                                           self.body_start[b], self.offsets[b], L))

    def _drop_row(self, b, drop):
        """Drop row b's `drop` oldest body tokens (the row shifts in place)."""
        if drop <= 0:
            return
        self._shift_body(drop, self.n_body[b], row=b)
        self.n_body[b] -= drop
        self.body_start[b] += drop

    # -- reading ----------------------------------------------------------

    def segments(self, stored=False):
        """As KVQCache.segments: after an update that flushed (unless
        `stored`), each row's body as it was before and its 16-bit residual
        before the flush."""
        fp, (lk, lv) = self._fp_layout(), self._layouts()
        B, out = self.batch_size, []
        n_body, res_len, res_k, res_v = (self.n_body, self.res_len, self.res_k, self.res_v) \
            if self._read is None or stored else self._read
        if max(self.n_sink, default=0):
            out.append(Segment((0,) * B, max(self.n_sink), self.sink_k, self.sink_v, fp, fp,
                               tuple(self.n_sink)))
        if max(n_body, default=0):
            out.append(Segment(tuple(self.body_start), max(n_body), self.body_k,
                               self.body_v, lk, lv, tuple(n_body)))
        if max(res_len, default=0):
            out.append(Segment(tuple(o - r for o, r in zip(self.offsets, res_len)),
                               max(res_len), res_k, res_v, fp, fp, tuple(res_len)))
        return out

    # -- the batch protocol -----------------------------------------------

    @classmethod
    def merge(cls, caches: List[KVQCache]) -> "KVQBatchCache":
        """One batch cache holding the sequences of these single caches."""
        if not caches:
            raise ValueError("merge needs at least one cache")
        first = caches[0]
        for c in caches:
            if not isinstance(c, KVQCache):
                raise TypeError(f"KVQBatchCache.merge takes KVQCache objects, got "
                                f"{type(c).__name__}")
            if (c.spec, c.max_size, c.window) != (first.spec, first.max_size, first.window):
                raise ValueError(
                    f"cannot batch caches of different schemes: {c.spec} "
                    f"(max_kv_size {c.max_size}, window {c.window}) and {first.spec} "
                    f"(max_kv_size {first.max_size}, window {first.window}); make them "
                    "with the same spec")
        # An empty cache of a spec with outlier channels has no key order yet
        # (it would choose one from its first tokens): it takes the batch's.
        ordered = [c for c in caches if c.k_order is not None]
        lead = ordered[0] if ordered else first
        for c in caches:
            if c.spec.k_outliers and c.k_order is None and c.empty():
                continue
            if (c.calibration is None) != (lead.calibration is None):
                raise ValueError("cannot batch a calibrated cache with an uncalibrated one")
            ko, kf = c.k_order, lead.k_order
            if (ko is None) != (kf is None) or ko is not None and not mx.array_equal(ko, kf):
                raise ValueError("cannot batch caches whose keys are stored in different "
                                 "channel orders (outlier channels chosen from different "
                                 "first tokens): make them with one calibration's order")
        out = cls(first.spec, len(caches), first.max_size, lead.calibration, first.window)
        full = [c for c in caches if not c.empty()]
        for c in full:
            if c.dims[1:] != full[0].dims[1:]:
                raise ValueError(f"cannot batch caches of different shapes: {c.dims[1:]} "
                                 f"and {full[0].dims[1:]} (kv_heads, head_dim, v_head_dim)")
        for b, c in enumerate(caches):
            out.offsets[b] = c.offset
            out.n_sink[b], out.n_body[b], out.res_len[b] = c._sink_len(), c.n_body, c._res_len()
            out.body_start[b] = c.body_start
            out.drift[b], out.drift_checked[b] = c.drift, c.drift_checked
        if not full:
            return out
        out.dims = (len(caches),) + full[0].dims[1:]
        out.dtype = full[0].dtype
        out._alloc_rows()
        out._grow_residual(max(out.res_len))
        out._grow_body(max(out.n_body))
        lk, lv = out._layouts()
        for b, c in enumerate(caches):
            if c.empty():
                continue
            if out.n_sink[b]:
                out.sink_k[b:b + 1, :, :out.n_sink[b]] = c.sink_k
                out.sink_v[b:b + 1, :, :out.n_sink[b]] = c.sink_v
            if out.res_len[b]:
                out.res_k[b:b + 1, :, :out.res_len[b]] = c.res_k
                out.res_v[b:b + 1, :, :out.res_len[b]] = c.res_v
            if c.n_body:
                out.body_k = lk.write(out.body_k, lk.slice(c.body_k, 0, c.n_body), 0, row=b)
                out.body_v = lv.write(out.body_v, lv.slice(c.body_v, 0, c.n_body), 0, row=b)
        return out

    def extract(self, idx: int) -> KVQCache:
        """Sequence idx as a single KVQCache that continues exactly as it would
        have had it never been batched."""
        c = KVQCache(self.spec, max_size=self.max_size, calibration=self.calibration,
                     window=self.window)
        c.offset = self.offsets[idx]
        c.drift, c.drift_checked = self.drift[idx], self.drift_checked[idx]
        if self.dims is None:
            return c
        c.dims, c.dtype = (1,) + self.dims[1:], self.dtype
        if self.n_sink[idx]:
            c.sink_k = own_copy(self.sink_k[idx:idx + 1, :, :self.n_sink[idx]])
            c.sink_v = own_copy(self.sink_v[idx:idx + 1, :, :self.n_sink[idx]])
        if self.res_len[idx]:
            c.res_k = own_copy(self.res_k[idx:idx + 1, :, :self.res_len[idx]])
            c.res_v = own_copy(self.res_v[idx:idx + 1, :, :self.res_len[idx]])
        n = self.n_body[idx]
        if n:
            lk, lv = self._layouts()
            c.body_k, c.body_v = (own_copy(lay.slice(batch_row(part, idx), 0, n))
                                  for lay, part in ((lk, self.body_k), (lv, self.body_v)))
            c.n_body, c.capacity, c.body_start = n, n, self.body_start[idx]
        return c

    def filter(self, batch_indices):
        """Keep only these sequences, in this order (in place)."""
        keep = [int(i) for i in (batch_indices.tolist() if isinstance(batch_indices, mx.array)
                                 else batch_indices)]
        self._read = None
        for name in ROW_FIELDS:
            v = getattr(self, name)
            setattr(self, name, [v[i] for i in keep])
        if self.remaining is not None:
            self.remaining = [self.remaining[i] for i in keep]
        if self.dims is None:
            return
        idx = mx.array(keep, mx.int32)
        take = (lambda p: None if p is None else
                tuple(x[idx] for x in p) if isinstance(p, tuple) else p[idx])
        for name in ("sink_k", "sink_v", "res_k", "res_v", "body_k", "body_v"):
            setattr(self, name, take(getattr(self, name)))
        self.dims = (len(keep),) + self.dims[1:]
        if self.capacity > self._capacity(max(self.n_body, default=0)):
            self._compact_body()
        self._shrink_residual()

    def _compact_body(self):
        cap = self._capacity(max(self.n_body, default=0))
        lk, lv = self._layouts()
        self.body_k = own_copy(lk.slice(self.body_k, 0, cap))
        self.body_v = own_copy(lv.slice(self.body_v, 0, cap))
        self.capacity = cap

    def extend(self, other: "KVQBatchCache"):
        """Append the sequences of another batch cache (in place)."""
        if not isinstance(other, KVQBatchCache):
            raise TypeError(f"cannot extend a KVQBatchCache with {type(other).__name__}")
        if (other.spec, other.window) != (self.spec, self.window):
            raise ValueError(f"cannot batch caches of different schemes: {other.spec} "
                             f"(window {other.window}) and {self.spec} (window {self.window})")
        if other.dims is not None and self.dims is not None and \
                other.dims[1:] != self.dims[1:]:
            raise ValueError(f"cannot batch caches of different shapes: {other.dims[1:]} "
                             f"and {self.dims[1:]}")
        if self.remaining is not None or other.remaining is not None:
            raise ValueError("cannot extend a batch cache in the middle of a prompt")
        self._read = None
        src = self if self.dims is not None else other
        for c in (self, other):
            if c.dims is None and src.dims is not None:
                c.dims, c.dtype = (c.batch_size,) + src.dims[1:], src.dtype
                c._alloc_rows()
        if self.dims is not None:
            cap = max(self.capacity, other.capacity)
            res = max(self.res_cap, other.res_cap)
            for c in (self, other):
                c._grow_body(cap)
                c._grow_residual(res)
            cat = lambda a, b: (None if a is None else  # noqa: E731
                                tuple(mx.concatenate([x, y]) for x, y in zip(a, b))
                                if isinstance(a, tuple) else mx.concatenate([a, b]))
            for name in ("sink_k", "sink_v", "res_k", "res_v", "body_k", "body_v"):
                setattr(self, name, cat(getattr(self, name), getattr(other, name)))
            self.dims = (self.batch_size + other.batch_size,) + self.dims[1:]
        for name in ROW_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        """Before a batched prompt: `left_padding` tokens of each row come
        first and are skipped; with `lengths`, only that many tokens of each
        row are real and the rest (right padding) is never stored."""
        self._read = None
        if left_padding is not None:
            for b, p in enumerate(_ints(left_padding)):
                self.skip[b] += p
                self.offsets[b] -= p
        if lengths is not None and right_padding is not None and max(_ints(right_padding)) > 0:
            self.remaining = _ints(lengths)

    def finalize(self):
        self.remaining = None

    # -- trimming ---------------------------------------------------------

    def is_trimmable(self):
        return self.max_size is None or all(
            s <= n for s, n in zip(self.body_start, self.n_sink))

    def trim(self, n):
        """Drop the last n tokens of every sequence."""
        self._read = None
        n = min(n, min(self._row_size(b) for b in range(self.batch_size)))
        if n <= min(self.res_len):
            self.res_len = [r - n for r in self.res_len]
        else:  # quantized tokens come back through single caches
            caches = [self.extract(b) for b in range(self.batch_size)]
            for c in caches:
                c.trim(n)
            self.__dict__.update(KVQBatchCache.merge(caches).__dict__)
            return n
        self.offsets = [o - n for o in self.offsets]
        return n

    # -- serialization ----------------------------------------------------

    @property
    def meta_state(self):
        return json.dumps({"format": FORMAT_VERSION, "batch": True,
                           **{k: getattr(self, k) for k in ROW_FIELDS[:6]}})

    @meta_state.setter
    def meta_state(self, v):
        pass  # see the state setter

    @property
    def state(self):
        return [self.meta_state, self.sink_k, self.sink_v, self.res_k, self.res_v,
                self.body_k, self.body_v]

    @state.setter
    def state(self, v):
        raise ValueError("a KVQBatchCache is not restored from a state; save each "
                         "sequence's cache (extract(i)) and merge the loaded caches")


@functools.lru_cache(maxsize=64)
def _ends(res_len, shape):
    """Scatter indices of `shape`'s L new tokens at each row's residual end;
    every layer of a step writes at the same ends: one array serves them."""
    idx = (mx.array(res_len)[:, None] + mx.arange(shape[2]))[:, None, :, None]
    return mx.broadcast_to(idx, shape)


KVQCache.batch_class = KVQBatchCache  # what KVQCache.merge returns


def _ints(x):
    return [int(v) for v in (x.tolist() if isinstance(x, mx.array) else x)]
