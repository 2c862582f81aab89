"""Caches compared by `mlx_kvq.eval` and `mlx_kvq.bench`, by name: "fp"
(mlx-lm's full-precision caches), "mlx<bits>[-g<group>]" (mlx-lm's
QuantizedKVCache, every layer), "calibrated" (the per-layer plan baked into
the model folder), "calibrated:<folder>" (the plan baked into another
folder of the same model, so that plans compare in one run) or an mlx_kvq spec ("k4v4", "k3v3-rot", ...; after a "/",
what sliding-window layers use (spec.sliding_base: "auto" by default,
"/same", "/keep" for mlx-lm's full-precision cache, or another spec,
"k4v4/k8v4"). A name is parsed
once into a Scheme, which makes its caches, checks that it applies to a
model, counts its bytes and describes itself.
"""

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_make_prompt_cache

from mlx_kvq import kvplan, sizing
from mlx_kvq.integration import make_prompt_cache
from mlx_kvq.spec import (SLIDING_DEFAULT, VALID_BITS, VALID_GROUPS, KVQuantSpec,
                          describe_sliding, parse_spec)

MLX_BASELINE = re.compile(r"mlx(\d)(?:-g(\d+))?$")


@dataclass
class Scheme:
    """A cache to evaluate: an mlx_kvq spec, mlx-lm's QuantizedKVCache, or fp."""

    name: str
    kind: str = field(init=False)  # fp, mlx, calibrated, spec
    bits: Optional[int] = field(init=False, default=None)  # mlx-lm baselines
    group: Optional[int] = field(init=False, default=None)

    def __post_init__(self):
        self.sliding = SLIDING_DEFAULT
        self.folder = None
        if self.name.startswith("calibrated:"):
            self.kind, self.folder = "calibrated", self.name.partition(":")[2]
            if not self.folder:
                raise ValueError("scheme 'calibrated:<folder>' needs the folder of a plan "
                                 "baked by mlx_kvq.calibrate --out <folder>")
            return
        base, _, sliding = self.name.partition("/")
        if sliding:
            if sliding not in ("keep", "same", "auto"):
                try:
                    parse_spec(sliding)
                except ValueError as e:
                    raise ValueError(f"scheme {self.name!r}: after '/' comes what sliding-window "
                                     f"layers use, 'keep' (full precision) or a spec: {e}") \
                        from None
            self.sliding = sliding
        m = MLX_BASELINE.match(self.name)
        if m:
            self.kind, self.bits, self.group = "mlx", int(m.group(1)), int(m.group(2) or 64)
        elif self.name in ("fp", "calibrated"):
            self.kind = self.name
        else:
            self.kind = "spec"

    @property
    def baseline(self) -> bool:
        """mlx-lm's QuantizedKVCache."""
        return self.kind == "mlx"

    @property
    def spec(self) -> KVQuantSpec:
        return parse_spec(self.name.partition("/")[0])

    def make(self, model):
        if self.kind == "fp":
            return mlx_make_prompt_cache(model)
        if self.kind == "mlx":
            return [QuantizedKVCache(group_size=self.group, bits=self.bits)
                    for _ in model.layers]
        if self.kind == "calibrated":  # the plan baked by mlx_kvq.calibrate
            return make_prompt_cache(model, plan=self.plan(model))
        return make_prompt_cache(model, self.spec, sliding_spec=self.sliding)

    def validate(self, shape=None, model=None):
        """Raise ValueError, naming the problem, for a scheme that cannot be
        made (for the model of `shape` / `model`, if given)."""
        if self.kind == "mlx":
            bits, group = self.bits, self.group
            if bits not in VALID_BITS or group not in VALID_GROUPS:
                raise ValueError(f"mlx-lm baseline {self.name!r}: bits must be one of "
                                 f"{VALID_BITS}, group one of {VALID_GROUPS}")
            if shape is not None and (shape.head_dim % group or shape.dv % group):
                raise ValueError(f"mlx-lm baseline {self.name!r}: group {group} does not "
                                 f"divide the head dims {shape.head_dim} / {shape.dv}")
            if model is not None and any(isinstance(getattr(x, "sinks", None), mx.array)
                                         for _, x in model.named_modules()):
                raise ValueError(f"mlx-lm baseline {self.name!r}: mlx-lm's quantized "
                                 "attention does not support this model's attention sinks")
        elif self.kind == "calibrated":
            if self.folder is not None and kvplan.plan_files(Path(self.folder).expanduser()) \
                    is None:
                raise ValueError(f"scheme {self.name!r}: {self.folder} holds no plan baked by "
                                 "mlx_kvq.calibrate (make one with mlx_kvq.calibrate --out "
                                 f"{self.folder})")
            if model is not None:
                self.plan(model)
        elif self.kind == "spec":
            spec = self.spec
            if shape is not None:
                spec.validate_for(shape.head_dim, shape.dv)
        return self

    def plan(self, model) -> "kvplan.KVPlan":
        """The plan of a "calibrated" scheme for `model`; ValueError (naming
        the folder) when there is none or it was made for another model."""
        if self.folder is None:
            plan = getattr(model, "kvq_plan", None)
            if plan is None:
                raise ValueError("scheme 'calibrated' needs a model folder calibrated by "
                                 "mlx_kvq.calibrate (or 'calibrated:<folder>' for a plan "
                                 "baked into another folder of this model)")
            return plan
        plan = _load_plan(str(Path(self.folder).expanduser().resolve()))
        kvplan.check_plan_model(plan, model)
        return plan

    def kv_bytes(self, shape, context: int) -> int:
        """Bytes this scheme's caches hold after `context` tokens (sizing's
        arithmetic; mlx-lm's caches keep K/V, or its scales, in the model dtype)."""
        windows = sizing.window_bytes(shape, context)
        if self.kind == "fp":  # full layers as an unquantized KVQCache, in the model dtype
            return (sizing.kv_bytes(shape, "fp16", context, "keep") - windows) \
                * shape.dtype_bytes // 2 \
                + windows
        if self.kind == "mlx":  # one QuantizedKVCache per layer, sliding ones included
            per_token = shape.n_kv_heads * (shape.head_dim + shape.dv) * (
                self.bits / 8 + 2 * shape.dtype_bytes / self.group)
            return int(shape.n_layers * per_token * context)
        if self.kind == "calibrated":
            return sizing.kv_bytes(shape, "k8v8", context)
        return sizing.kv_bytes(shape, self.spec, context, self.sliding)

    def describe(self, windowed: bool = True):
        """The scheme in full; windowed: say what sliding-window layers get."""
        if self.kind == "fp":
            return "full precision (model dtype) KVCache"
        if self.kind == "mlx":
            return (f"mlx-lm QuantizedKVCache {self.bits}-bit group {self.group}, "
                    "keys and values per token")
        if self.kind == "calibrated":
            return ("the per-layer plan baked into " + (self.folder or "the model folder")
                    + " (see calibration)")
        if not windowed:
            return self.spec.describe()
        return f"{self.spec.describe()}; {describe_sliding(self.spec, self.sliding)}"


def plan_labels(model, schemes) -> dict:
    """{name: its plan's source and per-layer label} of the "calibrated"
    schemes among `schemes`: what, beyond its name, fixes such a scheme's
    answers."""
    return {x.name: _label(x.plan(model)) for x in map(Scheme, dict.fromkeys(schemes))
            if x.kind == "calibrated"}


def calibrations(model, schemes) -> Optional[str]:
    """The plans behind the "calibrated" schemes (source and per-layer
    label), or None when no scheme is calibrated."""
    said = [f"{label} (scheme {name!r})" for name, label in plan_labels(model, schemes).items()]
    plan = getattr(model, "kvq_plan", None)
    if plan is not None and "calibrated" not in schemes:
        said.insert(0, f"{_label(plan)} (baked into the model folder)")
    return "; ".join(said + ["the other schemes: dynamic per-group scales, none"]) \
        if said else None


def _label(plan) -> str:
    return f"{plan.source}: {plan.label()}"


@functools.lru_cache(maxsize=8)
def _load_plan(folder: str) -> "kvplan.KVPlan":
    return kvplan.load_plan(folder)
