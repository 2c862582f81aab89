"""What a cache holds and costs, for the CLI's KV report and other tools."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .cache import KVQCache


@dataclass
class KVStats:
    spec: str  # the scheme in full
    label: str
    layers: int  # layers holding a KVQCache
    other_layers: int  # layers left in full precision (sliding window, SSM)
    tokens: int
    nbytes: int  # all caches, true bytes held
    fp16_nbytes: int  # the same tokens in a 16-bit KVCache
    calibration: str = "dynamic, none"

    @property
    def bits_per_element(self) -> float:
        return 16.0 * self.nbytes / self.fp16_nbytes if self.fp16_nbytes else 0.0


def kv_stats(cache) -> KVStats:
    kvq = [c for c in cache if isinstance(c, KVQCache)]
    if not kvq:
        raise ValueError("no KVQCache in this prompt cache")
    fp16 = 0
    for c in kvq:
        if c.dims is not None:
            B, H, D, Dv = c.dims
            fp16 += B * H * (D + Dv) * c.size() * 2
    others = [c for c in cache if not isinstance(c, KVQCache)]
    other_bytes = sum(_nbytes(c) for c in others)
    spec = kvq[0].spec
    return KVStats(
        spec=spec.describe(),
        label=str(spec),
        layers=len(kvq),
        other_layers=len(others),
        tokens=kvq[0].offset,
        nbytes=sum(c.nbytes for c in kvq) + other_bytes,
        fp16_nbytes=fp16 + other_bytes,
    )


def _nbytes(c):
    try:
        return c.nbytes
    except (NotImplementedError, AttributeError):
        return 0


def _mb(n):
    return f"{n / 1e6:.2f} MB"


def format_report(stats: KVStats, response=None, peak: Optional[float] = None) -> str:
    lines = [
        "==== KV report",
        f"scheme:       {stats.label}: {stats.spec}",
        f"calibration:  {stats.calibration}",
        f"layers:       {stats.layers} quantized"
        + (f", {stats.other_layers} kept in full precision" if stats.other_layers else ""),
        f"tokens:       {stats.tokens} cached",
        f"cache bytes:  {_mb(stats.nbytes)} vs {_mb(stats.fp16_nbytes)} in fp16 "
        f"({stats.fp16_nbytes / max(stats.nbytes, 1):.2f}x smaller), "
        f"{stats.bits_per_element:.2f} bits per element",
    ]
    peak = mx.get_peak_memory() if peak is None else peak
    lines.append(f"peak memory:  {peak / 1e9:.3f} GB")
    if response is not None:
        lines.append(
            f"speed:        prompt {response.prompt_tokens} tokens at "
            f"{response.prompt_tps:.1f} tokens/s, generation "
            f"{response.generation_tokens} tokens at {response.generation_tps:.1f} tokens/s"
        )
    return "\n".join(lines)
