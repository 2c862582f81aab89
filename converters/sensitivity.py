"""How much quantizing one layer's keys or values costs, for a calibration
plan: measured, or estimated from one gradient pass.

Measured (`Measured`): the KL divergence to the full-precision model with
the given layers quantized, from forward passes over reference windows; the
blocks before the first quantized layer are replayed from the reference. A
layer option costs a pass over the layers from it on: layers x options
passes in all.

Estimated (`Fisher`): quantizing a layer perturbs what it stores by
delta = dequantized - exact. To second order the KL divergence of the
output is 1/2 delta' F delta, F the Fisher information of the output with
respect to the stored keys and values; as in KVQuant, F is taken diagonal
and estimated by squared gradients of the language-model loss with respect
to every stored key and value element. A query reads a token's codes only
once the token has left the 16-bit residual (before that it reads the
exact copy), so the gradient of a token counts only the queries that read
it quantized: the probe attends to the perturbed keys and values through a
mask of those reads (`quantized_reads`, for the base spec's sinks,
residual and flush unit, fed in the chunks the measured KLD is fed in)
and to the exact ones elsewhere. Counting every later query instead ranks
layers as if the nearest queries read the codes too, which decoding never
does. One forward and backward pass per window gives F for every layer at
once; delta for any spec, sink count,
rotation or smoothing comes from pushing the recorded keys and values
through a KVQCache of that spec and reading back what it stores
(`KVQCache.dequantized`), which costs no model pass. A spec with outlier
key channels is given the key channel order the plan would bake. Keys
quantized per channel are quantized channel by channel, so their error
splits exactly over channels: every outlier count of a width is read from
the per-channel errors at that width and one more (`Fisher.key_options`),
not pushed through a cache of its own. The estimate of
several layers together is the sum of theirs. Estimates are in the
measured unit (mean KLD per position) but only their ranking is used to
choose; the plan chosen is then measured.
"""

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache

from ..cache import Calibration, KVQCache
from ..spec import window_spec
from ..integration import sliding_layers

# {layer: (spec, v_smooth or None[, k_order or None])}: which layers a
# configuration quantizes, and how
LayerConfig = Dict[int, Tuple]


def _calibration(s: Optional[np.ndarray], order: Optional[np.ndarray] = None
                 ) -> Optional[Calibration]:
    if s is None and order is None:
        return None
    return Calibration(v_smooth=None if s is None else mx.array(s),
                       k_order=None if order is None else mx.array(order, dtype=mx.int32))


def _parts(entry):
    """(spec, v_smooth, k_order) of a LayerConfig entry; the order only
    when the spec has outlier channels."""
    spec, s, order = (tuple(entry) + (None,))[:3]
    return spec, s, order if getattr(spec, "k_outliers", 0) else None


def _key(i, spec, s, order):
    return (i, str(spec), None if s is None else s.tobytes(),
            None if order is None else np.asarray(order).tobytes())


def windows_of(model) -> Dict[int, int]:
    """{layer: window} of the model's sliding-window layers."""
    caches = mlx_cache.make_prompt_cache(model)
    return {i: caches[i].max_size for i in sliding_layers(caches)}


def quantized_cache(spec, s, window: Optional[int], order=None):
    """The cache a layer gets in a calibration pass: as make_prompt_cache makes
    it for a full-attention or a sliding-window layer (None: no spec fits the
    window, the layer stays in full precision)."""
    if window is None:
        return KVQCache(spec, calibration=_calibration(s, order))
    ws = window_spec(spec, window)
    if ws is None:
        return None
    order = order if ws.k_outliers else None
    return KVQCache(ws, calibration=_calibration(s, order), window=window)


class Measured:
    """KLDs measured on reference windows by forward passes (`runner.kld`)."""

    method = "measured: KLD of forward passes, one per configuration"

    def __init__(self, model, runner, refs):
        self.model, self.runner, self.refs = model, runner, refs
        self.windows = windows_of(model)
        self.memo = {}

    def kld(self, config: LayerConfig, start: int = 0) -> float:
        """Mean KLD with the layers in `config` quantized, the others in full
        precision; layers before `start` are replayed, not run."""
        parts = {i: _parts(e) for i, e in config.items()}
        key = tuple(_key(i, *p) for i, p in sorted(parts.items()))
        if key not in self.memo:
            total = 0.0
            for ref in self.refs:
                caches = mlx_cache.make_prompt_cache(self.model)
                for i, (spec, s, order) in parts.items():
                    caches[i] = quantized_cache(spec, s, self.windows.get(i), order) or caches[i]
                total += self.runner.kld(ref, caches, start)
            self.memo[key] = total / len(self.refs)
        return self.memo[key]

    def layer(self, i: int, spec, s=None, order=None) -> float:
        return self.kld({i: (spec, s, order)}, start=i)

    def channel_weight(self, i: int) -> Optional[np.ndarray]:
        """No per-channel sensitivity without gradients: key channels are
        ordered by range alone."""
        return None

    def key_options(self, i: int, specs, order=None) -> dict:
        """{str(spec): KLD} of key-only specs of layer i, each measured."""
        return {str(k): self.layer(i, k, None, order) for k in specs}


def quantized_reads(spec, n: int, chunk: int = 1, window: Optional[int] = None) -> np.ndarray:
    """[n, n] bool: whether query s reads token t from the quantized body
    when n tokens are fed to a cache of `spec` in `chunk`-token updates (1:
    decoding). An update's queries read the body as it was before the
    update's flush (cache.py); the body lies between the sinks (and, with a
    window, what was evicted) and the residual, and a window hides what is
    older than its queries can see."""
    out = np.zeros((n, n), bool)
    if spec is None or not spec.quantized:
        return out
    for s in range(n):
        a = s // chunk * chunk  # tokens held before this query's update
        _, body, res = spec.token_split(a, window)
        out[s, max(a - res - body, 0 if window is None else s - window + 1):a - res] = True
    return out


class _Probe(KVCache):
    """A full-precision cache that adds (zero) perturbations to what its layer
    stores, so that gradients with respect to them can be taken. With `reads`
    ((N, window) -> [N, N] bool, which queries read which tokens quantized)
    the cache returns the exact keys and values followed by the perturbed
    ones, and its mask sends each query to one copy of each token: the
    perturbed copy where it reads the codes. The model makes one mask for
    all layers, so every layer gets a probe (`dk` None: no perturbation)."""

    def __init__(self, dk, dv, reads=None):
        super().__init__()
        self.dk, self.dv, self.reads = dk, dv, reads

    def update_and_fetch(self, keys, values):
        a, b = self.offset, self.offset + keys.shape[2]
        pk, pv = (keys, values) if self.dk is None else \
            (keys + self.dk[..., a:b, :], values + self.dv[..., a:b, :])
        if self.reads is None:
            return super().update_and_fetch(pk, pv)
        if a:
            raise ValueError("a split-read probe takes its tokens in one update")
        k, v = super().update_and_fetch(keys, values)
        return mx.concatenate([k, pk], axis=2), mx.concatenate([v, pv], axis=2)

    def make_mask(self, N, return_array=False, window_size=None):
        if self.reads is None:
            return super().make_mask(N, return_array=return_array, window_size=window_size)
        causal = create_causal_mask(N, window_size=window_size)
        far = mx.array(self.reads(N, window_size))
        return mx.concatenate([causal & ~far, causal & far], axis=-1)


def gradients(model, tokens: mx.array, kv: Dict[int, tuple], reads=None) -> Dict[int, tuple]:
    """Gradients of the summed next-token loss over `tokens` [T] with respect
    to each layer's stored keys and values; kv holds the layers' recorded
    [1, H, T, D] keys and values (their shapes are used). reads: (N,
    window) -> [N, N] bool, the queries whose reads count (None: every
    query's)."""
    layers = sorted(kv)
    masks = []  # the masks the probes made: none if the model makes its own
    probe_reads = reads if reads is None else lambda n, w: masks.append(n) or reads(n, w)

    def loss(deltas):
        caches = mlx_cache.make_prompt_cache(model)
        if reads is not None:
            caches = [_Probe(None, None, probe_reads) for _ in caches]
        for i, d in zip(layers, deltas):
            caches[i] = _Probe(*d, probe_reads)
        logits = model(tokens[None, :-1], cache=caches).astype(mx.float32)
        return nn.losses.cross_entropy(logits, tokens[None, 1:], reduction="sum")

    zeros = [tuple(mx.zeros(x[..., :-1, :].shape, mx.float32) for x in kv[i]) for i in layers]
    why = (f"{type(model).__module__}: its attention does not take the mask its cache "
           "makes; calibrate it with --sensitivity measured")
    try:
        _, grads = mx.value_and_grad(loss)(zeros)
    except ValueError as e:
        if reads is None or masks:
            raise
        raise ValueError(f"{why} ({e})") from e
    if reads is not None and not masks:
        raise ValueError(why)
    return dict(zip(layers, grads))


def squared_gradients(model, tokens: mx.array, kv: Dict[int, tuple], spec=None,
                      chunk: int = 1) -> Dict[int, tuple]:
    """Squared `gradients`. With a spec, a token's gradient counts only the
    queries that read it quantized under that spec, fed in `chunk`-token
    updates (`quantized_reads`); without one, every later query."""
    reads = None
    if spec is not None:
        def reads(n, window):
            return quantized_reads(spec if window is None else window_spec(spec, window),
                                   n, chunk, window)
    out = {i: tuple(mx.square(g) for g in gs)
           for i, gs in gradients(model, tokens, kv, reads).items()}
    mx.eval(out)
    return out


class Fisher:
    """KLDs estimated as 1/2 sum(F delta^2) per position (see the module
    docstring), from recorded keys/values and their squared gradients."""

    method = ("estimated: 1/2 sum(F x delta^2) per position, F the diagonal Fisher "
              "information (squared loss gradients w.r.t. stored keys and values, one "
              "backward pass per window), delta what the quantized cache stores minus the "
              "exact keys and values")

    def __init__(self, windows: List[Tuple[Dict[int, tuple], Dict[int, tuple]]], chunk: int,
                 sliding: Optional[Dict[int, int]] = None):
        """windows: per sensitivity window, ({layer: (keys, values)} recorded
        [1, H, T, D] float32, {layer: (Fk, Fv)} from squared_gradients);
        sliding: {layer: window} of sliding-window layers (their spec is
        window_spec's; every token's error counts, evicted or not)."""
        self.windows, self.chunk, self.sliding = windows, chunk, sliding or {}
        self.positions = sum(next(iter(f.values()))[0].shape[2] for _, f in windows)
        self.memo = {}

    def _error(self, i: int, spec, s, order=None) -> float:
        key = _key(i, spec, s, order)
        if key not in self.memo:
            total = 0.0
            if i in self.sliding:
                spec = window_spec(spec, self.sliding[i])
                if spec is None:  # the layer stays in full precision
                    self.memo[key] = 0.0
                    return 0.0
                order = order if spec.k_outliers else None
            for kv, f in self.windows:
                keys, values = kv[i]
                cache = KVQCache(spec, calibration=_calibration(s, order))
                for a in range(0, keys.shape[2], self.chunk):
                    cache.update_and_fetch(keys[..., a:a + self.chunk, :],
                                           values[..., a:a + self.chunk, :])
                kq, vq = cache.dequantized()
                T = f[i][0].shape[2]
                for x, xq, fx, bits in ((keys, kq, f[i][0], spec.k_bits),
                                        (values, vq, f[i][1], spec.v_bits)):
                    if bits is not None:
                        total += (fx * mx.square(xq[..., :T, :] - x[..., :T, :])).sum().item()
            self.memo[key] = 0.5 * total / self.positions
        return self.memo[key]

    def kld(self, config: LayerConfig, start: int = 0) -> float:
        return sum(self._error(i, *_parts(e)) for i, e in config.items())

    def layer(self, i: int, spec, s=None, order=None) -> float:
        return self.kld({i: (spec, s, order)})

    def _channel_errors(self, i: int, spec) -> np.ndarray:
        """[H, D] 1/2 sum(F delta^2) per position of layer i's keys under
        `spec` (keys per channel, values full precision), per key channel."""
        key = (i, str(spec), "channels")
        if key not in self.memo:
            total = 0.0
            for kv, f in self.windows:
                keys, values = kv[i]
                cache = KVQCache(spec)
                for a in range(0, keys.shape[2], self.chunk):
                    cache.update_and_fetch(keys[..., a:a + self.chunk, :],
                                           values[..., a:a + self.chunk, :])
                kq, _ = cache.dequantized()
                T = f[i][0].shape[2]
                e = f[i][0] * mx.square(kq[..., :T, :] - keys[..., :T, :])
                total = total + np.array(e.sum(axis=(0, 2)), dtype=np.float64)
            self.memo[key] = 0.5 * total / self.positions
        return self.memo[key]

    def key_options(self, i: int, specs, order=None) -> dict:
        """{str(spec): KLD} of key-only specs of layer i; with outlier
        channels (the first k_outliers of `order` at k_bits + 1), summed
        from the per-channel errors at both widths."""
        out = {}
        for k in specs:
            if i in self.sliding or k.key_axis != "channel" or k.v_bits is not None:
                out[str(k)] = self.layer(i, k, None, order)
                continue
            plain = replace(k, k_outliers=0)
            e = self._channel_errors(i, plain)
            if k.k_outliers:
                wide = self._channel_errors(i, replace(plain, k_bits=k.k_bits + 1))
                first = np.zeros(e.shape, bool)
                np.put_along_axis(first, np.asarray(order)[:, :k.k_outliers], True, axis=-1)
                e = np.where(first, wide, e)
            out[str(k)] = float(e.sum())
        return out

    def channel_weight(self, i: int) -> np.ndarray:
        """[H, D] squared gradients of layer i's stored keys, summed over
        the windows' tokens: how much each key channel's error costs."""
        return sum(np.array(f[i][0].sum(axis=(0, 2))) for _, f in self.windows)
