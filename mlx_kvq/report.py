"""What a cache holds and costs, for the CLI's KV report and other tools.

Besides what the cache holds now, the report says from which length it
starts quantizing (the spec's sinks, residual and one flush unit stay
16-bit until then: a short chat is all fp16) and what the same caches would
hold at longer contexts (PROJECTED: 8K and 32K tokens), from the caches' own
layout rules (KVQCache.bytes_for, which the sizing uses) against mlx-lm's
fp16 caches of the same layers.
"""

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mlx_lm.models.cache import RotatingKVCache

from . import attention
from .cache import KVQCache

PROJECTED = (8192, 32768)  # contexts the report projects the cache's bytes to


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
    drift: Optional[str] = None  # flushed values beyond the calibrated range
    quantizes_from: Optional[int] = None  # tokens from which a full layer holds codes
    quantized_tokens: int = 0  # of `tokens`, held as codes in the full layers
    projection: tuple = ()  # (context, nbytes, fp16 nbytes) at PROJECTED contexts

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
    full = [c for c in kvq if c.window is None] or kvq
    specs = [c.spec for c in full]
    smoothed = [c.v_smooth is not None for c in full]
    if len(set(specs)) == 1 and not any(smoothed):
        label, spec = str(specs[0]), specs[0].describe()
    else:
        label, spec = _mixed(specs, smoothed)
    windows = [c for c in kvq if c.window is not None and c not in full]
    if windows:
        keys = count_label(layer_key(c.spec, c.v_smooth is not None) for c in windows)
        sizes = sorted({c.window for c in windows})
        label += f" + windows {keys}"
        spec += (f"; {len(windows)} sliding-window layers of {'/'.join(map(str, sizes))} "
                 f"tokens: {keys}, residual {max(c.spec.residual for c in windows)} fp16 "
                 "tokens, no sinks")
    calibrated = [c.calibration.source for c in kvq if c.calibration is not None]
    return KVStats(
        spec=spec,
        label=label,
        layers=len(kvq),
        other_layers=len(others),
        tokens=kvq[0].offset,
        nbytes=sum(c.nbytes for c in kvq) + other_bytes,
        fp16_nbytes=fp16 + other_bytes,
        calibration=calibrated[0] if calibrated else "dynamic, none",
        drift=drift_summary(cache),
        quantizes_from=quantizes_from(full),
        quantized_tokens=full[0].spec.token_split(full[0].offset)[1] if full[0].spec.quantized
        else 0,
        projection=tuple((n, *projected_bytes(cache, n)) for n in PROJECTED),
    )


def quantizes_from(caches) -> Optional[int]:
    """The fewest tokens after which a full-attention layer holds quantized
    codes (spec rules: its sinks, its residual, then one flush unit), or None
    if no layer quantizes."""
    starts = [c.spec.sinks + c.spec.residual + c.spec.flush_unit for c in caches
              if c.spec.quantized]
    return min(starts, default=None)


def projected_bytes(cache, context: int) -> tuple:
    """(bytes, fp16 bytes) these caches would hold after `context` tokens of
    one sequence: each KVQCache by its spec's layout rules (a window cache
    bounded by its window), mlx-lm's rotating caches by their size; fp16: a
    16-bit cache of the same tokens per layer."""
    total = fp16 = 0
    for c in cache:
        if isinstance(c, KVQCache) and c.dims is not None:
            _, H, D, Dv = c.dims
            total += KVQCache.bytes_for(c.spec, context, H, D, Dv, window=c.window)
            fp16 += min(context, c.window or context) * H * (D + Dv) * 2
        elif isinstance(c, RotatingKVCache) and c.keys is not None:
            _, H, _, D = c.keys.shape
            per_token = H * (D + c.values.shape[-1])
            total += min(context, c.max_size) * per_token * c.keys.dtype.size
            fp16 += min(context, c.max_size) * per_token * 2
        else:  # state that does not grow with the context
            total += _nbytes(c)
            fp16 += _nbytes(c)
    return total, fp16


def layer_key(spec, smoothed=False) -> str:
    """A layer's bits, outlier key channels, value group and value
    preparation: k4v2, k2v4-rot, k3v3-o16-vg64-rot, k4v2-sm (smoothed)."""
    return (f"k{spec.k_bits or 16}v{spec.v_bits or 16}"
            + (f"-o{spec.k_outliers}" if spec.k_outliers else "")
            + (f"-vg{spec.v_group}" if spec.v_group else "")
            + ("-rot" if spec.rotate else "") + ("-sm" if smoothed else ""))


def count_label(keys) -> str:
    """"k4v2 x20, k2v4 x10": how many layers have each key, most first."""
    return ", ".join(f"{k} x{n}" for k, n in Counter(keys).most_common())


def _mixed(specs, smoothed):
    """Label and description of a per-layer plan."""
    label = count_label(layer_key(s, m) for s, m in zip(specs, smoothed))

    def avg(bits):
        return sum(16 if b is None else b for b in bits) / len(bits)

    s = specs[0]
    return label, (
        f"per-layer plan: K {avg([x.k_bits for x in specs]):.2f} and V "
        f"{avg([x.v_bits for x in specs]):.2f} code bits on average (K per-{s.key_axis}, "
        f"V per-token), group {s.group_size}, residual {s.residual} fp16 tokens, sinks "
        f"{s.sinks}, values rotated in {sum(x.rotate for x in specs)} and smoothed in "
        f"{sum(smoothed)} of {len(specs)} layers"
    )


def drift_counts(cache) -> dict:
    """{layer: (K, V, checked)}: flushed elements beyond the calibrated
    per-channel range, for layers with a calibration."""
    out = {}
    for i, c in enumerate(cache):
        if isinstance(c, KVQCache) and c.calibration is not None and c.drift_checked:
            k, v = (0, 0) if c.drift is None else c.drift.tolist()
            out[i] = (k, v, c.drift_checked)
    return out


def drift_summary(cache) -> Optional[str]:
    counts = drift_counts(cache)
    if not counts:
        return None
    k = sum(x[0] for x in counts.values())
    v = sum(x[1] for x in counts.values())
    n = 2 * sum(x[2] for x in counts.values())
    worst = sorted(counts.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:3]
    top = ", ".join(f"{i} ({a + b})" for i, (a, b, _) in worst if a + b)
    return (f"{k + v} of {n} flushed K/V elements beyond the calibrated range "
            f"({100 * (k + v) / n:.3f}%: K {k}, V {v})" + (f", most in layers {top}" if top else "")
            + "; kept with dynamic per-group scales, not clipped")


def _nbytes(c):
    try:
        return c.nbytes
    except (NotImplementedError, AttributeError):
        return 0


def _mb(n):
    return f"{n / 1e6:.2f} MB"


def attention_line() -> str:
    """Which attention path the decode steps of this process ran."""
    runs = attention.paths_run()
    here = attention.path()
    if set(runs) <= {here}:
        return f"decode on the {attention.describe_path()}"
    return "decode on " + ", ".join(f"the {attention.PATHS[p]} ({n} layer steps)"
                                    for p, n in sorted(runs.items()))


def format_report(stats: KVStats, response=None, peak: Optional[float] = None) -> str:
    lines = [
        "==== KV report",
        f"scheme:       {stats.label}: {stats.spec}",
        f"calibration:  {stats.calibration}",
    ]
    if stats.drift:
        lines.append(f"drift:        {stats.drift}")
    lines += [
        f"layers:       {stats.layers} quantized"
        + (f", {stats.other_layers} kept in full precision" if stats.other_layers else ""),
        f"tokens:       {stats.tokens} cached",
        f"cache bytes:  {_mb(stats.nbytes)} vs {_mb(stats.fp16_nbytes)} in fp16 "
        f"({stats.fp16_nbytes / max(stats.nbytes, 1):.2f}x smaller), "
        f"{stats.bits_per_element:.2f} bits per element",
    ]
    lines += _quantizing_lines(stats)
    lines.append(f"attention:    {attention_line()}")
    peak = mx.get_peak_memory() if peak is None else peak
    lines.append(f"peak memory:  {peak / 1e9:.3f} GB")
    if response is not None:
        lines.append(
            f"speed:        prompt {response.prompt_tokens} tokens at "
            f"{response.prompt_tps:.1f} tokens/s, generation "
            f"{response.generation_tokens} tokens at {response.generation_tps:.1f} tokens/s"
        )
    return "\n".join(lines)


def _quantizing_lines(stats: KVStats) -> list:
    if stats.quantizes_from is None:
        return []
    now = (f"{stats.quantized_tokens} of these {stats.tokens} tokens are quantized"
           if stats.quantized_tokens else
           f"these {stats.tokens} tokens are all still 16-bit")
    lines = [f"quantizes:    from {stats.quantizes_from} tokens on (until then its sinks, "
             f"residual and one flush unit are all 16-bit); {now}"]
    if stats.projection:
        lines.append("at length:    " + "; ".join(
            f"{n // 1024}K tokens {_mb(b)} vs {_mb(f)} in fp16 ({f / max(b, 1):.2f}x smaller)"
            for n, b, f in stats.projection) + " for this model")
    return lines


def format_ranks(rows) -> str:
    """Per-rank lines and the total of a sharded run; rows: one dict per rank
    with rank, what (its heads or layers), nbytes, fp16_nbytes, peak."""
    lines = ["==== KV per rank (the report above is rank 0's)"]
    for r in rows:
        lines.append(f"rank {r['rank']}:       {r['what']}: cache {_mb(r['nbytes'])} "
                     f"(fp16 {_mb(r['fp16_nbytes'])}), peak memory {r['peak'] / 1e9:.3f} GB")
    total, fp16 = sum(r["nbytes"] for r in rows), sum(r["fp16_nbytes"] for r in rows)
    lines.append(f"all {len(rows)} ranks:  cache {_mb(total)} (fp16 {_mb(fp16)}), "
                 f"peak memory {sum(r['peak'] for r in rows) / 1e9:.3f} GB summed")
    return "\n".join(lines)
