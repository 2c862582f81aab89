"""The calibrated KV plan format: what `mlx_kvq.calibrate` bakes into a model
folder and `mlx_kvq.load` attaches to the model.

A plan gives every full-attention layer its K and V bits, its outlier key
channels (k_outliers, with the layer's key channel order) and value group,
and how its values are prepared (as they are, smoothed by per-channel
factors, or rotated), on a shared base spec (group size, residual, sinks,
key axis), with the per-channel statistics the calibration measured and its
disclosure. Plans without outlier channels or value groups (all plans made
before these options) carry no tensors for them and load as they did. Files:

  kv_plan.json           scheme, per-layer plan, measurements, disclosure,
                         the sha256 of the scales file;
  kv_scales.safetensors  statistics, smoothing factors and plan tensors;
  config.json            an "mlx_kvq" entry naming the two files.

KVPlan.save writes config.json last, as the commit point: a save killed at
any instant leaves the folder loadable with the old plan or the new one.
load_plan refuses a plan that is damaged, mismatched or made for another
model (KVPlanError names the problem).
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache

from .cache import Calibration
from .files import atomic_write, replace_with, sha256_file, write_json
from .integration import head_dim_of, model_config, sliding_layers
from .persist import model_fingerprint
from .report import count_label, layer_key
from .spec import KVQuantSpec

PLAN_FILE = "kv_plan.json"
SCALES_FILE = "kv_scales.safetensors"
FORMAT = "mlx_kvq.kv_plan"
FORMAT_VERSION = 1
TRANSFORMS = ("none", "smooth", "rotate")
STATS = ("absmax", "p99", "p999", "absmax_rot", "outliers")
OUTLIER_CHANNEL = 4.0  # an outlier channel: absmax beyond 4x its head's median
LIMIT_MARGIN = 1e-3  # stored values are 16-bit: allow their rounding
LINK_BYTES = 1 << 20  # model files this large are hard-linked into copies


class KVPlanError(ValueError):
    """A baked KV plan is missing, corrupt, or made for another model."""


def smoothing(v_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """Per-channel value factors (absmax ** alpha, geometric mean 1 per head):
    dividing by them evens out the channels sharing a per-token group."""
    s = np.maximum(v_absmax, 1e-6 * v_absmax.max()) ** alpha
    return (s / np.exp(np.log(s).mean(axis=-1, keepdims=True))).astype(np.float32)


def summarize(stats: Dict[str, np.ndarray]) -> dict:
    """A layer's statistics in a few numbers, for the JSON disclosure."""
    out = {}
    for kind in ("k", "v"):
        amax = stats[f"{kind}_absmax"]
        ratio = amax / np.median(amax, axis=-1, keepdims=True)
        out[kind] = {
            "absmax": round(float(amax.max()), 4),
            "p999": round(float(stats[f"{kind}_p999"].max()), 4),
            "outlier_channels": int((ratio > OUTLIER_CHANNEL).sum()),
            "outlier_elements": int(stats[f"{kind}_outliers"].sum()),
        }
    return out


@dataclass
class LayerPlan:
    k_bits: Optional[int]
    v_bits: Optional[int]
    values: str = "none"  # how values are prepared: none, smooth, rotate
    k_outliers: int = 0  # key channels at k_bits + 1, first in the layer's k_order
    v_group: Optional[int] = None  # the values' group size, if not the base's


@dataclass
class KVPlan:
    """A per-layer KV precision plan with its statistics and disclosure."""

    base: KVQuantSpec  # group size, residual, sinks, key axis of every layer
    layers: Dict[int, LayerPlan]  # model layer index -> plan (full-attention layers)
    stats: Dict[int, Dict[str, np.ndarray]]
    model: dict  # identity of the calibrated model: see model_identity()
    alpha: float = 1.0  # smoothing strength
    target_bits: Optional[float] = None
    disclosure: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)
    k_order: Dict[int, np.ndarray] = field(default_factory=dict)  # [H, D] per layer

    def spec(self, layer: int) -> KVQuantSpec:
        p = self.layers[layer]
        return replace(self.base, k_bits=p.k_bits, v_bits=p.v_bits,
                       rotate=p.values == "rotate", k_outliers=p.k_outliers,
                       v_group=p.v_group or self.base.v_group)

    def layer_config(self, layer: int) -> tuple:
        """(spec, value smoothing factors or None, key channel order or None)
        of one layer, as a calibration pass reads them."""
        order = self.k_order.get(layer) if self.layers[layer].k_outliers else None
        return self.spec(layer), self.v_smooth(layer), order

    def v_smooth(self, layer: int) -> Optional[np.ndarray]:
        if self.layers[layer].values != "smooth":
            return None
        return smoothing(self.stats[layer]["v_absmax"], self.alpha)

    def calibration(self, layer: int) -> Calibration:
        """Smoothing factors and drift limits of one layer, in stored space."""
        st, spec, s = self.stats[layer], self.spec(layer), self.v_smooth(layer)
        k_lim = st["k_absmax_rot"] if spec.rotate_keys else st["k_absmax"]
        v_lim = st["v_absmax_rot"] if spec.rotate_values else st["v_absmax"]
        if s is not None:
            v_lim = v_lim / s
        margin = 1 + LIMIT_MARGIN
        order = self.k_order.get(layer) if spec.k_outliers else None
        if order is not None:  # limits in the order the keys are stored in
            k_lim = np.take_along_axis(k_lim, order, axis=-1)
        return Calibration(
            v_smooth=None if s is None else mx.array(s),
            k_limit=mx.array(k_lim * margin, dtype=mx.float32),
            v_limit=mx.array(v_lim * margin, dtype=mx.float32),
            source=self.source,
            k_order=None if order is None else mx.array(order, dtype=mx.int32),
        )

    @property
    def average_bits(self) -> float:
        """Code bits per element, averaged over layers' keys and values; an
        outlier key channel adds one bit on 1/head_dim of the keys, a value
        group of its own the difference of its scales' bits from the base's
        (32 bits of fp16 scale and bias per group)."""
        D = self.model.get("head_dim") or 0
        g = self.base.value_group
        bits = []
        for p in self.layers.values():
            bits.append(16 if p.k_bits is None else
                        p.k_bits + (p.k_outliers / D if D and p.k_outliers else 0))
            bits.append(16 if p.v_bits is None else
                        p.v_bits + (32 / p.v_group - 32 / g if p.v_group else 0))
        return sum(bits) / len(bits)

    @property
    def source(self) -> str:
        d = self.disclosure
        if not d:
            return "calibrated (no disclosure)"
        return (f"calibrated {d.get('date', '?')[:10]} on {d.get('tokens', '?')} tokens of "
                f"{', '.join(d.get('sources', []))} (sha256 {d.get('sha256', '?')[:12]}), "
                f"per-layer plan in {PLAN_FILE}")

    def label(self) -> str:
        mix = count_label(layer_key(self.spec(i), self.layers[i].values == "smooth")
                          for i in sorted(self.layers))
        b = self.base
        return (f"{mix} (avg {self.average_bits:.2f} code bits, g{b.group_size}-r{b.residual}"
                f"-s{b.sinks})")

    # -- files ---------------------------------------------------------------

    def tensors(self) -> Dict[str, mx.array]:
        layers = sorted(self.layers)
        codes = {v: i for i, v in enumerate(TRANSFORMS)}
        out = {
            "plan.layers": mx.array(layers, dtype=mx.int32),
            "plan.k_bits": mx.array([self.layers[i].k_bits or 16 for i in layers], dtype=mx.int32),
            "plan.v_bits": mx.array([self.layers[i].v_bits or 16 for i in layers], dtype=mx.int32),
            "plan.values": mx.array([codes[self.layers[i].values] for i in layers], dtype=mx.int32),
        }
        if any(self.layers[i].k_outliers or self.layers[i].v_group for i in layers):
            out["plan.k_outliers"] = mx.array([self.layers[i].k_outliers for i in layers],
                                              dtype=mx.int32)
            out["plan.v_group"] = mx.array([self.layers[i].v_group or 0 for i in layers],
                                           dtype=mx.int32)
        for i in layers:
            if self.layers[i].k_outliers:
                out[f"layers.{i}.k_order"] = mx.array(self.k_order[i], dtype=mx.int32)
        for i in layers:
            for name, a in self.stats[i].items():
                out[f"layers.{i}.{name}"] = mx.array(a)
            s = self.v_smooth(i)
            if s is not None:
                out[f"layers.{i}.v_smooth"] = mx.array(s)
        return out

    def to_json(self, scales_sha256: str) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "scheme": {
                "base": str(self.base),
                "target_bits": self.target_bits,
                "average_bits": round(self.average_bits, 4),
                "label": self.label(),
                "smoothing_alpha": self.alpha,
                "keys": "per-channel groups along tokens: a group's dynamic range already "
                        "isolates an outlier channel, so keys get no static scale or clip",
            },
            "layers": [
                {"layer": i, "spec": str(self.spec(i)), "k_bits": p.k_bits, "v_bits": p.v_bits,
                 "values": p.values, "k_outliers": p.k_outliers, "v_group": p.v_group,
                 "stats": summarize(self.stats[i])}
                for i, p in sorted(self.layers.items())
            ],
            "calibration": self.disclosure,
            "measurements": self.measurements,
            "scales": {"file": SCALES_FILE, "sha256": scales_sha256},
        }

    def save(self, folder, config: Optional[dict] = None) -> Path:
        """Write the plan files and point config.json (`config`, else the
        folder's own, plus the "mlx_kvq" entry) at them. config.json is the
        commit point: the new files are first written under names of their
        own, so that a run killed at any instant leaves the folder loadable
        with the old plan (or none) or with the new one, never a mix."""
        folder = Path(folder)
        if config is None:
            config = json.loads((folder / "config.json").read_text())
        tmp = folder / "kv_scales.tmp.safetensors"
        atomic_write(tmp, lambda t: mx.save_safetensors(
            str(t), self.tensors(),
            metadata={"format": FORMAT, "fingerprint": self.model["fingerprint"]}))
        sha = sha256_file(tmp)
        staged = {"plan": f"kv_plan.{sha[:12]}.json", "scales": f"kv_scales.{sha[:12]}.safetensors"}
        os.replace(tmp, folder / staged["scales"])
        write_json(folder / staged["plan"], sealed(self.to_json(sha)))
        write_json(folder / "config.json", {**config, "mlx_kvq": staged})  # the new plan is in
        final = {"plan": PLAN_FILE, "scales": SCALES_FILE}
        for key in ("scales", "plan"):
            replace_with(folder / staged[key], folder / final[key])
        write_json(folder / "config.json", {**config, "mlx_kvq": final})
        for f in folder.iterdir():
            if leftover(f.name):
                f.unlink()  # staged copies and leftovers of killed runs
        return folder / PLAN_FILE


SEAL = "json_sha256"


def _json_digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def sealed(d: dict) -> dict:
    """The plan JSON with a sha256 of itself, which load_plan checks."""
    return {**d, SEAL: _json_digest(d)}


def leftover(name: str) -> bool:
    """A staged plan file or a temporary file of a (killed) save."""
    return bool(re.fullmatch(r"kv_(plan|scales)\.([0-9a-f]{12}|tmp)\.(json|safetensors)"
                             r"|.*\.tmp|\..*\.tmp(\.\w+)?", name))


def model_identity(model) -> dict:
    a = model_config(model)
    return {
        "model_type": a.get("model_type", type(model).__module__.split(".")[-1]),
        "n_layers": len(model.layers),
        "n_kv_heads": int(a.get("num_key_value_heads") or a.get("num_attention_heads") or 0),
        "head_dim": head_dim_of(model),
        "fingerprint": model_fingerprint(model),
    }


def plan_files(folder) -> Optional[tuple]:
    """(plan, scales) paths named by config.json's "mlx_kvq" entry, or None."""
    folder = Path(folder)
    try:
        entry = json.loads((folder / "config.json").read_text()).get("mlx_kvq")
    except (OSError, json.JSONDecodeError):
        return None
    if not entry:
        return None
    try:
        return folder / entry["plan"], folder / entry["scales"]
    except (TypeError, KeyError) as e:
        raise KVPlanError(f"{folder}/config.json: malformed \"mlx_kvq\" entry {entry!r}") from e


def load_plan(folder, model=None) -> KVPlan:
    """Read and check a baked plan; with `model`, refuse one made for another model."""
    files = plan_files(folder)
    if files is None:
        raise KVPlanError(f"{folder} has no baked KV plan (no \"mlx_kvq\" entry in config.json)")
    plan_path, scales_path = files
    try:
        d = json.loads(plan_path.read_text())
        if not isinstance(d, dict) or d.get("format") != FORMAT or \
                d.get("version") != FORMAT_VERSION:
            raise KVPlanError(f"{plan_path}: not a {FORMAT} v{FORMAT_VERSION} file")
        if SEAL in d:  # plans of earlier versions carry none
            want = d.pop(SEAL)
            if _json_digest(d) != want:
                raise KVPlanError(f"{plan_path} is damaged (its sha256 differs): calibrate "
                                  "again")
        _check_json(d, plan_path)
        if sha256_file(scales_path) != d["scales"]["sha256"]:
            raise KVPlanError(f"{scales_path} does not match {plan_path.name} (sha256 differs): "
                            "damaged, or from another calibration; calibrate again")
        arrays = mx.load(str(scales_path))
        scheme = d["scheme"]
        layers = {e["layer"]: LayerPlan(e["k_bits"], e["v_bits"], e["values"],
                                        e.get("k_outliers", 0), e.get("v_group"))
                  for e in d["layers"]}
        stats = {i: {n: np.array(arrays[f"layers.{i}.{n}"]) for kind in "kv"
                     for n in (f"{kind}_{s}" for s in STATS)} for i in layers}
        k_order = {i: np.array(arrays[f"layers.{i}.k_order"]).astype(np.int32)
                   for i, p in layers.items() if p.k_outliers}
        plan = KVPlan(KVQuantSpec.from_string(scheme["base"]), layers, stats, d["model"],
                      alpha=scheme["smoothing_alpha"], target_bits=scheme.get("target_bits"),
                      disclosure=d["calibration"], measurements=d["measurements"],
                      k_order=k_order)
        _check_tensors(plan, arrays)
        for i in layers:
            plan.spec(i)  # outlier counts and value groups a spec takes
    except KVPlanError:
        raise
    except FileNotFoundError as e:
        raise KVPlanError(f"baked KV plan file missing: {e.filename}") from e
    except Exception as e:  # JSON, safetensors and key errors of a damaged file
        raise KVPlanError(f"corrupt KV plan in {folder} ({type(e).__name__}: {e})") from e
    if model is not None:
        check_plan_model(plan, model)
    return plan


def _check_json(d: dict, path: Path):
    """Fields of the plan JSON of the types and values a plan has."""
    def bad(field, value):
        raise KVPlanError(f"{path}: {field}={value!r} is not valid")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)

    for key in ("model", "scheme", "calibration", "measurements", "scales"):
        if not isinstance(d.get(key), dict):
            bad(key, d.get(key))
    sch = d["scheme"]
    if not isinstance(sch.get("base"), str):
        bad("scheme.base", sch.get("base"))
    if not number(sch.get("smoothing_alpha")) or not 0 <= sch["smoothing_alpha"] <= 1:
        bad("scheme.smoothing_alpha", sch.get("smoothing_alpha"))
    if sch.get("target_bits") is not None and not number(sch["target_bits"]):
        bad("scheme.target_bits", sch["target_bits"])
    if not isinstance(d["scales"].get("sha256"), str):
        bad("scales.sha256", d["scales"].get("sha256"))
    if not isinstance(d.get("layers"), list) or not d["layers"]:
        bad("layers", d.get("layers"))
    for e in d["layers"]:
        if not isinstance(e, dict):
            bad("layers[]", e)
        if type(e.get("layer")) is not int or e["layer"] < 0:
            bad("layers[].layer", e.get("layer"))
        for key in ("k_bits", "v_bits", "k_outliers", "v_group"):
            if e.get(key) is not None and type(e[key]) is not int:
                bad(f"layers[{e['layer']}].{key}", e[key])
        if e.get("values") not in TRANSFORMS:
            bad(f"layers[{e['layer']}].values", e.get("values"))
    info = d["calibration"]
    for key in ("date", "sha256"):
        if key in info and not isinstance(info[key], str):
            bad(f"calibration.{key}", info[key])
    if "sources" in info and not (isinstance(info["sources"], list)
                                  and all(isinstance(x, str) for x in info["sources"])):
        bad("calibration.sources", info["sources"])


def _check_tensors(plan: KVPlan, arrays):
    """The plan tensors must say what the JSON says; statistics are finite
    magnitudes of one shape."""
    for i in plan.layers:
        for name, a in plan.stats[i].items():
            if a.shape != plan.stats[i]["k_absmax"].shape or a.ndim != 2 or \
                    not np.isfinite(a).all() or (a < 0).any():
                raise KVPlanError(f"{SCALES_FILE}: layers.{i}.{name} has shape {a.shape}, "
                                  "or values that are not finite non-negative magnitudes")
    want = {k: np.array(v) for k, v in plan.tensors().items() if k.startswith("plan.")}
    for name, a in want.items():
        if name not in arrays or not np.array_equal(np.array(arrays[name]), a):
            raise KVPlanError(f"{SCALES_FILE}: {name} disagrees with {PLAN_FILE}")
    for i in plan.layers:
        s = plan.v_smooth(i)
        if s is not None and not np.allclose(np.array(arrays[f"layers.{i}.v_smooth"]), s,
                                             rtol=1e-4):
            raise KVPlanError(f"{SCALES_FILE}: layers.{i}.v_smooth disagrees with the statistics")
        order = plan.k_order.get(i)
        if order is not None and (order.shape != plan.stats[i]["k_absmax"].shape or (
                np.sort(order, axis=-1) != np.arange(order.shape[-1])).any()):
            raise KVPlanError(f"{SCALES_FILE}: layers.{i}.k_order is not an order of each "
                              "kv head's key channels")
        for name, a in plan.stats[i].items():
            if a.shape != plan.stats[i]["k_absmax"].shape:
                raise KVPlanError(f"{SCALES_FILE}: layers.{i}.{name} has shape {a.shape}")


def check_plan_model(plan: KVPlan, model):
    have, want = model_identity(model), plan.model
    for key, what in (("n_layers", "layers"), ("n_kv_heads", "kv heads"), ("head_dim", "head_dim")):
        if have[key] != want.get(key):
            raise KVPlanError(f"the KV plan was calibrated for a model with {want.get(key)} "
                            f"{what}, this one has {have[key]}")
    if have["fingerprint"] != want.get("fingerprint"):
        raise KVPlanError(f"the KV plan was calibrated for another model (fingerprint "
                        f"{want.get('fingerprint')} != {have['fingerprint']}): calibrate this one")
    caches = mlx_cache.make_prompt_cache(model)
    full = {i for i, c in enumerate(caches) if type(c) is KVCache}
    sliding = set(sliding_layers(caches))
    if set(plan.layers) not in (full, full | sliding):
        raise KVPlanError(f"the KV plan covers layers {sorted(plan.layers)}, the model's "
                          f"attention layers are {sorted(full | sliding)}")
    for i in plan.layers:
        shape = plan.stats[i]["k_absmax"].shape
        if shape != (have["n_kv_heads"], have["head_dim"]):
            raise KVPlanError(f"KV plan layer {i} statistics have shape {shape}, the model's "
                            f"kv heads x head_dim are {(have['n_kv_heads'], have['head_dim'])}")


def attach(model, folder) -> Optional[KVPlan]:
    """Attach the plan baked into `folder` (if any) to the model as model.kvq_plan."""
    if plan_files(folder) is None:
        return None
    plan = load_plan(folder, model)
    model.kvq_plan = plan
    return plan


# -- model folders -------------------------------------------------------------


def copy_model(src: Path, dst: Path, config: bool = True):
    """A copy of a model folder (config.json too unless `config` is False),
    each file replaced atomically. Files over 1 MB (weights) are hard-linked
    when the file system allows: nothing here writes into them."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.resolve().iterdir():
        f = f.resolve()  # hub snapshots hold symlinks to blobs
        if not f.is_file() or f.name in (PLAN_FILE, SCALES_FILE) or leftover(f.name):
            continue
        if f.name == "config.json" and not config:
            continue
        target = dst / f.name
        if f.stat().st_size > LINK_BYTES:
            replace_with(f, target)
        else:
            tmp = target.with_name(target.name + ".tmp")
            shutil.copy2(f, tmp)
            os.replace(tmp, target)


def bake(plan: KVPlan, src: Path, out: Path) -> Path:
    """Write `plan` into `out` (src itself, or a calibrated copy of src). A
    new folder is built aside and renamed into place; an existing one gets
    its files replaced one by one and config.json last. Killed at any
    instant, `out` is absent, as it was, or calibrated."""
    config = json.loads((src / "config.json").read_text())
    config.pop("mlx_kvq", None)
    if out.resolve() == src.resolve():
        return plan.save(out, config)
    if out.exists():
        copy_model(src, out, config=False)
        return plan.save(out, config)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    copy_model(src, partial, config=False)
    plan.save(partial, config)
    os.rename(partial, out)
    return out / PLAN_FILE
