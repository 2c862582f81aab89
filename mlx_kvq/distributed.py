"""mlx_kvq on MLX's distributed engine: a model sharded by mlx-lm over the
ranks `mlx.launch` starts, each rank caching its share in KVQCaches.

mlx-lm shards a model two ways (mlx_lm.utils.sharded_load, used here as it
is): tensor parallelism (`model.shard(group)`) splits every layer's heads,
so each rank computes, and caches, kv_heads / N heads of every layer;
pipeline parallelism (`model.model.pipeline(group)`) gives each rank a run
of whole layers, and each rank caches only those. A KVQCache sizes itself
from the keys it is given, so `integration.make_prompt_cache` on a sharded
model already builds each rank's share; a calibrated plan (kvplan.py) is
sliced to the rank's heads or layers (`shard_plan`) so that every head keeps
its own statistics and smoothing factors.

Ranks talk through collectives (all_sum, all_gather, send/recv). When a
peer process dies, MLX's ring backend fails the pending operation with a
RuntimeError ("connection to a peer was lost"); when a peer stops answering
without closing its sockets (a frozen process, a cut link) the operation
waits forever. `Guard` turns the first into a clear exit and bounds the
second with a watchdog: no progress for `timeout` seconds ends the rank.
"""

import json
import os
import pickle
import random
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .kvplan import KVPlan, KVPlanError, load_plan, plan_files
from .models import default_model_path, local_path, not_found, resolve
from .shapes import ModelShape, PlanError, model_shape

SHARDINGS = ("tensor", "pipeline")
EXIT_LOST = 3  # a rank lost a peer


class ShardingError(ValueError):
    """The model cannot be sharded this way over this many ranks."""


def _capabilities(source: str) -> set:
    """The ways an mlx-lm model module's source lets mlx-lm shard it."""
    out = set()
    if re.search(r"^\s+def shard\(", source, re.M):
        out.add("tensor")
    if re.search(r"^class \w+\([^)]*PipelineMixin", source, re.M):
        out.add("pipeline")
    return out


def shardable_architectures() -> dict:
    """{sharding: [mlx-lm model modules that support it]} of the installed mlx-lm."""
    import mlx_lm.models as pkg

    out = {s: [] for s in SHARDINGS}
    for f in sorted(Path(pkg.__path__[0]).glob("*.py")):
        for s in _capabilities(f.read_text(encoding="utf-8")):
            out[s].append(f.stem)
    return out


def check_shardable(shape: ModelShape, sharding: str, ranks: int, module_file=None):
    """Raise ShardingError unless mlx-lm can shard this model `sharding`-wise
    over `ranks` ranks (heads that divide among the ranks for tensor, at
    least a layer per rank for pipeline). `module_file`: the model's mlx-lm
    module, whose source says which shardings it has (None: both)."""
    if sharding not in SHARDINGS:
        raise ShardingError(f"sharding {sharding!r}: use one of {', '.join(SHARDINGS)}")
    has = set(SHARDINGS) if module_file is None else \
        _capabilities(Path(module_file).read_text(encoding="utf-8"))
    other = next((s for s in SHARDINGS if s != sharding and s in has), None)
    if sharding not in has:
        names = shardable_architectures()[sharding]
        raise ShardingError(
            f"mlx-lm cannot shard architecture {Path(module_file).stem!r} with "
            f"--sharding {sharding}" + (f" (it supports --sharding {other})" if other else "")
            + f"; mlx-lm {sharding}-shards: {', '.join(names)}")
    if sharding == "tensor":
        for what, n in (("attention heads", shape.n_heads), ("kv heads", shape.n_kv_heads)):
            if n % ranks:
                alt = " or --sharding pipeline" if other and shape.n_layers >= ranks else ""
                raise ShardingError(
                    f"{shape.name}: its {n} {what} do not divide among {ranks} ranks for "
                    f"--sharding tensor; use a number of ranks that divides {n}{alt}")
    elif shape.n_layers < ranks:
        raise ShardingError(f"{shape.name}: {shape.n_layers} layers cannot give each of "
                            f"{ranks} ranks a layer for --sharding pipeline")


@dataclass(frozen=True)
class Shard:
    """What one rank runs and caches: model layers [layers) and, of each, kv heads [kv_heads)."""

    sharding: str
    rank: int
    size: int
    layers: range
    kv_heads: range
    group: object = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def describe(self) -> str:
        what = (f"kv heads {self.kv_heads.start}-{self.kv_heads.stop - 1} of every layer"
                if self.sharding == "tensor" else
                f"layers {self.layers.start}-{self.layers.stop - 1}")
        return f"rank {self.rank} of {self.size} ({self.sharding}): {what}"


def shard_of(sharding: str, rank: int, size: int, n_layers: int, n_kv_heads: int,
             start: Optional[int] = None, end: Optional[int] = None, group=None) -> Shard:
    """The Shard of `rank`: its kv heads (tensor: an even contiguous share,
    as mlx's shard_linear splits k_proj's rows) or its layers (pipeline:
    [start, end) as mlx-lm's pipeline gave them)."""
    if sharding == "tensor":
        per = n_kv_heads // size
        return Shard(sharding, rank, size, range(n_layers),
                     range(rank * per, (rank + 1) * per), group)
    return Shard(sharding, rank, size, range(start, end), range(n_kv_heads), group)


def shard_plan(plan: KVPlan, shard: Shard) -> KVPlan:
    """The part of a calibrated plan one rank applies: its layers (renumbered
    as the rank's model lists them) and, of each, its kv heads' statistics
    (so its smoothing factors and drift limits are those heads' own)."""
    heads = slice(shard.kv_heads.start, shard.kv_heads.stop)
    first = shard.layers.start
    layers = {i - first: p for i, p in plan.layers.items() if i in shard.layers}
    stats = {i - first: {n: a[heads] for n, a in plan.stats[i].items()}
             for i in plan.layers if i in shard.layers}
    model = dict(plan.model, n_layers=shard.n_layers, n_kv_heads=len(shard.kv_heads),
                 shard=shard.describe())
    return replace(plan, layers=layers, stats=stats, model=model)


def check_plan(plan: KVPlan, shape: ModelShape):
    """A rank holds part of the weights, so the plan's weight fingerprint
    cannot be checked; its structure is (layers, kv heads, head_dim)."""
    for key, have, what in (("n_layers", shape.n_layers, "layers"),
                            ("n_kv_heads", shape.n_kv_heads, "kv heads"),
                            ("head_dim", shape.head_dim, "head_dim")):
        if plan.model.get(key) != have:
            raise KVPlanError(f"the KV plan was calibrated for a model with "
                              f"{plan.model.get(key)} {what}, this one has {have}")


def init(backend: str = "any"):
    """The group of all ranks (a group of one when not launched by mlx.launch)."""
    return mx.distributed.init(backend=backend)


def load(path_or_hf_repo=None, sharding: str = "tensor", group=None, tokenizer_config=None):
    """(model, tokenizer, shard): the model sharded over `group` by
    mlx_lm.utils.sharded_load, with a baked KV plan sliced to this rank
    attached as model.kvq_plan. Refuses (ShardingError) what mlx-lm cannot
    shard, before any weight is read."""
    from mlx_lm.utils import _get_classes, sharded_load

    group = group or init()
    if group.size() == 1:
        print(f"warning: --sharding {sharding} over 1 rank (not started by mlx.launch): "
              "this process holds the whole model", file=sys.stderr)
    if path_or_hf_repo is None:
        path_or_hf_repo = default_model_path()
    path_or_hf_repo = resolve(path_or_hf_repo)
    folder = local_path(path_or_hf_repo)
    if folder is None:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(path_or_hf_repo), allow_patterns=["*.json"]))
        except Exception as e:
            raise not_found(path_or_hf_repo, e) from e
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        shape = model_shape(config, folder, name=str(path_or_hf_repo))
        module = sys.modules[_get_classes(config)[0].__module__]
    except (PlanError, ValueError) as e:
        raise ShardingError(str(e)) from None
    check_shardable(shape, sharding, group.size(), module.__file__)
    plan = load_plan(folder) if plan_files(folder) is not None else None
    if plan is not None:
        check_plan(plan, shape)
    if sharding == "pipeline" and not (folder / "model.safetensors.index.json").is_file():
        raise ShardingError(f"{folder} has no model.safetensors.index.json, which mlx-lm's "
                            "pipeline loading reads; save the model with mlx_lm.convert")
    tensor, pipe = (group, None) if sharding == "tensor" else (None, group)
    try:
        model, tokenizer = sharded_load(str(path_or_hf_repo), pipeline_group=pipe,
                                        tensor_group=tensor, tokenizer_config=tokenizer_config)
    except ValueError as e:  # mlx's shard_linear: a dimension that does not divide
        raise ShardingError(f"mlx-lm could not shard {shape.name} over {group.size()} ranks "
                            f"with --sharding {sharding}: {e}") from e
    inner = getattr(model, "model", None)
    shard = shard_of(sharding, group.rank(), group.size(), shape.n_layers, shape.n_kv_heads,
                     getattr(inner, "start_idx", 0), getattr(inner, "end_idx", None), group)
    if plan is not None:
        model.kvq_plan = shard_plan(plan, shard)
    return model, tokenizer, shard


def free_ports(n: int) -> int:
    """A loopback port p with p..p+n-1 free (the ring backend listens on them)."""
    for _ in range(100):
        p = random.randint(20000, 60000)
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
    raise RuntimeError("no free loopback ports for the ring backend")


def local_ranks(n: int, folder) -> list:
    """Environment variables that make n processes on this machine the ranks
    of a ring, as `mlx.launch --backend ring` sets them (a hostfile of
    loopback ports written to `folder`, MLX_RANK), for starting ranks
    without mlx.launch's supervision."""
    port = free_ports(n)
    hostfile = Path(folder) / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    return [{"MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)} for r in range(n)]


# -- collectives ------------------------------------------------------------------


def gather(values, group) -> np.ndarray:
    """[size, len(values)] of every rank's `values` (integers), rank order.
    Collectives run on mlx-lm's generation stream: one stream keeps every
    rank's collectives in the same order (a pending generation step on
    another stream would interleave with this one on the same links)."""
    from mlx_lm.generate import generation_stream

    a = mx.array([list(values)], dtype=mx.int64)
    if group is None or group.size() == 1:
        return np.array(a)
    return np.array(mx.distributed.all_gather(a, group=group, stream=generation_stream))


SHARE_HEAD = 512  # bytes summed in one all_sum: a short object's size and pickle


def share(obj, group):
    """Rank 0's `obj` (any picklable value; the others pass None) on every
    rank, as mlx_lm.server shares its requests: summed over the ranks (the
    others add zeros), the pickle's size with the pickle itself when it is
    short (one all_sum), else its bytes in a second one."""
    from mlx_lm.generate import generation_stream

    if group is None or group.size() == 1:
        return obj
    lead = group.rank() == 0
    head = np.zeros(SHARE_HEAD, dtype=np.uint8)
    if lead:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        head[:8] = np.frombuffer(np.int64(len(data)).tobytes(), dtype=np.uint8)
        if len(data) <= SHARE_HEAD - 8:
            head[8:8 + len(data)] = data
    summed = np.array(mx.distributed.all_sum(mx.array(head), group=group,
                                             stream=generation_stream))
    n = int(summed[:8].view(np.int64)[0])
    if n <= SHARE_HEAD - 8:
        data = summed[8:8 + n]
    else:
        buf = mx.array(data) if lead else mx.zeros((n,), dtype=mx.uint8)
        data = np.array(mx.distributed.all_sum(buf, group=group, stream=generation_stream))
    return obj if lead else pickle.loads(data.tobytes())


def shared_seed(group, seed: Optional[int] = None) -> int:
    """A seed every rank agrees on (rank 0's), so sampling picks the same tokens."""
    mine = seed if seed is not None else int(np.random.SeedSequence().entropy % (1 << 31))
    return int(gather([mine], group)[0, 0])


def rank_rows(shard: Shard, nbytes: int, fp16_nbytes: int) -> list:
    """Every rank's share, cache bytes (and their 16-bit size) and peak
    memory, as dicts in rank order (a collective: all ranks call it)."""
    mine = [nbytes, fp16_nbytes, mx.get_peak_memory(), shard.layers.start, shard.layers.stop,
            shard.kv_heads.start, shard.kv_heads.stop]
    rows = []
    for r, (nb, fp, peak, l0, l1, h0, h1) in enumerate(gather(mine, shard.group)):
        what = Shard(shard.sharding, r, shard.size, range(l0, l1), range(h0, h1))
        rows.append(dict(rank=r, what=what.describe().split(": ", 1)[1], nbytes=int(nb),
                         fp16_nbytes=int(fp), peak=int(peak)))
    return rows


def peers(rank: int, size: int) -> str:
    """The ranks a ring member talks to directly, named for messages."""
    if size == 2:
        return f"rank {1 - rank}"
    left, right = (rank - 1) % size, (rank + 1) % size
    return f"rank {left} or rank {right} (its ring neighbours; a loss further along the " \
           "ring reaches it through them)"


def is_peer_loss(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and (
        text.startswith("[ring]") or "peer" in text or "connection" in text)


class Guard:
    """Around a rank's collective work: a lost peer (the backend's error)
    exits with a message naming it; no progress (`beat`) for `timeout`
    seconds exits too, from a watchdog thread, since a silent peer blocks
    the collective forever."""

    def __init__(self, shard: Shard, timeout: float = 120.0, stream=sys.stderr, on_lost=None):
        """`on_lost(why)`: called before the watchdog ends the process."""
        self.shard, self.timeout, self.stream, self.on_lost = shard, timeout, stream, on_lost
        self.last = time.monotonic()
        self._done = threading.Event()
        self._thread = None

    def beat(self, *_):
        self.last = time.monotonic()

    def _message(self, what: str) -> str:
        s = self.shard
        return f"error: rank {s.rank} of {s.size}: {what} {peers(s.rank, s.size)}"

    def _watch(self):
        while not self._done.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                why = f"no progress for {idle:.0f} s (limit {self.timeout:g} s)"
                if self.on_lost is not None:
                    self.on_lost(f"{why} from {peers(self.shard.rank, self.shard.size)}")
                print(self._message(f"{why}: stopped waiting on"), file=self.stream,
                      flush=True)
                os._exit(EXIT_LOST)

    def __enter__(self):
        self.beat()
        if self.shard.size > 1 and self.timeout:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="mlx_kvq-watchdog")
            self._thread.start()
        return self

    def __exit__(self, kind, error, tb):
        self._done.set()
        if error is not None and self.shard.size > 1 and is_peer_loss(error):
            print(self._message(f"lost the connection ({error}) to"), file=self.stream,
                  flush=True)
            raise SystemExit(EXIT_LOST) from None
        return False
