"""KV quantization scheme: what is stored, at which precision, along which axis."""

import re
from dataclasses import asdict, dataclass, replace
from typing import Optional

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
    """

    k_bits: Optional[int] = 4
    v_bits: Optional[int] = 4
    key_axis: str = "channel"
    group_size: int = 32
    residual: int = 64
    sinks: int = 4
    rotate: bool = False

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
        for name in ("residual", "sinks"):
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

    def validate_for(self, head_dim: int, v_head_dim: Optional[int] = None) -> "KVQuantSpec":
        """Check the spec against a model's key (and value, if they differ)
        head dims; raise HeadDimError (a ValueError) if it cannot apply."""
        v_name = "head_dim" if v_head_dim in (None, head_dim) else "v_head_dim"
        Dv = v_head_dim or head_dim
        grouped = []  # dims that quantization groups split
        if self.k_bits is not None and self.key_axis == "token":
            grouped.append(("head_dim", head_dim))
        if self.v_bits is not None:
            grouped.append((v_name, Dv))
        rotated = [(v_name, Dv)] if self.rotate_values else []
        if self.rotate_keys:
            rotated.append(("head_dim", head_dim))
        for name, d in grouped:
            if d % self.group_size:
                raise HeadDimError(f"group_size={self.group_size} does not divide {name}={d}")
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
        v = "16-bit" if self.v_bits is None else f"{self.v_bits}-bit per-token"
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
                "or a label like k4v2, k4v4-g64-r128-s4-rot"
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


_NUMERIC_OPTS = {"g": "group_size", "r": "residual", "s": "sinks"}

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
