"""KV quantization scheme: what is stored, at which precision, along which axis.

The rules a cache follows that depend on the spec alone live here too, so
that sizing, planning and the caches read the same ones: the flush unit
(whole groups for per-channel keys), how many residual tokens flush, how a
sequence's tokens split into sinks, body and residual, and the window policy
(which spec a sliding-window layer gets). Data flows one way: spec, then
quantization (quant, storage), then the caches; this module imports none of
them.
"""

import re
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUPS = (32, 64, 128)
KEY_AXES = ("channel", "token")


class HeadDimError(ValueError):
    """A spec that cannot apply to a model's key or value head dims."""


@dataclass(frozen=True)
class KVQuantSpec:
    """How a KV cache is quantized.

    k_bits / v_bits: 2, 3, 4, 5, 6, 8, or None for full precision (16-bit).
    key_axis: "channel" quantizes each key channel over groups of tokens
        (KIVI; keys have per-channel outliers), "token" quantizes each key
        vector over groups of channels (as mlx-lm does). Values are always
        quantized per token.
    group_size: elements sharing one scale and bias (32, 64 or 128).
    residual: most recent tokens kept in full precision. Channel keys are
        flushed in whole groups, so up to group_size - 1 more tokens wait there.
    sinks: first tokens kept in full precision (attention sinks).
    rotate: Hadamard rotation of head_dim before quantizing values (and keys
        when they are quantized per token), spreading outliers across a group.
    k_outliers: key channels per kv head kept at k_bits + 1 (outlier
        channels; per-channel keys only). Which channels: the layer's key
        channel order (Calibration.k_order: baked by calibration, else
        derived from the model's key and query projections); keys are stored
        in that order, the outliers first, and queries are read in it.
    v_group: elements of a value group sharing one scale and bias, if not
        group_size (values need fewer scales than per-channel keys).
    """

    k_bits: Optional[int] = 4
    v_bits: Optional[int] = 4
    key_axis: str = "channel"
    group_size: int = 32
    residual: int = 64
    sinks: int = 4
    rotate: bool = False
    k_outliers: int = 0
    v_group: Optional[int] = None

    def __post_init__(self):
        for name in ("k_bits", "v_bits"):
            b = getattr(self, name)
            if b is not None and (type(b) is not int or b not in VALID_BITS):
                raise ValueError(
                    f"{name}={b!r} is not supported; use one of {VALID_BITS} or None"
                )
        if not isinstance(self.key_axis, str) or self.key_axis not in KEY_AXES:
            raise ValueError(f"key_axis={self.key_axis!r}; use one of {KEY_AXES}")
        if not isinstance(self.rotate, bool):
            raise ValueError(f"rotate={self.rotate!r} must be True or False")
        if type(self.group_size) is not int or self.group_size not in VALID_GROUPS:
            raise ValueError(
                f"group_size={self.group_size!r}; use one of {VALID_GROUPS}"
            )
        if self.v_group is not None and (type(self.v_group) is not int
                                         or self.v_group not in VALID_GROUPS):
            raise ValueError(f"v_group={self.v_group!r}; use one of {VALID_GROUPS} or None")
        for name in ("residual", "sinks", "k_outliers"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        if (
            self.key_axis == "channel"
            and self.k_bits is not None
            and self.residual % self.group_size
        ):
            raise ValueError(
                f"residual={self.residual} must be a multiple of group_size="
                f"{self.group_size} when keys are quantized per channel"
            )

        if self.k_outliers:
            if not self.keys_per_channel:
                raise ValueError(f"k_outliers={self.k_outliers} needs keys quantized per "
                                 "channel (key_axis='channel' and k_bits set)")
            if self.k_bits + 1 not in VALID_BITS:
                raise ValueError(f"k_outliers keeps channels at k_bits + 1 = {self.k_bits + 1} "
                                 f"bits, not a supported width: use k_bits of at most 5")

    @property
    def value_group(self) -> int:
        """Elements per value group."""
        return self.v_group or self.group_size

    @property
    def rotate_keys(self) -> bool:
        # Per-channel key groups already isolate outlier channels; rotating
        # would smear those outliers over every channel.
        return self.rotate and self.key_axis == "token"

    @property
    def rotate_values(self) -> bool:
        return self.rotate

    @property
    def quantized(self) -> bool:
        return self.k_bits is not None or self.v_bits is not None

    @property
    def keys_per_channel(self) -> bool:
        """Keys quantized per channel, along tokens (stored transposed)."""
        return self.k_bits is not None and self.key_axis == "channel"

    @property
    def flush_unit(self) -> int:
        """Tokens that move from the residual into the body together: whole
        groups for per-channel keys, else single tokens. Body lengths,
        evictions and window slides are whole units."""
        return self.group_size if self.keys_per_channel else 1

    @property
    def min_window(self) -> int:
        """The fewest recent tokens a bounded cache keeps besides its sinks:
        the residual and one flush unit."""
        return self.residual + self.flush_unit

    def check_max_size(self, max_size: Optional[int]) -> "KVQuantSpec":
        """Raise ValueError unless a cache of at most `max_size` tokens (None:
        unbounded) can keep this spec's sinks and its fewest recent tokens."""
        if max_size is not None and max_size < self.sinks + self.min_window:
            raise ValueError(
                f"max_kv_size={max_size} is too small for {self}: it must hold "
                f"{self.sinks} sinks and {self.min_window} recent tokens"
            )
        return self

    def check_window(self, window: Optional[int]) -> "KVQuantSpec":
        """Raise ValueError unless a sliding-window cache of `window` tokens
        (None: not a window cache) can use this spec."""
        if window is not None and (self.sinks or window < self.min_window):
            raise ValueError(
                f"a sliding-window cache of {window} tokens with {self} must keep no "
                f"sinks and a window of at least residual + {self.flush_unit} tokens: "
                "use sinks=0 and a smaller residual (window_spec() picks them)")
        return self

    def flush_size(self, n_res: int) -> int:
        """Residual tokens that flush into the body when n_res wait there:
        whole units, leaving `residual` (none without quantization)."""
        keep = self.residual if self.quantized else 0
        unit = self.flush_unit
        return max(0, (n_res - keep) // unit * unit)

    def token_split(self, tokens: int, window: Optional[int] = None) -> Tuple[int, int, int]:
        """(sinks, body, residual) tokens a one-sequence cache holds after
        `tokens` tokens (no max_size eviction), whatever the chunks they came
        in: each flush leaves whole units in the body, so the residual ends
        with `residual` plus fewer than one unit of tokens. With a window, as
        a decode step leaves it: the body starts at the last whole unit at or
        before tokens - window."""
        n_sink = min(self.sinks, tokens)
        flushed = self.flush_size(tokens - n_sink)
        start = 0
        if window is not None:
            unit = self.flush_unit
            start = min(flushed, max(0, (tokens - window) // unit * unit))
        return n_sink, flushed - start, tokens - n_sink - flushed

    def validate_for(self, head_dim: int, v_head_dim: Optional[int] = None) -> "KVQuantSpec":
        """Check the spec against a model's key (and value, if they differ)
        head dims; raise HeadDimError (a ValueError) if it cannot apply."""
        v_name = "head_dim" if v_head_dim in (None, head_dim) else "v_head_dim"
        Dv = v_head_dim or head_dim
        grouped = []  # dims that quantization groups split
        if self.k_bits is not None and self.key_axis == "token":
            grouped.append(("head_dim", head_dim, f"group_size={self.group_size}"))
        if self.v_bits is not None:
            grouped.append((v_name, Dv, f"v_group={self.v_group}" if self.v_group
                            else f"group_size={self.group_size}"))
        if self.k_outliers >= head_dim:
            raise HeadDimError(f"k_outliers={self.k_outliers} must be fewer than "
                               f"head_dim={head_dim} channels")
        rotated = [(v_name, Dv)] if self.rotate_values else []
        if self.rotate_keys:
            rotated.append(("head_dim", head_dim))
        for name, d, g in grouped:
            if d % int(g.split("=")[1]):
                raise HeadDimError(f"{g} does not divide {name}={d}")
        for name, d in rotated:
            if d & (d - 1):
                raise HeadDimError(f"rotate=True needs a power-of-two {name}, got {name}={d}")
        return self

    def __str__(self) -> str:
        def b(x):
            return "16" if x is None else str(x)

        label = f"k{b(self.k_bits)}v{b(self.v_bits)}"
        if not self.quantized and self == KVQuantSpec(k_bits=None, v_bits=None):
            return label  # a 16-bit spec's options count when they are not the defaults
        label += f"-g{self.group_size}-r{self.residual}-s{self.sinks}"
        if self.key_axis == "token":
            label += "-ktok"
        if self.rotate:
            label += "-rot"
        if self.k_outliers:
            label += f"-o{self.k_outliers}"
        if self.v_group is not None:
            label += f"-vg{self.v_group}"
        return label

    def describe(self) -> str:
        """The scheme in full, for reports."""
        if not self.quantized:
            return "full precision (16-bit), no quantization"
        k = (
            "16-bit"
            if self.k_bits is None
            else f"{self.k_bits}-bit per-{self.key_axis}"
        )
        if self.k_outliers:
            k += f" ({self.k_outliers} outlier channels per head at {self.k_bits + 1}-bit)"
        v = "16-bit" if self.v_bits is None else f"{self.v_bits}-bit per-token"
        if self.v_bits is not None and self.v_group is not None:
            v += f" (group {self.v_group})"
        return (
            f"K {k}, V {v}, group {self.group_size}, residual {self.residual} "
            f"fp16 tokens, sinks {self.sinks}, rotation "
            f"{'hadamard' if self.rotate else 'none'}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVQuantSpec":
        return cls(**d)

    @classmethod
    def from_string(cls, s: str, **overrides) -> "KVQuantSpec":
        """Parse a preset name or a label like "k4v2", "k4v4-g64-r128-s4-rot".

        Keyword overrides (k_bits=..., group_size=..., ...) win over the string.
        """
        text = s.strip().lower()
        if text in PRESETS:
            base = PRESETS[text]
            return replace(base, **overrides) if overrides else base
        m = re.fullmatch(r"k([0-9]+)v([0-9]+)((?:-[a-z]+[0-9]*)*)", text)
        if not m:
            raise ValueError(
                f"cannot parse KV spec {s!r}: use a preset ({', '.join(PRESETS)}) "
                "or a label like k4v2, k4v4-g64-r128-s4-rot, k3v3-o8-vg64"
            )
        def number(name, raw):
            if len(raw) > 6:
                raise ValueError(f"{name}={raw[:12]}{'...' if len(raw) > 12 else ''} is "
                                 f"out of range in KV spec {s!r}")
            return int(raw)

        fields = {}
        for name, raw in (("k_bits", m.group(1)), ("v_bits", m.group(2))):
            fields[name] = None if raw == "16" else number(name, raw)
        for part in filter(None, m.group(3).split("-")):
            opt = re.fullmatch(r"([a-z]+)([0-9]*)", part)
            key, num = opt.group(1), opt.group(2)
            if key in _NUMERIC_OPTS and num:
                name, value = _NUMERIC_OPTS[key], number(_NUMERIC_OPTS[key], num)
            elif key == "rot" and not num:
                name, value = "rotate", True
            elif key == "ktok" and not num:
                name, value = "key_axis", "token"
            else:
                raise ValueError(f"unknown option {part!r} in KV spec {s!r}")
            if name in fields:
                raise ValueError(f"{name} is given twice ({part!r}) in KV spec {s!r}")
            fields[name] = value
        fields.update(overrides)
        return cls(**fields)


_NUMERIC_OPTS = {"g": "group_size", "r": "residual", "s": "sinks", "o": "k_outliers",
                 "vg": "v_group"}

# Named presets; labels like "k4v4" parse to the defaults above.
PRESETS = {
    "fp16": KVQuantSpec(k_bits=None, v_bits=None),
    "k8v8": KVQuantSpec(k_bits=8, v_bits=8),
    "k8v4": KVQuantSpec(k_bits=8, v_bits=4),
    "k4v4": KVQuantSpec(k_bits=4, v_bits=4),
    "k4v2": KVQuantSpec(k_bits=4, v_bits=2),
    "k3v3": KVQuantSpec(k_bits=3, v_bits=3),
    "k2v2": KVQuantSpec(k_bits=2, v_bits=2),
}
PRESETS.update(
    {
        "lossless": PRESETS["k8v8"],
        "balanced": PRESETS["k4v4"],
        "compact": PRESETS["k4v2"],
        "tiny": PRESETS["k2v2"],
    }
)
DEFAULT_PRESET = "k4v4"


def parse_spec(s) -> KVQuantSpec:
    """Accept a KVQuantSpec, a preset name or a label."""
    if isinstance(s, KVQuantSpec):
        return s
    if s is None:
        return PRESETS[DEFAULT_PRESET]
    return KVQuantSpec.from_string(str(s))


def short_label(spec) -> str:
    """The preset label (k4v4, fp16) if the spec is one, else its label
    without the parts that are defaults (k3v3-rot); a per-layer plan (not a
    KVQuantSpec) by its own name ("calibrated")."""
    if not isinstance(spec, KVQuantSpec):
        return str(spec)
    preset = next((k for k, v in PRESETS.items() if v == spec and re.fullmatch(
        r"k\d+v\d+|fp16", k)), None)
    if preset:
        return preset
    defaults = str(KVQuantSpec(k_bits=spec.k_bits, v_bits=spec.v_bits)).split("-")
    parts = str(spec).split("-")
    return "-".join(parts[:1] + [p for p in parts[1:] if p not in defaults])


# -- the window policy ----------------------------------------------------------

SLIDING_DEFAULT = "auto"
WINDOW_KEY_BITS = 8  # "auto": keys of sliding-window layers at least this wide


def sliding_base(spec, sliding=SLIDING_DEFAULT) -> Optional[KVQuantSpec]:
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
        outliers = spec.k_outliers if k_bits == spec.k_bits else 0  # all keys at 8 bits
        return replace(spec, k_bits=k_bits, k_outliers=outliers)
    return parse_spec(sliding)


def describe_sliding(spec, sliding=SLIDING_DEFAULT) -> str:
    """What sliding-window layers get, for reports: "sliding-window layers at
    k8v4, without sinks" or "... in full precision"."""
    base = sliding_base(spec, sliding)
    how = "in full precision" if base is None else f"at {short_label(base)}, without sinks"
    return f"sliding-window layers {how}"


def window_spec(spec, window: int) -> Optional[KVQuantSpec]:
    """The spec a sliding-window layer of `window` tokens uses for `spec`: no
    sinks (the model's window hides the first tokens), and a residual small
    enough for the window (whole groups for per-channel keys); None when even
    no residual fits."""
    spec = parse_spec(spec)
    unit = spec.flush_unit
    room = (window - unit) // unit * unit
    if room < 0:
        return None
    return replace(spec, sinks=0, residual=min(spec.residual, room))
