"""Full-precision passes over calibration windows, for `mlx_kvq.calibrate`:
the workload's windows, a cache that records what each layer stores, the
reference next-token distributions of a window with every block's input
(so that a later pass can start at any layer), the KL divergence of a pass
with other caches, and per-channel statistics of keys and values.
"""

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_kvq.commands.corpus import source_text
from ..integration import sliding_layers
from ..quant import hadamard

OUTLIER_SIGMAS = 6.0  # an outlier element: |x| beyond 6 RMS of its head


# -- workload -----------------------------------------------------------------


@dataclass
class Workload:
    """Calibration windows, spread evenly over each source, and their disclosure."""

    sources: List[str]
    sha256: str  # of the sources' texts, in order
    windows: List[np.ndarray]
    window: int

    @property
    def tokens(self) -> int:
        return len(self.windows) * self.window


def load_workload(sources, tokenizer, tokens: int, window: int) -> Workload:
    n = max(1, tokens // window)
    sha, windows = hashlib.sha256(), []
    for i, source in enumerate(sources):
        text = source_text(source, tokenizer)
        sha.update(text.encode())
        ids = np.asarray(tokenizer.encode(text))
        want = n // len(sources) + (i < n % len(sources))
        have = min(want, len(ids) // window)
        if have < want:
            raise ValueError(f"workload source {source!r} has {len(ids)} tokens, fewer "
                             f"than {want} windows of {window}")
        starts = np.linspace(0, len(ids) - window, have).astype(int)
        windows += [ids[s:s + window] for s in starts]
    return Workload(list(sources), sha.hexdigest(), windows, window)


# -- running the model ----------------------------------------------------------


class _Recording:
    """Hands what the layer stores to `record`, then caches it as its base does."""

    def update_and_fetch(self, keys, values):
        self.record(keys, values)
        return super().update_and_fetch(keys, values)


class RecordingCache(_Recording, KVCache):
    """A full-attention layer's full-precision cache, recording."""

    def __init__(self, record):
        super().__init__()
        self.record = record


class RecordingWindowCache(_Recording, RotatingKVCache):
    """A sliding-window layer's full-precision cache, recording."""

    def __init__(self, record, window: int):
        super().__init__(max_size=window)
        self.record = record


def recording(caches, record_kv) -> list:
    """mlx-lm's caches with every attention layer's recording (record_kv(i, k, v))."""
    out, sliding = [], set(sliding_layers(caches))
    for i, c in enumerate(caches):
        def record(k, v, i=i):
            record_kv(i, k, v)
        if type(c) is KVCache:
            c = RecordingCache(record)
        elif i in sliding:
            c = RecordingWindowCache(record, c.max_size)
        out.append(c)
    return out


class _Stand:
    """Stands in for a transformer block: records its input and runs it, or
    (for the blocks before the first one to run) returns a recorded state."""

    def __init__(self, block, record=None, replay=None):
        self.__dict__.update(block=block, record=record, replay=replay)

    def __getattr__(self, name):
        return getattr(self.__dict__["block"], name)

    def __call__(self, x, *args, **kwargs):
        if self.replay is not None:
            return self.replay[0]
        self.record.append(x)
        return self.block(x, *args, **kwargs)


def _owner(model):
    """The module whose `layers` list the forward pass walks, if the model
    has only full-attention KV caches (so that skipped layers' masks are
    plain causal ones); else None and every pass runs all layers."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or layers is not getattr(model, "layers", None):
        return None
    if not all(type(c) is KVCache for c in mlx_cache.make_prompt_cache(model)):
        return None
    return inner


@contextmanager
def _blocks(owner, blocks):
    if owner is None or blocks is None:
        yield
        return
    saved = owner.layers
    owner.layers = blocks
    try:
        yield
    finally:
        owner.layers = saved


@dataclass
class Reference:
    """One window under the full-precision model, per chunk: next-token
    log-probabilities and probabilities (exp is slow on CPUs: computed once),
    and every block's input (so that a pass can start at any layer)."""

    tokens: mx.array
    logprobs: list
    probs: list
    inputs: Optional[list]  # [layer][chunk]


class Runner:
    """Forward passes over calibration windows in chunks, as evaluate() does."""

    def __init__(self, model, chunk: int):
        self.model, self.chunk = model, chunk
        self.owner = _owner(model)
        self.n_layers = len(model.layers)

    def _chunks(self, tokens):
        return [tokens[:, a:a + self.chunk] for a in range(0, tokens.shape[1], self.chunk)]

    def reference(self, window, record_kv=None, keep=True) -> Optional[Reference]:
        """Full-precision pass; record_kv(layer, keys, values) sees what each
        layer stores. keep: return the Reference (log-probs and block inputs)."""
        tokens = mx.array(window)[None]
        caches = mlx_cache.make_prompt_cache(self.model)
        if record_kv is not None:
            caches = recording(caches, record_kv)
        inputs = [[] for _ in range(self.n_layers)]
        stands = None
        if keep and self.owner is not None:
            stands = [_Stand(b, record=inputs[i]) for i, b in enumerate(self.owner.layers)]
        logprobs, probs = [], []
        with _blocks(self.owner, stands):
            for x in self._chunks(tokens):
                lp = nn.log_softmax(self.model(x, cache=caches)[0].astype(mx.float32))
                p = mx.exp(lp) if keep else None
                mx.eval(lp, p, [a[-1] for a in inputs if a])
                logprobs.append(lp)
                probs.append(p)
        if not keep:
            return None
        return Reference(tokens, logprobs, probs, inputs if stands is not None else None)

    def kld(self, ref: Reference, caches, start: int = 0) -> float:
        """Mean KL divergence per position from the reference, with `caches`;
        blocks before `start` are replayed from the reference (their caches
        must then be full precision: they are not run)."""
        start = start if ref.inputs is not None else 0
        held, stands = [None], None
        if start:
            stands = ([_Stand(b, replay=held) for b in self.owner.layers[:start]]
                      + list(self.owner.layers[start:]))
        total = 0.0
        with _blocks(self.owner, stands):
            for j, x in enumerate(self._chunks(ref.tokens)):
                if start:
                    held[0] = ref.inputs[start][j]
                    for c in caches[:start]:  # masks read the first cache's offset
                        c.offset += x.shape[1]
                lq = nn.log_softmax(self.model(x, cache=caches)[0].astype(mx.float32))
                total += (ref.probs[j] * (ref.logprobs[j] - lq)).sum().item()
        return total / ref.tokens.shape[1]


# -- statistics -------------------------------------------------------------------


class StatsCollector:
    """Keys and values each layer stores (16-bit, host memory), minus each
    window's first `skip` tokens (the sinks, never quantized)."""

    def __init__(self, skip: int):
        self.skip, self.seen = skip, {}
        self.k, self.v = {}, {}

    def __call__(self, layer, keys, values):
        a = max(0, self.skip - self.seen.get(layer, 0))
        self.seen[layer] = self.seen.get(layer, 0) + keys.shape[2]
        for store, x in ((self.k, keys), (self.v, values)):
            if x.shape[2] > a:
                store.setdefault(layer, []).append(np.array(x[0, :, a:].astype(mx.float16)))

    def new_window(self):
        self.seen = {}

    def stats(self) -> Dict[int, Dict[str, np.ndarray]]:
        out = {}
        for layer in sorted(self.k):
            out[layer] = {}
            for kind, store in (("k", self.k), ("v", self.v)):
                x = np.concatenate(store[layer], axis=1).astype(np.float32)  # [H, T, D]
                out[layer].update({f"{kind}_{n}": a for n, a in channel_stats(x).items()})
        return out


def channel_stats(x: np.ndarray) -> Dict[str, np.ndarray]:
    """Per head and channel statistics of x [H, T, D]: [H, D] each."""
    a = np.abs(x)
    rms = np.sqrt((x ** 2).mean(axis=(1, 2), keepdims=True))
    rot = np.abs(np.array(hadamard(mx.array(x))))
    p99, p999 = np.percentile(a, (99, 99.9), axis=1).astype(np.float32)
    return {
        "absmax": a.max(axis=1),
        "p99": p99,
        "p999": p999,
        "absmax_rot": rot.max(axis=1),
        "outliers": (a > OUTLIER_SIGMAS * rms).sum(axis=1).astype(np.int32),
        "range": x.max(axis=1) - x.min(axis=1),
    }
