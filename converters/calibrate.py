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
  * a greedy allocation per layer under the target average (choose.py):
    key width and outlier channels (k_outliers, in a key channel order
    ranked by range and gradient sensitivity), value width and value group,
    then measured: kept only if it beats the best uniform spec of the
    largest average within the target.

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
import shutil
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_kvq.commands.cli_types import add_model, count_list, int_list, positive_int, tokens
from mlx_kvq.commands.corpus import source_text
from ..integration import check_model, head_dim_of
from ..kvplan import TRANSFORMS, KVPlan, LayerPlan, bake, model_identity, smoothing
from ..spec import VALID_BITS, KVQuantSpec, parse_spec
from .choose import (OUTLIER_COUNTS, V_GROUPS, allocate, check_choices, key_cost,  # noqa: F401
                     key_options, key_order, smallest_tied as _smallest_tied, stat_range,
                     uniform_splits, value_cost, value_groups)
from .passes import Runner, StatsCollector, Workload, load_workload
from .sensitivity import Fisher, Measured, squared_gradients, windows_of

SINK_COUNTS = (0, 4, 16)
SMOOTH_ALPHAS = (0.5, 1.0)
QUICK_TOKENS = 2048  # --quick: statistics from at most this many tokens


# -- measuring and choosing ---------------------------------------------------------


def default_bits(target_bits) -> tuple:
    """The widths a plan chooses among when none are given: every width from
    2 up to the first above the target (2, 3, 4 for targets below 4 bits; 2 to
    5 for 4.0), so that a plan can spend more than the target where it pays."""
    hi = min([b for b in VALID_BITS if b > max(target_bits, 3)] or VALID_BITS[-1:])
    return tuple(b for b in VALID_BITS if b <= hi)


def check_options(target_bits, bits, base, transforms):
    """Validated (base spec, sorted bit widths, transforms); ValueError names
    the option that is wrong. bits None: default_bits(target_bits)."""
    base = parse_spec(base) if base is not None else KVQuantSpec()
    bits = sorted(set(default_bits(target_bits) if bits is None else bits))
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


def _fisher(model, picks, kvs, base, chunk, bar, checkpoint) -> Fisher:
    """Phase 2 (estimated sensitivity): squared gradients on each picked
    window, of the queries that read each token quantized under `base`."""
    saved = checkpoint.load("gradients") or {}
    windows = []
    for w, (window, kv) in enumerate(zip(picks, kvs)):
        f = _unpack_layers(f"f{w}", saved)
        if not f:
            f = squared_gradients(model, mx.array(window), kv, base, chunk)
            saved.update(_pack_layers(f"f{w}", f))
            checkpoint.save("gradients", saved)
        windows.append((kv, f))
        bar.update(1)
    return Fisher(windows, chunk, windows_of(model))


def calibrate(model, windows, *, target_bits=3.0, bits=None, base=None,
              transforms=TRANSFORMS, chunk=32, sensitivity_windows=1,
              sensitivity="fisher", verify_uniform="all", progress=True,
              checkpoint=None, outliers=OUTLIER_COUNTS, v_groups=V_GROUPS) -> KVPlan:
    """Measure and choose a per-layer plan for `model` on token windows.

    bits: the widths to choose among per layer (None: default_bits(target_bits)).
    sensitivity: "fisher" (estimated from one gradient pass per window) or
    "measured" (a forward pass per layer and option). verify_uniform: "all"
    uniform specs of the target average are measured against the plan, or
    only the "best" one by the sensitivity. checkpoint: a folder where
    finished phases are kept, and from which a run resumes. outliers: key
    channel counts per kv head at one more bit to choose among per layer;
    v_groups: value group sizes to choose among ((0,) and (base group,):
    neither option)."""
    if sensitivity not in ("fisher", "measured"):
        raise ValueError(f"sensitivity {sensitivity!r}: use fisher or measured")
    base, bits, transforms = check_options(target_bits, bits, base, transforms)
    check_choices(outliers, v_groups)
    if head_dim_of(model) & (head_dim_of(model) - 1):
        transforms = [t for t in transforms if t != "rotate"]  # Hadamard needs 2^n
    checkpoint = Checkpoint(checkpoint)
    splits = uniform_splits(target_bits, bits)
    n_sens = min(sensitivity_windows, len(windows))
    picks = [windows[(2 * j + 1) * len(windows) // (2 * n_sens)] for j in range(n_sens)]
    D = head_dim_of(model)
    k_opts = key_options(base, bits, outliers, D)
    v_grps = value_groups(base, v_groups, D)
    choose = len(k_opts) > 1 or len(v_grps) > 1 or len(transforms) > 1
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
             + choose * len(layers) * (len(k_opts) + len(bits) * len(v_grps) - 1
                                       + len(transforms)))
    bar = tqdm(total=n_est + fisher * n_sens, disable=not progress, desc="sensitivity")
    est = _fisher(model, picks, kvs, base, chunk, bar, checkpoint) if fisher else measured
    m = {"windows": f"{len(refs)} x {len(windows[0])} tokens of the calibration windows, in "
                    f"{chunk}-token chunks; KLD to the full-precision model, mean per position",
         "sensitivity": est.method}

    def everywhere(spec, alpha=None):
        bar.update(1)
        return est.kld({i: (spec, None if alpha is None else
                            smoothing(stats[i]["v_absmax"], alpha)) for i in layers})

    def layer(i, spec, s=None, order=None):
        bar.update(1)
        return est.layer(i, spec, s, order)

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
    # Key options are read in the key channel order the plan bakes: per kv
    # head, channels by range and (estimated) sensitivity.
    plan_layers = {i: LayerPlan(uniform.k_bits, uniform.v_bits) for i in layers}
    orders = {i: key_order(stat_range(stats[i]), est.channel_weight(i)) for i in layers} \
        if any(o.k_outliers for o in k_opts) else {}
    if choose:
        sens, per_layer, specs = {}, [], {}
        for i in layers:
            s = smoothing(stats[i]["v_absmax"], alpha)
            specs.update({(i, "k", str(o)): o for o in k_opts})
            k = est.key_options(i, k_opts, orders.get(i))
            bar.update(len(k_opts))

            def v_spec(b, t, g=base.v_group):
                return replace(base, k_bits=None, v_bits=b, rotate=t == "rotate", v_group=g)

            first = {t: layer(i, v_spec(bits[0], t), s if t == "smooth" else None)
                     for t in transforms}
            t = _smallest_tied(first)
            v = {}
            for b in bits:
                for g in v_grps:
                    o = v_spec(b, t, g)
                    specs[(i, "v", str(o))] = o
                    v[str(o)] = first[t] if (b, g) == (bits[0], base.v_group) else \
                        layer(i, o, s if t == "smooth" else None)
            sens[(i, "k")], sens[(i, "v")] = k, v
            plan_layers[i] = LayerPlan(None, None, t)
            per_layer.append({"layer": i, "k": k, "v": v, "values_at_fewest_bits": first,
                              "values": t})

        def cost(t, o):
            spec = specs[(*t, o)]
            return key_cost(base, spec, D) if t[1] == "k" else value_cost(base, spec)

        chosen = allocate(sens, None, target_bits, cost)
        for i in layers:
            ks, vs = specs[(i, "k", chosen[(i, "k")])], specs[(i, "v", chosen[(i, "v")])]
            plan_layers[i] = replace(plan_layers[i], k_bits=ks.k_bits, v_bits=vs.v_bits,
                                     k_outliers=ks.k_outliers, v_group=vs.v_group)
        m["layers"] = per_layer
    bar.close()

    plan = KVPlan(base, plan_layers, stats, model_identity(model), alpha, target_bits,
                  measurements=m, k_order=orders)
    # Measured: the uniform specs of the largest average within the target
    # (with the chosen sinks)
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
            m["plan_kld"] = measured.kld({i: plan.layer_config(i) for i in layers})
            bar.update(1)
            m["kept"] = "plan"
            if splits and m["plan_kld"] >= m["uniform_kld"]:
                best = parse_spec(best)
                plan.layers = {i: LayerPlan(best.k_bits, best.v_bits) for i in layers}
                plan.k_order = {}
                m["kept"] = "uniform: the per-layer plan did not beat it"
    return plan


# -- the command line ---------------------------------------------------------------


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


def format_calibration(plan: KVPlan) -> str:
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
    from ..models import (ModelNotFoundError, local_path, cache_home, default_model_dir,
                          default_model_path, load)

    p = argparse.ArgumentParser(description="Calibrate a model's quantized KV cache on a "
                                "workload and bake the plan into its folder")
    add_model(p)
    p.add_argument("--out", default=None,
                   help="Write a calibrated copy here (needed for the shared default "
                   "model and for hub models); default: into --model's folder")
    p.add_argument("--workload", nargs="+", default=None,
                   help="austen, austen:<novels> / austen:-<novels>, kjv, sample, or "
                   ".txt / .jsonl files (chat transcripts use the chat template); "
                   "default: austen, else sample")
    p.add_argument("--tokens", type=tokens, default=8192, help="Calibration token budget")
    p.add_argument("--window", type=positive_int, default=1024)
    p.add_argument("--chunk", type=positive_int, default=32,
                   help="Tokens per forward pass when measuring (default 32: a position "
                   "reads at most 31 more 16-bit tokens than a decode step, as in "
                   "mlx_kvq.eval; larger chunks measure what prefill reads)")
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
    p.add_argument("--bits", type=int_list, default=None,
                   help="Widths to choose from (default: 2 up to the first width above the "
                   "target: 2,3,4 below 4 bits, 2,3,4,5 for 4.0)")
    p.add_argument("--outliers", type=count_list, default=OUTLIER_COUNTS,
                   help="Outlier key channels per kv head (at one more bit) to choose "
                   "among per layer; 0 alone: none")
    p.add_argument("--v-groups", type=int_list, default=V_GROUPS,
                   help="Value group sizes to choose among per layer (the base's group "
                   "alone: none)")
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
        check_choices(args.outliers, args.v_groups)
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
    src = src if local else local_path(args.model)
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
                         verify_uniform="best" if args.quick else "all", checkpoint=checkpoint,
                         outliers=args.outliers, v_groups=args.v_groups)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out} is as it was; finished phases are kept in {checkpoint} "
              "and the same command resumes from them", file=sys.stderr)
        raise SystemExit(130)
    plan.disclosure = disclosure(workload, args.chunk)
    print(f"wrote {bake(plan, src, out)}")
    elapsed = time.perf_counter() - start
    Checkpoint(checkpoint).clear()
    print(format_calibration(plan))
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
    """`mlx_kvq.calibrate` (a console script: returns nothing)."""
    run(argv)


if __name__ == "__main__":
    main()
