"""Capacity planner: how much context, and how many chats, fit in memory with
each KV precision: `mlx_kvq.plan`. The arithmetic is in sizing.py (memory
model) and shapes.py (what a model is made of); this module builds the
table, recommends a precision and runs the command line.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .cli_types import (add_model, add_prefill_step_size, int_list, output_file, positive_int,
                        token_list, tokens)
from mlx_kvq.distributed import SHARDINGS, check_shardable
from mlx_kvq.shapes import DTYPE_BYTES, LayerSpecs, ModelShape, PlanError, baked_plan, load_shape
from mlx_kvq.sizing import (PREFILL_STEP, _layers, _parse, applicable, bits_per_element, capacity,
                            kv_bytes, kv_bytes_per_token, memory_needed, rank_shape, rank_spec,
                            total_memory, with_sliding, workspace_parts)
from mlx_kvq.spec import KVQuantSpec, parse_spec, short_label
from mlx_kvq.units import fmt_bytes, fmt_tokens, parse_memory

PRECISIONS = ("fp16", "k8v8", "k8v4", "k4v4", "k4v2", "k2v2")
CONCURRENCY = (1, 2, 4, 8)
CONTEXTS = (4096, 8192, 32768, 131072)


# -- the plan -------------------------------------------------------------------


@dataclass
class Row:
    spec: KVQuantSpec
    bits: float  # per element, long-context limit
    per_token: dict  # context -> bytes per token
    max_context: dict  # concurrency -> tokens
    max_chats: dict  # context -> sequences
    quality: Optional[dict] = None  # mlx_kvq.eval's result for this spec
    single: Optional[dict] = None  # sharded plans: {"max_context", "max_chats"} on one machine


@dataclass
class Plan:
    shape: ModelShape
    memory: int
    prefill_step: int
    rows: list = field(default_factory=list)
    contexts: tuple = CONTEXTS
    concurrency: tuple = CONCURRENCY
    quality_source: Optional[str] = None  # where the quality columns come from
    sharding: Optional[str] = None  # over several ranks: tensor or pipeline
    parts: tuple = ()  # each rank's share (sizing.rank_shape), sharded plans only


def load_quality(paths) -> tuple:
    """({spec label: result}, source line) from `mlx_kvq.eval --json` files;
    mlx-lm baselines and calibrated plans are not specs and are left out."""
    results, sources = {}, []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            d, res = data["disclosure"], data["results"]
            items = [(r["scheme"], r) for r in res.values()]
            source = (f"{path}: KLD vs the full-precision cache on {d['model']}, "
                      f"{d['corpus']}, {d['windows']}; calibration {d['calibration']}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise PlanError(f"{path} is not a JSON file written by mlx_kvq.eval --json "
                            f"({type(e).__name__}: {e})") from None
        for name, r in items:
            if name == "calibrated":  # the baked plan, as the planner's row names it
                results[name] = r
                continue
            try:
                results[str(parse_spec(name))] = r
            except ValueError:
                continue  # mlx<bits> baselines, 'calibrated'
        sources.append(source)
    return results, "\n".join(sources)


def _fits(shape: ModelShape, spec, memory: int, prefill_step: int, contexts,
          concurrency) -> dict:
    """Longest context per number of chats, most chats per context."""
    return {"max_context": {n: capacity(shape, spec, memory, concurrency=n,
                                        prefill_step=prefill_step) for n in concurrency},
            "max_chats": {c: capacity(shape, spec, memory, context=c,
                                      prefill_step=prefill_step) for c in contexts}}


def make_plan(shape: ModelShape, specs, memory: int, prefill_step: int = PREFILL_STEP,
              contexts=CONTEXTS, concurrency=CONCURRENCY, ranks: int = 1,
              sharding: Optional[str] = None) -> Plan:
    """The table; with ranks > 1, `memory` is each rank's, the figures are
    those of the rank that runs out first, and each row also holds what one
    machine of that memory fits (nothing if the weights do not fit)."""
    parts = ()
    if ranks > 1:
        parts = tuple(rank_shape(shape, sharding, ranks, r) for r in range(ranks))
        heavy = max(parts, key=lambda p: p.weight_bytes)
        if memory <= heavy.weight_bytes:
            raise PlanError(
                f"memory per rank {fmt_bytes(memory)} does not exceed the weights of "
                f"{heavy.name} ({fmt_bytes(heavy.weight_bytes)}); use more ranks")
    elif memory <= shape.weight_bytes:
        raise PlanError(
            f"memory budget {fmt_bytes(memory)} does not exceed the weights "
            f"({fmt_bytes(shape.weight_bytes)}, {shape.weight_source})"
        )
    plan = Plan(shape, memory, prefill_step, contexts=tuple(contexts),
                concurrency=tuple(concurrency), sharding=sharding if parts else None,
                parts=parts)
    distinct = list({(p.n_layers, p.full_layers, p.weight_bytes): p for p in parts}.values())
    for spec in specs:
        spec = _parse(spec)
        _layers(shape, spec)  # refuses a spec the model's head dims cannot take
        if parts:
            each = [_fits(p, rank_spec(spec, shape, p), memory, prefill_step, contexts,
                          concurrency) for p in distinct]
            fit = {k: {x: min(e[k][x] for e in each) for x in each[0][k]} for k in each[0]}
            single = _fits(shape, spec, memory, prefill_step, contexts, concurrency) \
                if memory > shape.weight_bytes else \
                {"max_context": dict.fromkeys(concurrency, 0),
                 "max_chats": dict.fromkeys(contexts, 0)}
        else:
            fit, single = _fits(shape, spec, memory, prefill_step, contexts, concurrency), None
        plan.rows.append(Row(
            spec=spec,
            bits=bits_per_element(spec, shape.head_dim),
            per_token={c: kv_bytes_per_token(shape, spec, c) for c in contexts},
            single=single, **fit,
        ))
    plan.rows.sort(key=lambda r: -r.bits)
    return plan


def format_plan(plan: Plan) -> str:
    s = plan.shape
    layers = f"{s.full_layers} full attention"
    if s.windows:
        layers += f", {len(s.windows)} sliding window ({max(s.windows)} tokens, {s.dtype})"
    if s.stateless_layers:
        layers += f", {s.stateless_layers} without KV cache (not counted)"
    part = plan.parts[0] if plan.parts else s  # the workspace is each rank's own
    ws_long = workspace_parts(part, rank_spec(plan.rows[0].spec, s, part), max(plan.contexts),
                              plan.prefill_step)
    n = len(plan.parts)
    memory = f"{fmt_bytes(plan.memory)} budget" if not n else (
        f"{fmt_bytes(plan.memory)} per rank x {n} ranks, --sharding {plan.sharding}; "
        "cells: the cluster / one machine of that memory ('-': nothing fits)")
    lines = [
        f"==== mlx_kvq.plan: {s.name}",
        f"model:      {s.model_type}, {s.n_layers} layers ({layers}); "
        f"{s.n_heads} q / {s.n_kv_heads} kv heads x {s.head_dim}; "
        f"trained context {s.trained_context or 'unknown'}",
        f"memory:     {memory}",
        f"weights:    {fmt_bytes(s.weight_bytes)} ({s.weight_source}; activations in {s.dtype})",
        f"workspace:  one {plan.prefill_step}-token prefill chunk at a time"
        + (" (rank 0)" if plan.parts else "") + "; with "
        f"{short_label(plan.rows[0].spec)} at {fmt_tokens(max(plan.contexts))} context: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in ws_long.items() if v),
        "KV bytes:   exact KVQCache allocation: fp16 sinks + residual, quantized body "
        "in 256-token steps; per token = that / context",
    ]
    if s.windows:
        lines.append("sliding:    window layers take each row's spec with keys at 8 bits or "
                     "more, without sinks (--kv SPEC/same, SPEC/keep, SPEC/SPEC to choose)")
    long, spec0 = max(plan.contexts), plan.rows[0].spec
    for r, part in enumerate(plan.parts):
        what = (f"kv heads {part.n_kv_heads} of {s.n_kv_heads} in each of {s.n_layers} layers"
                if plan.sharding == "tensor" else
                f"{part.n_layers} of {s.n_layers} layers")
        lines.append(f"rank {r}:     {what}; weights {fmt_bytes(part.weight_bytes)}; KV of one "
                     f"{fmt_tokens(long)} chat with {short_label(spec0)} "
                     f"{fmt_bytes(kv_bytes(part, rank_spec(spec0, s, part), long))} (one machine "
                     f"{fmt_bytes(kv_bytes(s, spec0, long))})")
    if plan.quality_source:
        lines += [f"quality:    {line}" for line in plan.quality_source.splitlines()]
        if any(s.name not in line for line in plan.quality_source.splitlines()):
            lines.append("            (measured on another model than the one planned)")
    lines.append("")
    quality = plan.quality_source is not None
    ctx_head = "".join(f"{'@' + fmt_tokens(c):>9}" for c in plan.contexts)
    w = max(10, 1 + max(len(short_label(r.spec)) for r in plan.rows))
    q_head = f"{'KLD':>8}{'top-1':>7}" if quality else ""
    cw = 14 if plan.parts else 8  # cells "cluster/one machine" when sharded

    def cell(row, key, x, fmt):
        if row.single is None:
            return f"{fmt(row.__dict__[key][x]):>{cw}}"
        one = row.single[key][x]
        return f"{fmt(row.__dict__[key][x]) + '/' + (fmt(one) if one else '-'):>{cw}}"

    head = (f"{'precision':<{w}}{'bits/el':>8}{q_head} | "
            f"{'KiB per token' + (' (all ranks)' if plan.parts else ''):^{9 * len(plan.contexts)}}"
            f" | {'max context, N chats':^{cw * len(plan.concurrency)}}"
            f" | {'max chats at context':^{cw * len(plan.contexts)}}")
    sub = (f"{'':<{w}}{'':>8}{' ' * len(q_head)} | {ctx_head}"
           f" | {''.join(f'{n:>{cw - 2}} ch' for n in plan.concurrency)}"
           f" | {''.join(f'{fmt_tokens(c):>{cw}}' for c in plan.contexts)}")
    lines += [head, sub, "-" * len(sub)]
    for r in plan.rows:
        lines.append(
            f"{short_label(r.spec):<{w}}{r.bits:>8.2f}{_quality_cells(r) if quality else ''} | "
            + "".join(f"{r.per_token[c] / 1024:>9.1f}" for c in plan.contexts) + " | "
            + "".join(cell(r, "max_context", n, fmt_tokens) for n in plan.concurrency) + " | "
            + "".join(cell(r, "max_chats", c, str) for c in plan.contexts)
        )
    lines += [f"{short_label(r.spec)}: {r.spec.describe()}" for r in plan.rows
              if isinstance(r.spec, LayerSpecs)]
    if s.trained_context and any(n > s.trained_context for r in plan.rows
                                 for n in r.max_context.values()):
        lines.append(f"(contexts beyond the trained {fmt_tokens(s.trained_context)} "
                     "fit in memory but the model was not trained for them)")
    return "\n".join(lines)


def _quality_cells(row: Row) -> str:
    if not row.spec.quantized:
        return f"{'ref':>8}{'ref':>7}"
    if row.quality is None:
        return f"{'-':>8}{'-':>7}"
    return f"{row.quality['kld_mean']:>8.2g}{row.quality['top1']:>7.3f}"


def _needed(plan: Plan, spec, contexts) -> int:
    """Memory the target needs on the machine that needs the most."""
    return max(memory_needed(p, rank_spec(spec, plan.shape, p), contexts, plan.prefill_step)
               for p in plan.parts or (plan.shape,))


def recommend(plan: Plan, target_context: int, target_chats: int = 1) -> str:
    """One sentence: the most precise precision that fits the target."""
    need = {id(r): _needed(plan, r.spec, [target_context] * target_chats) for r in plan.rows}
    fitting = [r for r in plan.rows if need[id(r)] <= plan.memory]
    target = f"{target_chats} chat{'s' if target_chats > 1 else ''} of {target_context} tokens"
    beyond = ""
    if plan.shape.trained_context and target_context > plan.shape.trained_context:
        beyond = (f" Note: {target_context} tokens exceeds the model's trained "
                  f"context ({plan.shape.trained_context}).")
    if not fitting:
        r = min(plan.rows, key=lambda r: need[id(r)])
        return (f"Nothing fits {target} in {fmt_bytes(plan.memory)}: even "
                f"{short_label(r.spec)} needs {fmt_bytes(need[id(r)])}; use fewer chats, "
                f"a shorter context or a smaller model.{beyond}")
    best = fitting[0]
    headroom = next(r.max_chats[target_context] for r in plan.rows if r is best) \
        if target_context in plan.contexts and plan.parts else \
        min(capacity(p, rank_spec(best.spec, plan.shape, p), plan.memory,
                     context=target_context, prefill_step=plan.prefill_step)
            for p in plan.parts or (plan.shape,))
    msg = (f"Recommended: {short_label(best.spec)} ({best.spec.describe()}): {target} "
           f"need{'s' * (target_chats == 1)} {fmt_bytes(need[id(best)])} of "
           f"{fmt_bytes(plan.memory)}{' on the fullest rank' if plan.parts else ''}; at this "
           f"context {headroom} chat(s) fit.")
    if best is not plan.rows[0]:
        msg += (f" {short_label(plan.rows[0].spec)} would need "
                f"{fmt_bytes(need[id(plan.rows[0])])}.")
    return msg + beyond


# -- CLI ------------------------------------------------------------------------


def kv_row(shape: ModelShape, name: str):
    """A `--kv` name as a planned row: a spec, or "SPEC/keep", "SPEC/SPEC" with
    sliding-window layers in full precision or at another spec."""
    base, _, sliding = name.partition("/")
    if not sliding:
        return parse_spec(base)
    if not shape.windows:
        raise PlanError(f"--kv {name}: {shape.name} has no sliding-window layers; "
                        f"plan {base} alone")
    return with_sliding(shape, base, sliding)


def run(argv=None):
    """The CLI; returns the plan for callers."""
    p = argparse.ArgumentParser(
        description="How much context and how many chats fit in memory, per KV precision")
    add_model(p, "a config.json, ")
    p.add_argument("--memory", default=None,
                   help="Memory budget, e.g. 16GB (powers of 1024; default: this machine's RAM)")
    d = p.add_argument_group("a model sharded over several machines (mlx.launch)")
    d.add_argument("--ranks", type=positive_int, default=1,
                   help="Machines (ranks) the model is sharded over")
    d.add_argument("--sharding", choices=SHARDINGS, default="tensor",
                   help="mlx-lm's sharding: tensor (heads split) or pipeline (layers split)")
    d.add_argument("--memory-per-rank", default=None,
                   help="Memory of each machine, e.g. 64GB (default: --memory, else this "
                   "machine's RAM)")
    p.add_argument("--kv", nargs="+", default=[],
                   help=f"Extra precisions to plan besides {', '.join(PRECISIONS)}; "
                   "SPEC/keep or SPEC/SPEC: sliding-window layers in full precision or at "
                   "another spec")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="Weight dtype when sizing weights from the parameter count")
    add_prefill_step_size(p, PREFILL_STEP)
    p.add_argument("--contexts", type=token_list, default=CONTEXTS,
                   help="Context lengths for the table, e.g. 4K,8K,32K,128K")
    p.add_argument("--concurrency", type=int_list, default=CONCURRENCY,
                   help="Numbers of chats for the table, e.g. 1,2,4,8")
    p.add_argument("--target-context", type=tokens, default=8192)
    p.add_argument("--target-chats", type=positive_int, default=1)
    p.add_argument("--quality", nargs="+", default=None, metavar="EVAL_JSON",
                   help="Add KLD and top-1 columns from `mlx_kvq.eval --json` files "
                   "(their specs are planned too)")
    p.add_argument("--json", type=output_file, default=None, help="Write the plan as JSON here")
    p.add_argument("--plot", default=None, help="Write PNG plots into this folder")
    args = p.parse_args(argv)
    if args.memory_per_rank and args.memory:
        p.error("give --memory or --memory-per-rank, not both")
    try:
        budget = args.memory_per_rank or args.memory
        memory = parse_memory(budget) if budget else total_memory()
        quality, source = load_quality(args.quality) if args.quality else ({}, None)
        shape = load_shape(args.model, dtype=args.dtype)
        # Presets that cannot apply (head_dim 80: no group divides it) are left
        # out; specs asked for by name must apply.
        specs = list(dict.fromkeys([*applicable(shape, PRECISIONS),
                                    *(kv_row(shape, s) for s in args.kv),
                                    *applicable(shape, [s for s in quality
                                                        if s != "calibrated"])]))
        baked = baked_plan(args.model, shape)
        if baked is not None:
            specs.append(baked)
        if args.ranks > 1:
            check_shardable(shape, args.sharding, args.ranks,
                            sys.modules[shape.module].__file__)
        plan = make_plan(shape, specs, memory, args.prefill_step_size, args.contexts,
                         args.concurrency, ranks=args.ranks, sharding=args.sharding)
        plan.quality_source = source
        for r in plan.rows:
            r.quality = quality.get(str(r.spec))
    except (PlanError, ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    print(format_plan(plan))
    left_out = [short_label(parse_spec(x)) for x in PRECISIONS if parse_spec(x) not in specs]
    if left_out:
        print(f"(not planned: {', '.join(left_out)}: their group size does not divide "
              f"head_dim {shape.head_dim}{f' / {shape.dv}' if shape.v_head_dim else ''}; "
              "per-channel keys alone still quantize: --kv k4v16)")
    print(recommend(plan, args.target_context, args.target_chats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan_dict(plan), f, indent=1)
    if args.plot:
        from . import plots

        for path in plots.plan_plots(plan, args.plot):
            print(f"plot:       {path}")
    return plan


def plan_dict(plan: Plan) -> dict:
    s = plan.shape
    return {
        "model": vars(s) | {"windows": list(s.windows)},
        "memory": plan.memory,
        "prefill_step": plan.prefill_step,
        "rows": [{"spec": str(r.spec), "name": short_label(r.spec), "describe": r.spec.describe(),
                  "bits_per_element": r.bits,
                  "bytes_per_token": {str(c): v for c, v in r.per_token.items()},
                  "max_context": {str(n): v for n, v in r.max_context.items()},
                  "max_chats": {str(c): v for c, v in r.max_chats.items()},
                  "quality": r.quality and {k: v for k, v in r.quality.items() if k != "klds"},
                  "one_machine": r.single and {k: {str(x): n for x, n in v.items()}
                                               for k, v in r.single.items()}}
                 for r in plan.rows],
        "sharding": plan.sharding and {
            "ranks": len(plan.parts), "sharding": plan.sharding,
            "ranks_weight_bytes": [p.weight_bytes for p in plan.parts],
            "ranks_kv_bytes": {str(c): [kv_bytes(p, rank_spec(plan.rows[0].spec, s, p), c)
                                        for p in plan.parts] for c in plan.contexts}},
        "quality_source": plan.quality_source,
    }


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
