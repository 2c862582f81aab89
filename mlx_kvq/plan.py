"""Capacity planner: how much context, and how many chats, fit in memory with
each KV precision: `mlx_kvq.plan`. The arithmetic is in sizing.py (memory
model) and shapes.py (what a model is made of); this module builds the
table, recommends a precision and runs the command line.
"""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .cli_types import (add_model, add_prefill_step_size, int_list, output_file, positive_int,
                        token_list, tokens)
from .shapes import DTYPE_BYTES, LayerSpecs, ModelShape, PlanError, baked_plan, load_shape
from .sizing import (PREFILL_STEP, _layers, _parse, applicable, bits_per_element, capacity,
                     kv_bytes_per_token, memory_needed, total_memory,
                     with_sliding, workspace_parts)
from .spec import KVQuantSpec, parse_spec, short_label
from .units import fmt_bytes, fmt_tokens, parse_memory

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


@dataclass
class Plan:
    shape: ModelShape
    memory: int
    prefill_step: int
    rows: list = field(default_factory=list)
    contexts: tuple = CONTEXTS
    concurrency: tuple = CONCURRENCY
    quality_source: Optional[str] = None  # where the quality columns come from


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


def make_plan(shape: ModelShape, specs, memory: int, prefill_step: int = PREFILL_STEP,
              contexts=CONTEXTS, concurrency=CONCURRENCY) -> Plan:
    if memory <= shape.weight_bytes:
        raise PlanError(
            f"memory budget {fmt_bytes(memory)} does not exceed the weights "
            f"({fmt_bytes(shape.weight_bytes)}, {shape.weight_source})"
        )
    plan = Plan(shape, memory, prefill_step, contexts=tuple(contexts),
                concurrency=tuple(concurrency))
    for spec in specs:
        spec = _parse(spec)
        _layers(shape, spec)  # refuses a spec the model's head dims cannot take
        plan.rows.append(Row(
            spec=spec,
            bits=bits_per_element(spec, shape.head_dim),
            per_token={c: kv_bytes_per_token(shape, spec, c) for c in contexts},
            max_context={n: capacity(shape, spec, memory, concurrency=n,
                                     prefill_step=prefill_step) for n in concurrency},
            max_chats={c: capacity(shape, spec, memory, context=c,
                                   prefill_step=prefill_step) for c in contexts},
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
    ws_long = workspace_parts(s, plan.rows[0].spec, max(plan.contexts), plan.prefill_step)
    lines = [
        f"==== mlx_kvq.plan: {s.name}",
        f"model:      {s.model_type}, {s.n_layers} layers ({layers}); "
        f"{s.n_heads} q / {s.n_kv_heads} kv heads x {s.head_dim}; "
        f"trained context {s.trained_context or 'unknown'}",
        f"memory:     {fmt_bytes(plan.memory)} budget",
        f"weights:    {fmt_bytes(s.weight_bytes)} ({s.weight_source}; activations in {s.dtype})",
        f"workspace:  one {plan.prefill_step}-token prefill chunk at a time; with "
        f"{short_label(plan.rows[0].spec)} at {fmt_tokens(max(plan.contexts))} context: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in ws_long.items() if v),
        "KV bytes:   exact KVQCache allocation: fp16 sinks + residual, quantized body "
        "in 256-token steps; per token = that / context",
    ]
    if s.windows:
        lines.append("sliding:    window layers take each row's spec with keys at 8 bits or "
                     "more, without sinks (--kv SPEC/same, SPEC/keep, SPEC/SPEC to choose)")
    if plan.quality_source:
        lines += [f"quality:    {line}" for line in plan.quality_source.splitlines()]
        if any(s.name not in line for line in plan.quality_source.splitlines()):
            lines.append("            (measured on another model than the one planned)")
    lines.append("")
    quality = plan.quality_source is not None
    ctx_head = "".join(f"{'@' + fmt_tokens(c):>9}" for c in plan.contexts)
    w = max(10, 1 + max(len(short_label(r.spec)) for r in plan.rows))
    q_head = f"{'KLD':>8}{'top-1':>7}" if quality else ""
    head = (f"{'precision':<{w}}{'bits/el':>8}{q_head} | "
            f"{'KiB per token':^{9 * len(plan.contexts)}}"
            f" | {'max context, N chats':^{8 * len(plan.concurrency)}}"
            f" | {'max chats at context':^{8 * len(plan.contexts)}}")
    sub = (f"{'':<{w}}{'':>8}{' ' * len(q_head)} | {ctx_head}"
           f" | {''.join(f'{n:>6} ch' for n in plan.concurrency)}"
           f" | {''.join(f'{fmt_tokens(c):>8}' for c in plan.contexts)}")
    lines += [head, sub, "-" * len(sub)]
    for r in plan.rows:
        lines.append(
            f"{short_label(r.spec):<{w}}{r.bits:>8.2f}{_quality_cells(r) if quality else ''} | "
            + "".join(f"{r.per_token[c] / 1024:>9.1f}" for c in plan.contexts) + " | "
            + "".join(f"{fmt_tokens(r.max_context[n]):>8}" for n in plan.concurrency) + " | "
            + "".join(f"{r.max_chats[c]:>8}" for c in plan.contexts)
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


def recommend(plan: Plan, target_context: int, target_chats: int = 1) -> str:
    """One sentence: the most precise precision that fits the target."""
    need = {id(r): memory_needed(plan.shape, r.spec, [target_context] * target_chats,
                                 plan.prefill_step) for r in plan.rows}
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
    headroom = capacity(plan.shape, best.spec, plan.memory, context=target_context,
                        prefill_step=plan.prefill_step)
    msg = (f"Recommended: {short_label(best.spec)} ({best.spec.describe()}): {target} "
           f"need{'s' * (target_chats == 1)} {fmt_bytes(need[id(best)])} of "
           f"{fmt_bytes(plan.memory)}; at this context {headroom} chat(s) fit.")
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
    try:
        memory = parse_memory(args.memory) if args.memory else total_memory()
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
        plan = make_plan(shape, specs, memory, args.prefill_step_size, args.contexts,
                         args.concurrency)
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
                  "quality": r.quality and {k: v for k, v in r.quality.items() if k != "klds"}}
                 for r in plan.rows],
        "quality_source": plan.quality_source,
    }


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
