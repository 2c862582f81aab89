"""PNG plots for the eval, plan and bench CLIs (matplotlib, Agg backend).

Each *_plots function writes into a folder and returns the paths written.
`python -m mlx_kvq.commands.plots --eval runs/eval.json --bench runs/bench.json --out DIR`
redraws from the CLIs' JSON output.
"""

import argparse
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

OURS, MLX = "tab:blue", "tab:orange"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_dict(x):
    return asdict(x) if is_dataclass(x) else dict(x)


def _save(fig, out_dir, name):
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return str(path)


def quality_vs_bits(results, out_dir, title="") -> str:
    """KLD to the full-precision cache vs measured bits per element."""
    from .schemes import Scheme

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in map(_as_dict, results.values()):
        mlx = Scheme(r["scheme"]).baseline
        ax.scatter(r["bits_per_element"], r["kld_mean"], s=50, marker="s" if mlx else "o",
                   color=MLX if mlx else OURS, zorder=3)
        ax.annotate(r["scheme"], (r["bits_per_element"], r["kld_mean"]),
                    textcoords="offset points", xytext=(7, -12) if mlx else (-7, 4),
                    ha="left" if mlx else "right", fontsize=9)
    ax.scatter([], [], marker="o", color=OURS, label="mlx_kvq KVQCache")
    ax.scatter([], [], marker="s", color=MLX, label="mlx-lm QuantizedKVCache")
    ax.set_yscale("log")
    ax.set_xlabel("bits per K/V element held (measured, incl. scales and fp16 parts)")
    ax.set_ylabel("mean KL divergence to fp cache (nats)")
    ax.set_title(title or "KV cache quality vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, "quality_vs_bits.png")


def needle_heatmap(grid, out_dir) -> str:
    """Passkey accuracy per scheme: one small grid of contexts x depths each."""
    plt = _plt()
    schemes = list(grid["accuracy"])
    cols = min(4, len(schemes))
    rows = -(-len(schemes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1, 2.2 * rows + 0.8),
                             squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(schemes):]:
        ax.axis("off")
    for k, (ax, s) in enumerate(zip(axes.flat, schemes)):
        acc = grid["accuracy"][s]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(s, fontsize=10)
        ax.set_xticks(range(len(grid["depths"])), [f"{d:g}" for d in grid["depths"]])
        ax.set_yticks(range(len(grid["contexts"])), [str(c) for c in grid["contexts"]])
        ax.set_xlabel("depth of the key", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("context (tokens)", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(f"passkey retrieval ({grid['trials']} trial(s) per cell)")
    return _save(fig, out_dir, "needle.png")


def eval_plots(results, grid, out_dir, title="") -> list:
    paths = []
    if results:
        paths.append(quality_vs_bits(results, out_dir, title))
    if grid:
        paths.append(needle_heatmap(grid, out_dir))
    return paths


def ruler_plot(rows, out_dir) -> str:
    """RULER suite: the mean score over all tasks per length and scheme
    (left), and each scheme's agreement with fp (right)."""
    from .schemes import Scheme

    plt = _plt()
    rows = [r for r in rows if r["task"] == "all"]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for s in schemes:
        pts = sorted((r["length"], r["score"], r["agree"]) for r in rows if r["scheme"] == s)
        x = [p[0] for p in pts]
        style = dict(marker="s" if s != "fp" and Scheme(s).baseline else "o",
                     color="black" if s == "fp" else None, label=s)
        left.plot(x, [p[1] for p in pts], **style)
        if s != "fp":
            right.plot(x, [p[2] for p in pts], **style)
    n = max((r["questions"] for r in rows), default=0)
    for ax, label in ((left, "mean score (RULER string match)"),
                      (right, "share of questions scored as fp scores them")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["length"] for r in rows}),
                      [str(x) for x in sorted({r["length"] for r in rows})])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title(f"RULER tasks, all together (up to {n} questions per length)")
    right.set_title("agreement with the fp cache")
    return _save(fig, out_dir, "ruler.png")


def memory_vs_context(plan, out_dir) -> str:
    """Per precision vs context: the KV cache of one chat (left), and all the
    memory one chat needs, weights and workspace included, against the
    budget (right; lines cross it at the longest context that fits)."""
    from mlx_kvq.sizing import kv_bytes, memory_needed
    from mlx_kvq.spec import short_label
    from mlx_kvq.units import fmt_bytes

    plt = _plt()
    s = plan.shape
    top = max(max(plan.contexts), s.trained_context or 0)
    ctxs = [256 << i for i in range(max(1, (top // 256).bit_length()))]
    fig, (kv_ax, total_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in plan.rows:
        label = f"{short_label(r.spec)} ({r.bits:.2f} b/el)"
        kv_ax.plot(ctxs, [kv_bytes(s, r.spec, c) / 2**30 for c in ctxs], marker="o", ms=3,
                   label=label)
        total_ax.plot(ctxs, [memory_needed(s, r.spec, [c], plan.prefill_step) / 2**30
                             for c in ctxs], marker="o", ms=3, label=label)
    total_ax.axhline(plan.memory / 2**30, color="k", ls="--", lw=1,
                     label=f"budget {fmt_bytes(plan.memory)}")
    total_ax.axhline(s.weight_bytes / 2**30, color="grey", ls=":", lw=1, label="weights")
    kv_ax.set_yscale("log")
    kv_ax.set_ylabel("KV cache of one chat (GiB)")
    total_ax.set_ylabel("weights + workspace + KV of one chat (GiB)")
    for ax in (kv_ax, total_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        if s.trained_context:
            ax.axvline(s.trained_context, color="grey", lw=0.8, ls=":")
            ax.text(s.trained_context, 0.03, " trained context", rotation=90, va="bottom",
                    fontsize=8, color="grey", transform=ax.get_xaxis_transform())
    kv_ax.legend(fontsize=8)
    total_ax.legend(fontsize=8)
    fig.suptitle(f"{s.name}: memory per chat by KV precision (prefill step "
                 f"{plan.prefill_step})", fontsize=11)
    return _save(fig, out_dir, "memory_vs_context.png")


def capacity_table(plan, out_dir) -> str:
    from mlx_kvq.spec import short_label
    from mlx_kvq.units import fmt_bytes, fmt_tokens

    plt = _plt()
    cols = (["precision", "bits/el"] + [f"max ctx, {n} chat{'s' * (n > 1)}" for n in plan.concurrency]
            + [f"chats @ {fmt_tokens(c)}" for c in plan.contexts])
    cells = [[short_label(r.spec), f"{r.bits:.2f}"]
             + [fmt_tokens(r.max_context[n]) for n in plan.concurrency]
             + [str(r.max_chats[c]) for c in plan.contexts] for r in plan.rows]
    fig, ax = plt.subplots(figsize=(1.15 * len(cols) + 0.5, 0.3 * (len(cells) + 1) + 0.2))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=cols, cellLoc="center", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_facecolor("#dde6f0")
            cell.set_text_props(fontsize=8)
    ax.set_title(f"{plan.shape.name}: capacity in {fmt_bytes(plan.memory)} "
                 f"(weights {fmt_bytes(plan.shape.weight_bytes)}, prefill step "
                 f"{plan.prefill_step})", fontsize=10)
    return _save(fig, out_dir, "capacity_table.png")


def plan_plots(plan, out_dir) -> list:
    return [memory_vs_context(plan, out_dir), capacity_table(plan, out_dir)]


def bench_plots(cases, out_dir) -> list:
    """Model bench: prefill and decode tokens/s vs context per scheme;
    attention bench: time per decode step vs context per kind."""
    plt = _plt()
    cases = [_as_dict(c) for c in cases]
    if cases and "kind" in cases[0]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind in dict.fromkeys(c["kind"] for c in cases):
            pts = sorted((c["context"], c["seconds"] * 1e6) for c in cases if c["kind"] == kind)
            ax.plot(*zip(*pts), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("µs per decode step (one layer)")
        ax.set_title("decode attention")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        return [_save(fig, out_dir, "bench_attention.png")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, ax, label in (("prefill_tps", axes[0], "prefill tokens/s"),
                           ("decode_tps", axes[1], "decode tokens/s")):
        for s in dict.fromkeys(c["scheme"] for c in cases):
            pts = sorted((c["context"], c[key]) for c in cases if c["scheme"] == s)
            ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("model bench")
    return [_save(fig, out_dir, "bench_model.png")]


def concurrency_plot(cases, out_dir) -> str:
    """Concurrency bench: aggregate decode tokens/s (left) and KV bytes per
    chat (right) vs the number of concurrent chats, per scheme."""
    plt = _plt()
    cases = [_as_dict(c) for c in cases]
    ns = sorted({c["chats"] for c in cases})
    fig, (tps_ax, kv_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in dict.fromkeys(c["scheme"] for c in cases):
        pts = sorted((c["chats"], c["decode_tps"], c["kv_bytes_per_chat"] / 2**20)
                     for c in cases if c["scheme"] == s)
        chats, tps, kv = zip(*pts)
        style = dict(marker="o", label=s)
        if s.startswith("fp"):  # the full-precision peer
            style.update(color="k", ls="--")
        tps_ax.plot(chats, tps, **style)
        kv_ax.plot(chats, kv, **style)
    for ax, label in ((tps_ax, "aggregate decode tokens/s"), (kv_ax, "KV cache per chat (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent chats (one BatchGenerator)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
    tps_ax.legend(fontsize=8)
    gen = max(max(c["generated"]) for c in cases)
    fig.suptitle(f"concurrency bench: {cases[0]['context']}-token prompt and {gen} generated "
                 "tokens per chat")
    return _save(fig, out_dir, "bench_concurrency.png")


def main(argv=None):
    p = argparse.ArgumentParser(description="Redraw mlx_kvq plots from JSON output")
    p.add_argument("--eval", default=None, help="JSON from mlx_kvq.eval --json")
    p.add_argument("--bench", default=None, help="JSON from mlx_kvq.bench --json")
    p.add_argument("--out", required=True, help="Folder for the PNGs")
    args = p.parse_args(argv)
    paths = []
    if args.eval:
        d = json.loads(Path(args.eval).read_text())
        if "rows" in d:  # --ruler
            paths.append(ruler_plot(d["rows"], args.out))
        else:
            paths += eval_plots(d.get("results"), d.get("needle"), args.out,
                                title=f"{d['disclosure']['model']}: KV cache quality vs size")
    if args.bench:
        paths += bench_plots(json.loads(Path(args.bench).read_text())["cases"], args.out)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
