"""What a calibration chooses among per layer, and how it chooses: the key
and value options with their costs, the key channel order baked for outlier
channels, and the greedy allocation under a target average.

Costs are in code bits per element, with what an option adds to (or saves
from) the base spec's bytes counted in the same unit: an outlier key channel
is one more bit on 1/head_dim of the keys (k_outliers / head_dim), a value
group of its own changes the values' fp16 scale and bias from 32 bits per
base value group (the base spec's v_group, else its group_size) to 32/v_group
bits per element. A plan's average cost at or under the target
therefore holds at most the bytes of a uniform spec of that many code bits.
"""

from dataclasses import replace
from typing import Callable, Dict, Optional

import numpy as np

from ..spec import VALID_BITS, VALID_GROUPS

TIE = 0.02  # KLDs within 2% count as equal: the cheaper option wins
OUTLIER_COUNTS = (0, 8, 16, 32)  # key channels per kv head at one more bit
V_GROUPS = (32, 64)  # value group sizes to try
SCALE_BITS = 32  # an fp16 scale and bias per group


def uniform_splits(target: float, options) -> list:
    """(k_bits, v_bits) pairs from `options` of the largest average within
    the target (the target itself when pairs reach it: 3.0 -> k4v2, k3v3,
    k2v4; 3.6 -> k4v3, k3v4): the uniform specs a plan must beat."""
    pairs = [(k, v) for k in sorted(options, reverse=True) for v in options
             if (k + v) / 2 <= target + 1e-9]
    top = max(((k + v) / 2 for k, v in pairs), default=None)
    return [(k, v) for k, v in pairs if abs((k + v) / 2 - top) < 1e-9]


def smallest_tied(results: dict):
    """The first key (cheapest) whose KLD is within TIE of the best (a best
    at or below zero, rounding noise of a lossless read, ties only itself)."""
    best = min(results.values())
    return next(k for k, v in results.items() if v <= best + abs(best) * TIE)


def allocate(sens: dict, options, target: float, cost: Optional[Callable] = None) -> dict:
    """Greedy: every tensor t (layer, "k" | "v") starts at its cheapest option
    in sens[t] ({option: KLD}); the upgrade with the largest KLD drop per
    added bit is taken while the average cost stays within the target.
    options: the widths when options are widths (cost: the width itself);
    cost(t, option): bits per element of an option of tensor t."""
    if cost is None:
        sens = {t: {o: v for o, v in s.items() if o in options} for t, s in sens.items()}

        def cost(t, o):
            return o
    chosen = {t: min(s, key=lambda o: (cost(t, o), s[o])) for t, s in sens.items()}
    budget = target * len(sens) - sum(cost(t, o) for t, o in chosen.items())
    while True:
        best = None
        for t, o in chosen.items():
            for no, kld in sens[t].items():
                add = cost(t, no) - cost(t, o)
                if add > 1e-9 and add <= budget + 1e-9:
                    gain = (sens[t][o] - kld) / add
                    if best is None or gain > best[0]:
                        best = (gain, t, no, add)
        if best is None or best[0] <= 0:
            return chosen
        _, t, no, add = best
        budget -= add
        chosen[t] = no


def check_choices(outliers, v_groups):
    """ValueError naming an outlier count or value group that cannot be."""
    bad = [n for n in outliers if type(n) is not int or n < 0]
    if bad:
        raise ValueError(f"outlier counts {bad}: each must be a non-negative integer "
                         "(0 alone: no outlier channels)")
    bad = [g for g in v_groups if g not in VALID_GROUPS]
    if bad:
        raise ValueError(f"value groups {bad}: each must be one of {VALID_GROUPS}")


def key_options(base, bits, outliers, head_dim: int) -> list:
    """Key specs (values full precision) to measure per layer: each width
    with each outlier count that fits (per-channel keys, width + 1 valid,
    fewer outliers than channels)."""
    out = []
    for b in bits:
        for n in sorted(set(outliers) | {0}):
            if n and (base.key_axis != "channel" or b + 1 not in VALID_BITS
                      or n >= head_dim):
                continue
            out.append(replace(base, k_bits=b, v_bits=None, k_outliers=n, v_group=None))
    return out


def value_groups(base, v_groups, v_head_dim: int) -> list:
    """Value group sizes to try, each dividing the value head dim, always
    with the base spec's own value group (as the base's v_group: None when
    it has none)."""
    own = base.value_group
    out = []
    for g in sorted(set(v_groups) | {own}):
        if g <= v_head_dim and v_head_dim % g == 0:
            out.append(base.v_group if g == own else g)
    return out


def key_cost(base, spec, head_dim: int) -> float:
    return spec.k_bits + spec.k_outliers / head_dim


def value_cost(base, spec) -> float:
    return spec.v_bits + SCALE_BITS / spec.value_group - SCALE_BITS / base.value_group


def key_order(k_range: np.ndarray, weight: Optional[np.ndarray] = None) -> np.ndarray:
    """[H, D] int32 key channel order, the channels whose quantization costs
    most first: by range squared (a channel's quantization error grows with
    its range) times its sensitivity weight (summed squared gradients of the
    stored keys, when measured), per kv head. Ties keep channel order."""
    score = np.square(np.asarray(k_range, dtype=np.float64))
    if weight is not None:
        score = score * np.asarray(weight, dtype=np.float64)
    return np.argsort(-score, axis=-1, kind="stable").astype(np.int32)


def stat_range(stats: Dict[str, np.ndarray], kind: str = "k") -> np.ndarray:
    """A layer's per-channel range (max - min over the calibration tokens);
    statistics taken before ranges were recorded give twice the absmax."""
    r = stats.get(f"{kind}_range")
    return 2 * stats[f"{kind}_absmax"] if r is None else r
