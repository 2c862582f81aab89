"""Calibrate a model's quantized KV cache on a workload and bake the result
into its folder: `mlx_kvq.calibrate`.

KV values are activations whose outliers depend on the text, so a
calibration must span the deployment workload, and it is disclosed.
Everything runs the model's own attention path, in three phases:

  * statistics: per layer, kv head and channel statistics of keys and
    values (absmax, 99th / 99.9th percentiles, outlier counts), from one
    full-precision pass with a recording cache;
  * sensitivity (sensitivity.py): what quantizing each layer's keys or
    values costs at each width and with each value preparation (as they
    are, divided by calibrated per-channel factors, or rotated), estimated
    from one gradient pass by default or measured per option; the sink
    count is measured;
  * a greedy allocation of K and V bits per layer under the target average,
    then measured: kept only if it beats the best uniform spec of the same
    average.

Written into the model folder: kv_plan.json (scheme, per-layer plan,
measurements, disclosure), kv_scales.safetensors (statistics, smoothing
factors, plan tensors), and an "mlx_kvq" entry in config.json pointing to
them; config.json is written last and commits the plan (KVPlan.save).
Finished phases are checkpointed outside the folder, and a stopped run
resumes from them. `mlx_kvq.load` attaches the plan to the model, and
make_prompt_cache(model) uses it unless given a spec.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache
from tqdm import tqdm

from .. import corpus
from ..cache import Calibration, KVQCache
from ..cli_types import int_list, positive_int, tokens
from ..integration import check_model, head_dim_of, model_config
from ..persist import model_fingerprint, sha256_file
from ..report import count_label, layer_key
from ..spec import VALID_BITS, KVQuantSpec, parse_spec
from .sensitivity import Fisher, Measured, squared_gradients

PLAN_FILE = "kv_plan.json"
SCALES_FILE = "kv_scales.safetensors"
FORMAT = "mlx_kvq.kv_plan"
FORMAT_VERSION = 1
TRANSFORMS = ("none", "smooth", "rotate")
SINK_COUNTS = (0, 4, 16)
SMOOTH_ALPHAS = (0.5, 1.0)
TIE = 0.02  # KLDs within 2% count as equal: the cheaper option wins
OUTLIER_SIGMAS = 6.0  # an outlier element: |x| beyond 6 RMS of its head
OUTLIER_CHANNEL = 4.0  # an outlier channel: absmax beyond 4x its head's median
LIMIT_MARGIN = 1e-3  # stored values are 16-bit: allow their rounding
QUICK_TOKENS = 2048  # --quick: statistics from at most this many tokens
STATS = ("absmax", "p99", "p999", "absmax_rot", "outliers")


class PlanError(ValueError):
    """A baked KV plan is missing, corrupt, or made for another model."""


# -- workload -----------------------------------------------------------------


KJV_PACKAGE = "bible-kjv-text"
KJV_FILE = "usr/lib/bible.data"


def _fetch_deb_file(package: str, member: str, target: Path) -> Path:
    """Extract one file of a Debian package into `target` (no root needed)."""
    system = Path("/") / member
    if system.is_file():
        return system
    if target.is_file():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{package} needs apt-get and dpkg-deb to fetch")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o777)  # apt downloads as the _apt user when it can
        run = subprocess.run(["apt-get", "download", package], cwd=tmp,
                             capture_output=True, text=True)
        debs = list(tmp.glob(f"{package}_*.deb"))
        if run.returncode or not debs:
            raise RuntimeError(f"`apt-get download {package}` failed: {run.stderr.strip()}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], check=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tmp / "root" / member, target.with_suffix(".part"))
        os.replace(target.with_suffix(".part"), target)
    return target


def _lzw_decode(data: bytes, max_bits: int = 16) -> bytes:
    """Unix `compress` (LZW, block mode) codes, without the 3-byte header."""
    out, table = bytearray(), [bytes([i]) for i in range(256)] + [b""]
    n_bits, pos, group, prev, end = 9, 0, 0, None, len(data) * 8

    def realign():  # compress writes codes in groups of n_bits bytes
        return group + -(-(pos - group) // (n_bits * 8)) * n_bits * 8

    while pos + n_bits <= end:
        word = int.from_bytes(data[pos >> 3:(pos >> 3) + 3], "little")
        code = (word >> (pos & 7)) & ((1 << n_bits) - 1)
        pos += n_bits
        if code == 256:  # clear
            del table[257:]
            pos = group = realign()
            n_bits, prev = 9, None
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev is not None:
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corrupt LZW stream (code {code})")
        if prev is not None:
            table.append(prev + entry[:1])
        out += entry
        prev = entry
        if len(table) > (1 << n_bits) - 1 and n_bits < max_bits:
            pos = group = realign()
            n_bits += 1
    return bytes(out)


def kjv_text() -> str:
    """The King James Bible from Debian's bible-kjv-text: its bible.data holds
    LZW (`compress`) windows that restart at checkpoints; verse references
    are dropped, verses joined, one paragraph per chapter."""
    from ..models import cache_home

    path = _fetch_deb_file(KJV_PACKAGE, KJV_FILE, cache_home() / "corpora" / "kjv" / "bible.data")
    data = path.read_bytes()
    if not data.startswith(b"EC02"):
        raise ValueError(f"{path} is not a bible-kjv compressed data file")
    _, n = struct.unpack(">II", data[0x54:0x5C])
    offsets = struct.unpack(f">{n + 1}I", data[0x5C:0x5C + 4 * (n + 1)])
    text = b"".join(_lzw_decode(data[a:b]) for a, b in zip(offsets, offsets[1:]))
    chapters, key = [], None
    for line in text.decode("ascii").splitlines()[1:]:  # line 0: a title
        ref, _, verse = line.partition(" ")
        chapter = ref.split(":")[0]
        if chapter != key:
            chapters.append([])
            key = chapter
        chapters[-1].append(verse)
    return "\n\n".join(" ".join(c) for c in chapters) + "\n"


def _austen(selector: str) -> str:
    """"austen", "austen:emma,persuasion" (those novels) or "austen:-persuasion"
    (all but those); novels are named by the start of janeaustenr's keys."""
    _, _, names = selector.partition(":")
    keys = list(corpus.TITLES)
    if names:
        drop = names.startswith("-")
        picked = {k for n in names.lstrip("-").split(",") for k in keys if k.startswith(n)}
        if not picked:
            raise ValueError(f"no Austen novel matches {names!r}; keys: {', '.join(keys)}")
        keys = [k for k in keys if (k in picked) != drop]
    books = corpus.austen_books()
    return "\n\n".join(books[corpus.TITLES[k]] for k in keys)


def _jsonl(path: Path, tokenizer) -> str:
    """Chat transcripts rendered with the model's chat template, or "text" records."""

    def render(messages):
        if not getattr(tokenizer, "has_chat_template", False):
            raise ValueError(f"{path}: chat transcripts need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False)

    return "\n\n".join(corpus.jsonl_texts(path, render))


def source_text(source: str, tokenizer=None) -> str:
    """The text of one workload source: austen[:...], kjv, sample, or a
    .txt / .jsonl file."""
    from .. import corpus

    if source == "austen" or source.startswith("austen:"):
        return _austen(source)
    if source == "kjv":
        return kjv_text()
    if source == "sample":
        return corpus.sample_text()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"workload source {source!r}: no such file (or use "
                                "austen, austen:<novels>, kjv, sample)")
    return _jsonl(path, tokenizer) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")


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


class RecordingCache(KVCache):
    """A full-precision KVCache that hands what the layer stores to `record`."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def update_and_fetch(self, keys, values):
        self.record(keys, values)
        return super().update_and_fetch(keys, values)


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


def _log_softmax(x):
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


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
            caches = [RecordingCache(lambda k, v, i=i: record_kv(i, k, v))
                      if type(c) is KVCache else c for i, c in enumerate(caches)]
        inputs = [[] for _ in range(self.n_layers)]
        stands = None
        if keep and self.owner is not None:
            stands = [_Stand(b, record=inputs[i]) for i, b in enumerate(self.owner.layers)]
        logprobs, probs = [], []
        with _blocks(self.owner, stands):
            for x in self._chunks(tokens):
                lp = _log_softmax(self.model(x, cache=caches)[0])
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
                lq = _log_softmax(self.model(x, cache=caches)[0])
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
    from ..quant import hadamard

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
    }


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


# -- the plan ---------------------------------------------------------------------


@dataclass
class LayerPlan:
    k_bits: Optional[int]
    v_bits: Optional[int]
    values: str = "none"  # how values are prepared: none, smooth, rotate


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

    def spec(self, layer: int) -> KVQuantSpec:
        p = self.layers[layer]
        return replace(self.base, k_bits=p.k_bits, v_bits=p.v_bits,
                       rotate=p.values == "rotate")

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
        return Calibration(
            v_smooth=None if s is None else mx.array(s),
            k_limit=mx.array(k_lim * margin, dtype=mx.float32),
            v_limit=mx.array(v_lim * margin, dtype=mx.float32),
            source=self.source,
        )

    @property
    def average_bits(self) -> float:
        bits = [16 if b is None else b for p in self.layers.values() for b in (p.k_bits, p.v_bits)]
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
                 "values": p.values, "stats": summarize(self.stats[i])}
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
        mx.save_safetensors(str(tmp), self.tensors(),
                            metadata={"format": FORMAT, "fingerprint": self.model["fingerprint"]})
        sha = sha256_file(tmp)
        staged = {"plan": f"kv_plan.{sha[:12]}.json", "scales": f"kv_scales.{sha[:12]}.safetensors"}
        os.replace(tmp, folder / staged["scales"])
        write_json(folder / staged["plan"], self.to_json(sha))
        write_json(folder / "config.json", {**config, "mlx_kvq": staged})  # the new plan is in
        final = {"plan": PLAN_FILE, "scales": SCALES_FILE}
        for key in ("scales", "plan"):
            _replace_with(folder / staged[key], folder / final[key])
        write_json(folder / "config.json", {**config, "mlx_kvq": final})
        for f in folder.iterdir():
            if _leftover(f.name):
                f.unlink()  # staged copies and leftovers of killed runs
        return folder / PLAN_FILE


def _leftover(name: str) -> bool:
    """A staged plan file or a temporary file of a (killed) save."""
    return bool(re.fullmatch(r"kv_(plan|scales)\.([0-9a-f]{12}|tmp)\.(json|safetensors)"
                             r"|.*\.tmp", name))


def _replace_with(src: Path, dst: Path):
    """Atomically make dst a copy of src (a hard link when the file system allows)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # replaces, never edits a (possibly hard-linked) file


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
        raise PlanError(f"{folder}/config.json: malformed \"mlx_kvq\" entry {entry!r}") from e


def load_plan(folder, model=None) -> KVPlan:
    """Read and check a baked plan; with `model`, refuse one made for another model."""
    files = plan_files(folder)
    if files is None:
        raise PlanError(f"{folder} has no baked KV plan (no \"mlx_kvq\" entry in config.json)")
    plan_path, scales_path = files
    try:
        d = json.loads(plan_path.read_text())
        if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
            raise PlanError(f"{plan_path}: not a {FORMAT} v{FORMAT_VERSION} file")
        if sha256_file(scales_path) != d["scales"]["sha256"]:
            raise PlanError(f"{scales_path} does not match {plan_path.name} (sha256 differs): "
                            "damaged, or from another calibration; calibrate again")
        arrays = mx.load(str(scales_path))
        scheme = d["scheme"]
        layers = {e["layer"]: LayerPlan(e["k_bits"], e["v_bits"], e["values"]) for e in d["layers"]}
        stats = {i: {n: np.array(arrays[f"layers.{i}.{n}"]) for kind in "kv"
                     for n in (f"{kind}_{s}" for s in STATS)} for i in layers}
        plan = KVPlan(KVQuantSpec.from_string(scheme["base"]), layers, stats, d["model"],
                      alpha=scheme["smoothing_alpha"], target_bits=scheme.get("target_bits"),
                      disclosure=d["calibration"], measurements=d["measurements"])
        _check_tensors(plan, arrays)
    except PlanError:
        raise
    except FileNotFoundError as e:
        raise PlanError(f"baked KV plan file missing: {e.filename}") from e
    except Exception as e:  # JSON, safetensors and key errors of a damaged file
        raise PlanError(f"corrupt KV plan in {folder} ({type(e).__name__}: {e})") from e
    if model is not None:
        check_plan_model(plan, model)
    return plan


def _check_tensors(plan: KVPlan, arrays):
    """The plan tensors must say what the JSON says."""
    want = {k: np.array(v) for k, v in plan.tensors().items() if k.startswith("plan.")}
    for name, a in want.items():
        if name not in arrays or not np.array_equal(np.array(arrays[name]), a):
            raise PlanError(f"{SCALES_FILE}: {name} disagrees with {PLAN_FILE}")
    for i in plan.layers:
        s = plan.v_smooth(i)
        if s is not None and not np.allclose(np.array(arrays[f"layers.{i}.v_smooth"]), s,
                                             rtol=1e-4):
            raise PlanError(f"{SCALES_FILE}: layers.{i}.v_smooth disagrees with the statistics")
        for name, a in plan.stats[i].items():
            if a.shape != plan.stats[i]["k_absmax"].shape:
                raise PlanError(f"{SCALES_FILE}: layers.{i}.{name} has shape {a.shape}")


def check_plan_model(plan: KVPlan, model):
    have, want = model_identity(model), plan.model
    for key, what in (("n_layers", "layers"), ("n_kv_heads", "kv heads"), ("head_dim", "head_dim")):
        if have[key] != want.get(key):
            raise PlanError(f"the KV plan was calibrated for a model with {want.get(key)} "
                            f"{what}, this one has {have[key]}")
    if have["fingerprint"] != want.get("fingerprint"):
        raise PlanError(f"the KV plan was calibrated for another model (fingerprint "
                        f"{want.get('fingerprint')} != {have['fingerprint']}): calibrate this one")
    caches = mlx_cache.make_prompt_cache(model)
    full = {i for i, c in enumerate(caches) if type(c) is KVCache}
    if full != set(plan.layers):
        raise PlanError(f"the KV plan covers layers {sorted(plan.layers)}, the model's "
                        f"full-attention layers are {sorted(full)}")
    for i in plan.layers:
        shape = plan.stats[i]["k_absmax"].shape
        if shape != (have["n_kv_heads"], have["head_dim"]):
            raise PlanError(f"KV plan layer {i} statistics have shape {shape}, the model's "
                            f"kv heads x head_dim are {(have['n_kv_heads'], have['head_dim'])}")


def attach(model, folder) -> Optional[KVPlan]:
    """Attach the plan baked into `folder` (if any) to the model as model.kvq_plan."""
    if plan_files(folder) is None:
        return None
    plan = load_plan(folder, model)
    model.kvq_plan = plan
    return plan


# -- measuring and choosing ---------------------------------------------------------


def uniform_splits(target: float, options) -> list:
    """(k_bits, v_bits) pairs from `options` whose average is the target."""
    return [(k, v) for k in sorted(options, reverse=True) for v in options
            if abs((k + v) / 2 - target) < 1e-9]


def allocate(sens: dict, options, target: float) -> dict:
    """Greedy: every tensor (layer, "k" | "v") starts at the fewest bits; the
    upgrade with the largest measured KLD drop per added bit is taken while
    the average stays within the target."""
    bits = {t: min(options) for t in sens}
    budget = target * len(sens) - sum(bits.values())
    while True:
        best = None
        for t, b in bits.items():
            for nb in options:
                if b < nb and nb - b <= budget + 1e-9:
                    gain = (sens[t][b] - sens[t][nb]) / (nb - b)
                    if best is None or gain > best[0]:
                        best = (gain, t, nb)
        if best is None or best[0] <= 0:
            return bits
        _, t, nb = best
        budget -= nb - bits[t]
        bits[t] = nb


def _smallest_tied(results: dict):
    """The first key (cheapest) whose KLD is within TIE of the best."""
    best = min(results.values())
    return next(k for k, v in results.items() if v <= best * (1 + TIE))


def check_options(target_bits, bits, base, transforms):
    """Validated (base spec, sorted bit widths, transforms); ValueError names
    the option that is wrong."""
    base = parse_spec(base) if base is not None else KVQuantSpec()
    bits = sorted(set(bits))
    if any(b not in VALID_BITS for b in bits):
        raise ValueError(f"bits {bits}: each must be one of {VALID_BITS}")
    if not bits[0] <= target_bits <= bits[-1]:
        raise ValueError(f"target {target_bits} bits is outside the options {bits}")
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"transforms {unknown}: use some of {', '.join(TRANSFORMS)}")
    return base, bits, [t for t in TRANSFORMS if t in transforms]


class Checkpoint:
    """What a calibration run has measured so far, in a folder of its own
    (never the model folder): statistics, then the sensitivity windows'
    keys/values and squared gradients. A run given the same folder resumes
    after the last phase saved."""

    def __init__(self, folder):
        self.folder = None if folder is None else Path(folder)

    def _path(self, name):
        return self.folder / f"{name}.safetensors"

    def load(self, name) -> Optional[Dict[str, mx.array]]:
        if self.folder is None or not self._path(name).is_file():
            return None
        try:
            return mx.load(str(self._path(name)))
        except Exception:  # a damaged checkpoint is measured again
            return None

    def save(self, name, arrays: Dict[str, mx.array]):
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{name}.tmp.safetensors"
        mx.save_safetensors(str(tmp), arrays)
        os.replace(tmp, self._path(name))

    def clear(self):
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _pack_layers(prefix, layers: Dict[int, tuple]) -> Dict[str, mx.array]:
    return {f"{prefix}.{i}.{j}": x for i, xs in layers.items() for j, x in enumerate(xs)}


def _unpack_layers(prefix, arrays) -> Dict[int, tuple]:
    out = {}
    for name in sorted(arrays):
        if name.startswith(prefix + "."):
            i, j = map(int, name[len(prefix) + 1:].split("."))
            out.setdefault(i, {})[j] = arrays[name]
    return {i: tuple(xs[j] for j in sorted(xs)) for i, xs in out.items()}


def _statistics(runner, windows, picks, skip, bar, checkpoint, keep_kv):
    """Phase 1: statistics over every window and, for the picked windows,
    their References and (keep_kv) recorded keys/values per layer."""
    saved = checkpoint.load("statistics")
    refs, kvs = [], []
    if saved is not None:
        stats = {}
        for name, a in saved.items():
            if name.startswith("stats."):
                _, i, stat = name.split(".", 2)
                stats.setdefault(int(i), {})[stat] = np.array(a)
        kvs = [_unpack_layers(f"kv{w}", saved) for w in range(len(picks))] if keep_kv else []
        for w in picks:
            refs.append(runner.reference(w))
            bar.update(1)
        return stats, refs, kvs, True
    collector = StatsCollector(skip=skip)
    for w in windows:
        collector.new_window()
        pick = any(w is p for p in picks)
        recorded = {}

        def record(i, k, v):
            collector(i, k, v)
            if pick and keep_kv:
                recorded.setdefault(i, []).append((k.astype(mx.float32), v.astype(mx.float32)))

        ref = runner.reference(w, record_kv=record, keep=pick)
        if pick:
            refs.append(ref)
            if keep_kv:
                kvs.append({i: tuple(mx.concatenate(x, axis=2) for x in zip(*parts))
                            for i, parts in recorded.items()})
        bar.update(1)
    stats = collector.stats()
    arrays = {f"stats.{i}.{n}": mx.array(a) for i, st in stats.items() for n, a in st.items()}
    for w, kv in enumerate(kvs):
        arrays.update(_pack_layers(f"kv{w}", kv))
    checkpoint.save("statistics", arrays)
    return stats, refs, kvs, False


def _fisher(model, picks, kvs, chunk, bar, checkpoint) -> Fisher:
    """Phase 2 (estimated sensitivity): squared gradients on each picked window."""
    saved = checkpoint.load("gradients") or {}
    windows = []
    for w, (tokens, kv) in enumerate(zip(picks, kvs)):
        f = _unpack_layers(f"f{w}", saved)
        if not f:
            f = squared_gradients(model, mx.array(tokens), kv)
            saved.update(_pack_layers(f"f{w}", f))
            checkpoint.save("gradients", saved)
        windows.append((kv, f))
        bar.update(1)
    return Fisher(windows, chunk)


def calibrate(model, windows, *, target_bits=3.0, bits=(2, 3, 4), base=None,
              transforms=TRANSFORMS, chunk=256, sensitivity_windows=1,
              sensitivity="fisher", verify_uniform="all", progress=True,
              checkpoint=None) -> KVPlan:
    """Measure and choose a per-layer plan for `model` on token windows.

    sensitivity: "fisher" (estimated from one gradient pass per window) or
    "measured" (a forward pass per layer and option). verify_uniform: "all"
    uniform specs of the target average are measured against the plan, or
    only the "best" one by the sensitivity. checkpoint: a folder where
    finished phases are kept, and from which a run resumes."""
    if sensitivity not in ("fisher", "measured"):
        raise ValueError(f"sensitivity {sensitivity!r}: use fisher or measured")
    base, bits, transforms = check_options(target_bits, bits, base, transforms)
    if head_dim_of(model) & (head_dim_of(model) - 1):
        transforms = [t for t in transforms if t != "rotate"]  # Hadamard needs 2^n
    checkpoint = Checkpoint(checkpoint)
    splits = uniform_splits(target_bits, bits)
    n_sens = min(sensitivity_windows, len(windows))
    picks = [windows[(2 * j + 1) * len(windows) // (2 * n_sens)] for j in range(n_sens)]
    choose = len(bits) > 1 or len(transforms) > 1
    fisher = sensitivity == "fisher"

    runner = Runner(model, chunk)
    with tqdm(total=len(windows), disable=not progress, desc="statistics") as bar:
        stats, refs, kvs, resumed = _statistics(runner, windows, picks, base.sinks, bar,
                                                checkpoint, keep_kv=fisher)
        if resumed:
            bar.set_postfix_str(f"resumed from {checkpoint.folder}")
    layers = sorted(stats)
    measured = Measured(model, runner, refs)
    n_est = (len(splits) + len({*SINK_COUNTS, base.sinks})
             + ("smooth" in transforms) * (1 + len(SMOOTH_ALPHAS))
             + choose * len(layers) * (len(bits) * 2 - 1 + len(transforms)))
    bar = tqdm(total=n_est + fisher * n_sens, disable=not progress, desc="sensitivity")
    est = _fisher(model, picks, kvs, chunk, bar, checkpoint) if fisher else measured
    m = {"windows": f"{len(refs)} x {len(windows[0])} tokens of the calibration windows, in "
                    f"{chunk}-token chunks; KLD to the full-precision model, mean per position",
         "sensitivity": est.method}

    def everywhere(spec, alpha=None):
        bar.update(1)
        return est.kld({i: (spec, None if alpha is None else
                            smoothing(stats[i]["v_absmax"], alpha)) for i in layers})

    def layer(i, spec, s=None):
        bar.update(1)
        return est.layer(i, spec, s)

    # Uniform specs of the target average, then sinks and smoothing with the best.
    u_est = {str(replace(base, k_bits=k, v_bits=v)): everywhere(replace(base, k_bits=k, v_bits=v))
             for k, v in splits}
    m["uniform_estimate"] = u_est
    uniform = parse_spec(min(u_est, key=u_est.get)) if splits else \
        replace(base, k_bits=bits[0], v_bits=bits[0])
    # Sinks are measured: they shift every quantization group, which the
    # estimate (one layer at a time, second order) does not see well.
    sinks = {}
    for n in sorted({*SINK_COUNTS, uniform.sinks}):
        sinks[n] = measured.kld({i: (replace(uniform, sinks=n), None) for i in layers})
        bar.update(1)
    m["sinks"] = {str(k): v for k, v in sinks.items()}
    base = replace(base, sinks=_smallest_tied(sinks))
    uniform = replace(uniform, sinks=base.sinks)
    m["sinks_chosen"] = base.sinks
    alpha = SMOOTH_ALPHAS[-1]
    if "smooth" in transforms:
        m["smoothing"] = {"none": everywhere(uniform)}
        m["smoothing"].update({f"alpha={a}": everywhere(uniform, a) for a in SMOOTH_ALPHAS})
        alpha = min(SMOOTH_ALPHAS, key=lambda a: m["smoothing"][f"alpha={a}"])
    m["smoothing_alpha"] = alpha

    # Each layer alone: keys at each width (values fp), values at the fewest
    # bits with each transform, then at the other widths with the best one.
    plan_layers = {i: LayerPlan(uniform.k_bits, uniform.v_bits) for i in layers}
    if choose:
        sens, per_layer = {}, []
        for i in layers:
            s = smoothing(stats[i]["v_absmax"], alpha)
            k = {b: layer(i, replace(base, k_bits=b, v_bits=None)) for b in bits}

            def v_spec(b, t):
                return replace(base, k_bits=None, v_bits=b, rotate=t == "rotate")

            first = {t: layer(i, v_spec(bits[0], t), s if t == "smooth" else None)
                     for t in transforms}
            t = _smallest_tied(first)
            v = {bits[0]: first[t]}
            v.update({b: layer(i, v_spec(b, t), s if t == "smooth" else None)
                      for b in bits[1:]})
            sens[(i, "k")], sens[(i, "v")] = k, v
            plan_layers[i] = LayerPlan(None, None, t)
            per_layer.append({"layer": i, "k": k, "v": v, "values_at_fewest_bits": first,
                              "values": t})
        chosen = allocate(sens, bits, target_bits)
        for i in layers:
            plan_layers[i].k_bits, plan_layers[i].v_bits = chosen[(i, "k")], chosen[(i, "v")]
        m["layers"] = per_layer
    bar.close()

    plan = KVPlan(base, plan_layers, stats, model_identity(model), alpha, target_bits,
                  measurements=m)
    # Measured: the uniform specs of the same average (with the chosen sinks)
    # and the plan, which is kept only if it beats the best of them.
    candidates = [replace(base, k_bits=k, v_bits=v) for k, v in splits]
    if verify_uniform == "best":
        candidates = [uniform]
    with tqdm(total=len(candidates) + choose, disable=not progress, desc="verify") as bar:
        m["uniform"] = {}
        for spec in candidates:
            m["uniform"][str(spec)] = measured.kld({i: (spec, None) for i in layers})
            bar.update(1)
        if not candidates:
            m["uniform"][str(uniform)] = measured.kld({i: (uniform, None) for i in layers})
        best = min(m["uniform"], key=m["uniform"].get)
        m["uniform_chosen"], m["uniform_kld"] = best, m["uniform"][best]
        m["plan_kld"] = m["uniform_kld"]
        m["kept"] = "uniform: nothing to choose"
        if choose:
            m["plan_kld"] = measured.kld({i: (plan.spec(i), plan.v_smooth(i)) for i in layers})
            bar.update(1)
            m["kept"] = "plan"
            if splits and m["plan_kld"] >= m["uniform_kld"]:
                best = parse_spec(best)
                plan.layers = {i: LayerPlan(best.k_bits, best.v_bits) for i in layers}
                m["kept"] = "uniform: the per-layer plan did not beat it"
    return plan


# -- the command line ---------------------------------------------------------------


LINK_BYTES = 1 << 20


def copy_model(src: Path, dst: Path, config: bool = True):
    """A copy of a model folder (config.json too unless `config` is False),
    each file replaced atomically. Files over 1 MB (weights) are hard-linked
    when the file system allows: nothing here writes into them."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.resolve().iterdir():
        f = f.resolve()  # hub snapshots hold symlinks to blobs
        if not f.is_file() or f.name in (PLAN_FILE, SCALES_FILE) or _leftover(f.name):
            continue
        if f.name == "config.json" and not config:
            continue
        target = dst / f.name
        if f.stat().st_size > LINK_BYTES:
            _replace_with(f, target)
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


def disclosure(workload: Workload, chunk: int) -> dict:
    import mlx_lm

    from .. import __version__

    return {
        "sources": workload.sources,
        "tokens": workload.tokens,
        "windows": f"{len(workload.windows)} x {workload.window} tokens, spread evenly over "
                   f"each source, fed in {chunk}-token chunks",
        "sha256": workload.sha256,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": f"mlx_kvq {__version__} calibrate",
        "software": f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
                    f"python {platform.python_version()}",
    }


def format_plan(plan: KVPlan) -> str:
    m = plan.measurements
    lines = ["==== KV calibration",
             f"plan:         {plan.label()}",
             f"calibration:  {plan.source}",
             "uniform:      " + ", ".join(f"{k} {v:.5f}" for k, v in m.get("uniform", {}).items()),
             "sinks:        " + ", ".join(f"{k}: {v:.5f}" for k, v in m["sinks"].items())
             + f" -> {m['sinks_chosen']}"]
    if "smoothing" in m:
        lines.append("smoothing:    "
                     + ", ".join(f"{k} {v:.5f}" for k, v in m["smoothing"].items()))
    lines.append(f"result:       plan KLD {m['plan_kld']:.5f} vs {m['uniform_chosen']} "
                 f"{m['uniform_kld']:.5f}: kept {m['kept']}")
    return "\n".join(lines)


def run(argv=None) -> KVPlan:
    """The command line's work; returns the plan written."""
    from ..models import (ModelNotFoundError, _local_path, cache_home, default_model_dir,
                          default_model_path, load)

    p = argparse.ArgumentParser(description="Calibrate a model's quantized KV cache on a "
                                "workload and bake the plan into its folder")
    p.add_argument("--model", default=None,
                   help="Model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=None,
                   help="Write a calibrated copy here (needed for the shared default "
                   "model and for hub models); default: into --model's folder")
    p.add_argument("--workload", nargs="+", default=None,
                   help="austen, austen:<novels> / austen:-<novels>, kjv, sample, or "
                   ".txt / .jsonl files (chat transcripts use the chat template); "
                   "default: austen, else sample")
    p.add_argument("--tokens", type=tokens, default=8192, help="Calibration token budget")
    p.add_argument("--window", type=positive_int, default=1024)
    p.add_argument("--chunk", type=positive_int, default=256)
    p.add_argument("--sensitivity-windows", type=positive_int, default=1,
                   help="Windows on which layer sensitivity is found")
    p.add_argument("--sensitivity", choices=("fisher", "measured"), default="fisher",
                   help="fisher: estimated from one gradient pass per window (default); "
                   "measured: a forward pass per layer and option (slow)")
    p.add_argument("--quick", action="store_true",
                   help=f"Statistics from at most {QUICK_TOKENS} tokens, and only the best "
                   "uniform spec measured against the plan")
    p.add_argument("--restart", action="store_true",
                   help="Measure again instead of resuming from the statistics a stopped "
                   "run saved")
    p.add_argument("--benchmark", action="store_true",
                   help="Also time one full-precision forward pass over the calibration "
                   "tokens and print calibration time as a multiple of it")
    p.add_argument("--target-bits", type=float, default=3.0,
                   help="Average K/V code bits per element (3.0: as k4v2)")
    p.add_argument("--bits", type=int_list, default=(2, 3, 4), help="Widths to choose from")
    p.add_argument("--transforms", default=",".join(TRANSFORMS),
                   help="Value preparations to try per layer: none,smooth,rotate")
    p.add_argument("--kv", default=None,
                   help="Base spec for group size, residual, sinks and key axis "
                   "(default g32-r64-s4, per-channel keys)")
    p.add_argument("--vllm", default=None, help="Also export FP8 KV scales for vLLM here")
    args = p.parse_args(argv)
    try:
        base, _, _ = check_options(args.target_bits, args.bits, args.kv,
                                   args.transforms.split(","))
    except ValueError as e:
        p.error(str(e))

    src = Path(args.model).expanduser() if args.model else default_model_path()
    local = src.is_dir()
    if args.model and not local and args.model.startswith(("/", ".", "~")):
        p.error(f"no model folder at {src}")
    out = Path(args.out).expanduser() if args.out else src
    defaults = {default_model_dir(d).resolve() for d in ("float32", "float16")}
    shared = not local or src.resolve() in defaults  # hub cache or the default model
    if shared and out.resolve() == src.resolve():
        p.error("the source is a shared model cache: pass --out DIR for a calibrated copy")
    try:  # a plan already baked here (maybe stale) must not be attached
        model, tokenizer = load(str(src) if local else args.model, attach_plan=False)
        check_model(model, base)  # the base spec must fit the model's head dims
    except (ModelNotFoundError, ValueError) as e:
        p.error(str(e))
    src = src if local else _local_path(args.model)
    sources = args.workload
    if sources is None:
        try:
            source_text("austen")
            sources = ["austen"]
        except (OSError, RuntimeError, ValueError):
            sources = ["sample"]
    n_tokens = min(args.tokens, QUICK_TOKENS) if args.quick else args.tokens
    try:
        workload = load_workload(sources, tokenizer, n_tokens, args.window)
    except (OSError, RuntimeError, ValueError) as e:
        p.error(str(e))
    forward = None
    if args.benchmark:
        start = time.perf_counter()
        runner = Runner(model, args.chunk)
        for w in tqdm(workload.windows, desc="fp forward"):
            runner.reference(w, keep=False)
        forward = time.perf_counter() - start
    key = json.dumps([model_identity(model), workload.sha256, workload.tokens, args.window,
                      args.chunk, str(base), args.sensitivity, args.sensitivity_windows])
    checkpoint = cache_home() / "calibrate" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if args.restart:
        Checkpoint(checkpoint).clear()
    start = time.perf_counter()
    try:
        plan = calibrate(model, workload.windows, target_bits=args.target_bits, bits=args.bits,
                         base=args.kv, transforms=args.transforms.split(","), chunk=args.chunk,
                         sensitivity_windows=args.sensitivity_windows,
                         sensitivity=args.sensitivity,
                         verify_uniform="best" if args.quick else "all", checkpoint=checkpoint)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out} is as it was; finished phases are kept in {checkpoint} "
              "and the same command resumes from them", file=sys.stderr)
        raise SystemExit(130)
    plan.disclosure = disclosure(workload, args.chunk)
    print(f"wrote {bake(plan, src, out)}")
    elapsed = time.perf_counter() - start
    Checkpoint(checkpoint).clear()
    print(format_plan(plan))
    line = f"time:         {elapsed:.1f} s for {workload.tokens} tokens"
    if forward is not None:
        line += (f" = {elapsed / forward:.2f}x one full-precision forward pass over them "
                 f"({forward:.1f} s, this run)")
    print(line)
    if args.vllm:
        from .vllm_export import export

        print(f"wrote {export(out, Path(args.vllm))}")
    return plan


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
