"""Quality of KV cache schemes against the full-precision cache: `mlx_kvq.eval`.

Teacher-forced: each window of text is fed in chunks, so attention reads what
the cache stores. The queries of a chunk read the tokens that chunk quantizes
from their 16-bit copy (as every update does), so a position reads at most
chunk - 1 more 16-bit tokens than a decode step would: the default chunk of
32 measures what decoding reads; chunks of hundreds measure prefill, which
reads more at 16 bits. For every position the next-token distribution is compared
with the one computed over a full-precision KVCache: KL divergence, top-1
agreement, and perplexity.

--needle: passkey retrieval. A sentence with a random 5-digit pass key is
hidden at a given depth in Austen filler text of a given length; the model is
asked, through its chat template, to repeat the key (its answer is started
with "The pass key is"), and greedy decoding must produce the digits. The
full-precision cache runs the same grid: a small model fails long contexts on
its own, and the gap to fp is what the quantization costs.

--ruler: RULER's synthetic long-context tasks at chosen lengths, every
scheme against fp on the same questions (ruler.py, ruler_tasks.py); it runs
on its own, without the KLD windows or the passkey grid.
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx_lm.generate import generate_step
from tqdm import tqdm

from mlx_kvq import blas, shapes, sizing, units
from .cli_types import add_model, fraction_list, nonneg_int, output_file, positive_int, token_list
from mlx_kvq.integration import model_config, sliding_layers
from mlx_kvq.report import kv_stats
from . import ruler, ruler_tasks, run_time
from .schemes import Scheme, calibrations

KLD_SCHEMES = ("k8v8", "k4v4", "k4v2", "k2v2", "mlx8", "mlx4", "mlx4-g32", "mlx2", "mlx2-g32")

@dataclass
class Result:
    scheme: str
    label: str
    kld_mean: float = 0.0
    kld_p99: float = 0.0
    top1: float = 0.0
    ppl: float = 0.0
    ppl_ref: float = 0.0
    bits_per_element: float = 0.0
    klds: list = field(default_factory=list, repr=False)


def cache_bits_per_element(cache) -> float:
    """Bits per cached K/V element, from the bytes the caches really hold."""
    from mlx_kvq.cache import KVQCache

    if any(isinstance(c, KVQCache) for c in cache):
        return kv_stats(cache).bits_per_element
    total, elems = 0, 0
    for c in cache:
        total += c.nbytes
        k = c.keys[0] if isinstance(c.keys, (tuple, list)) else c.keys
        B, H = k.shape[:2]
        D = (c.values[0].shape[-1] * 32 // c.bits) if isinstance(c.values, (tuple, list)) \
            else c.values.shape[-1]
        elems += 2 * B * H * D * c.offset
    return 8.0 * total / elems


def evaluate(model, tokens, schemes, window=2048, chunk=32, n_windows=4,
             progress=True, costs=None):
    """Run every scheme over the same windows; returns {scheme: Result}.
    With `costs` (run_time.Costs) the progress bar advances by each chunk's
    estimated time, so its remaining time counts the longer reads of later
    chunks."""
    tokens = np.asarray(tokens)
    n_avail = len(tokens) // window
    if n_avail == 0:
        raise ValueError(f"text has {len(tokens)} tokens, fewer than one window of {window}")
    n_windows = min(n_windows, n_avail)
    windowed = bool(sliding_layers(Scheme("fp").make(model)))
    results = {s: Result(s, Scheme(s).describe(windowed)) for s in schemes}
    nll = {s: [] for s in schemes}
    nll_ref, agree = [], {s: [] for s in schemes}
    work = (lambda c0: costs.prefill(min(chunk, window - c0), c0)) if costs else (lambda c0: 1)
    bar = tqdm(total=n_windows * sum(map(work, range(0, window, chunk))),
               disable=not progress, desc="eval",
               bar_format="{l_bar}{bar}| [{elapsed}<{remaining}]" if costs else None)
    for w in range(n_windows):
        win = mx.array(tokens[w * window:(w + 1) * window])[None]
        caches = {"fp": Scheme("fp").make(model)}
        caches.update({s: Scheme(s).make(model) for s in schemes})
        for c0 in range(0, window, chunk):
            x = win[:, c0:c0 + chunk]
            tgt = win[0, c0 + 1:c0 + chunk + 1]
            ref = nn.log_softmax(model(x, cache=caches["fp"])[0].astype(mx.float32))
            n = tgt.shape[0]
            nll_ref.append(-mx.take_along_axis(ref[:n], tgt[:, None], -1)[:, 0])
            for s in schemes:
                out = nn.log_softmax(model(x, cache=caches[s])[0].astype(mx.float32))
                kld = (mx.exp(ref) * (ref - out)).sum(-1)
                agree[s].append(out.argmax(-1) == ref.argmax(-1))
                nll[s].append(-mx.take_along_axis(out[:n], tgt[:, None], -1)[:, 0])
                results[s].klds.append(kld)
                mx.eval(kld, agree[s][-1], nll[s][-1])
            bar.update(work(c0))
        for s in schemes:
            results[s].bits_per_element = cache_bits_per_element(caches[s])
    bar.close()
    ppl_ref = float(mx.exp(mx.concatenate(nll_ref).mean()))
    for s, r in results.items():
        k = np.array(mx.concatenate(r.klds))
        r.kld_mean, r.kld_p99 = float(k.mean()), float(np.percentile(k, 99))
        r.top1 = float(mx.concatenate(agree[s]).astype(mx.float32).mean())
        r.ppl = float(mx.exp(mx.concatenate(nll[s]).mean()))
        r.ppl_ref = ppl_ref
        r.klds = []
    return results


def format_table(results) -> str:
    head = f"{'scheme':<22}{'bits/el':>8}{'KLD mean':>11}{'KLD p99':>10}{'top-1':>8}{'ppl':>9}{'Δppl':>8}"
    rows = [head, "-" * len(head)]
    for r in results.values():
        rows.append(
            f"{r.scheme:<22}{r.bits_per_element:>8.2f}{r.kld_mean:>11.5f}{r.kld_p99:>10.4f}"
            f"{r.top1:>8.3f}{r.ppl:>9.3f}{r.ppl - r.ppl_ref:>+8.3f}"
        )
    return "\n".join(rows)


def disclosure_dict(model_name, weights, corpus, n_tokens, window, chunk, n_windows,
                    schemes, needle=None, calibration=None, windowed=True) -> dict:
    """What a reader needs to reproduce or weigh the numbers."""
    d = {
        "model": model_name,
        "weights": weights,
        "calibration": calibration or
        "dynamic, none: per-group scales and biases computed at run time",
        "corpus": f"{corpus} ({n_tokens} tokens available)",
        "windows": (f"{n_windows} x {window} tokens, teacher-forced in {chunk}-token chunks; "
                    "reference: full-precision KVCache" if n_windows else "none"),
        "schemes": {s: Scheme(s).describe(windowed) for s in schemes},
        "software": (f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, numpy "
                     f"{np.__version__}, python {platform.python_version()}"),
        "device": f"{mx.default_device()}, {platform.machine()}, BLAS {blas.status}",
    }
    if needle:
        d["needle"] = (f"passkey retrieval: contexts {needle['contexts']} tokens x depths "
                       f"{needle['depths']}, {needle['trials']} trial(s) per cell, filler "
                       f"{corpus}, greedy answer of up to {NEEDLE_ANSWER_TOKENS} tokens")
    return d


def disclosure(model_name, weights, corpus, n_tokens, window, chunk, n_windows, results,
               needle=None, calibration=None, windowed=True):
    d = disclosure_dict(model_name, weights, corpus, n_tokens, window, chunk, n_windows,
                        list(results), needle, calibration, windowed)
    lines = ["==== disclosure"]
    lines += [f"{k + ':':<14}{v}" for k, v in d.items() if k != "schemes"]
    lines.append("schemes:")
    lines += [f"  {k}: {v}" for k, v in d["schemes"].items()]
    return "\n".join(lines)


# -- passkey retrieval ------------------------------------------------------------

NEEDLE_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will ask you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
NEEDLE_QUESTION = "\n\nWhat is the pass key?"
NEEDLE_ANSWER = "The pass key is"
NEEDLE_ANSWER_TOKENS = 8


def needle_prompt(tokenizer, filler_ids, context, depth, key, offset=0):
    """Token ids of a chat prompt of `context` tokens: filler text (from
    `offset` in filler_ids) with the pass key sentence at `depth` (0..1),
    then the question, and the assistant's answer started."""
    if tokenizer.has_chat_template:
        marker = "<<HAYSTACK>>"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
        pre, post = rendered.split(marker)
    else:
        pre, post = "", "\n"

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    head = enc(pre + NEEDLE_INTRO)
    needle = enc(NEEDLE.format(key=key))
    tail = enc(NEEDLE_QUESTION + post + NEEDLE_ANSWER)
    n = context - len(head) - len(needle) - len(tail)
    if n < 16:
        raise ValueError(f"context {context} is too short for the passkey prompt")
    if offset + n > len(filler_ids):
        raise ValueError(f"filler text has {len(filler_ids)} tokens, fewer than "
                         f"{offset + n} needed")
    hay = list(filler_ids[offset:offset + n])
    cut = int(depth * n)
    # Hide the key between sentences, not inside a word.
    for i in range(cut, min(n, cut + 64)):
        if i == 0 or tokenizer.decode([hay[i - 1]]).rstrip().endswith((".", "!", "?")):
            cut = i
            break
    return head + hay[:cut] + needle + hay[cut:] + tail


def _answer(model, tokenizer, prompt, cache):
    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=NEEDLE_ANSWER_TOKENS,
                                prompt_cache=cache):
        if tok in tokenizer.eos_token_ids:
            break
        out.append(tok)
    return tokenizer.decode(out)


def needle_grid(model, tokenizer, filler_ids, schemes, contexts=(512, 1024),
                depths=(0.1, 0.5, 0.9), trials=1, seed=0, progress=True) -> dict:
    """Passkey accuracy per scheme ("fp" included) per (context, depth) cell."""
    schemes = ["fp"] + [s for s in schemes if s != "fp"]
    rng = np.random.default_rng(seed)
    acc = {s: [[0.0] * len(depths) for _ in contexts] for s in schemes}
    answers = {s: [] for s in schemes}
    bar = tqdm(total=len(contexts) * len(depths) * trials * len(schemes),
               disable=not progress, desc="needle")
    for i, ctx in enumerate(contexts):
        for j, depth in enumerate(depths):
            for _ in range(trials):
                key = str(rng.integers(10000, 100000))
                offset = int(rng.integers(0, max(1, len(filler_ids) - ctx)))
                prompt = needle_prompt(tokenizer, filler_ids, ctx, depth, key, offset)
                for s in schemes:
                    text = _answer(model, tokenizer, prompt, Scheme(s).make(model))
                    acc[s][i][j] += (key in text) / trials
                    answers[s].append({"context": ctx, "depth": depth, "key": key,
                                       "answer": text})
                    bar.update(1)
    bar.close()
    return {"contexts": list(contexts), "depths": list(depths), "trials": trials,
            "accuracy": acc, "answers": answers}


def format_needle(grid) -> str:
    depths = grid["depths"]
    head = f"{'scheme':<12}{'context':>8} |" + "".join(f"{f'd={d:g}':>8}" for d in depths)
    rows = ["==== passkey retrieval accuracy (depth = position of the key in the text)",
            head, "-" * len(head)]
    for s, table in grid["accuracy"].items():
        for ctx, accs in zip(grid["contexts"], table):
            rows.append(f"{s:<12}{ctx:>8} |" + "".join(f"{a:>8.2f}" for a in accs))
    return "\n".join(rows)


def default_text(corpora):
    """Austen's novels if available (fetched from Debian), else the bundled sample."""
    try:
        books = corpora.austen_books()
        return "\n\n".join(books.values()), "Jane Austen, six novels (Debian r-cran-janeaustenr)"
    except (OSError, RuntimeError, ValueError) as e:
        print(f"[mlx_kvq] Austen corpus unavailable ({e}); using the bundled sample")
        return corpora.sample_text(), "bundled sample (Pride and Prejudice excerpt)"


def schemes_memory(shape, schemes, context: int, step: int, at_once: bool = True) -> int:
    """Weights + workspace + the caches of `schemes` after `context` tokens:
    all held at once, or only the largest (one scheme at a time)."""
    kv = [Scheme(s).kv_bytes(shape, context) for s in schemes]
    return (shape.weight_bytes + sizing.workspace_bytes(shape, "fp16", context, step)
            + (sum(kv) if at_once else max(kv)))


def memory_problem(shape, args, memory: int):
    """Why the requested evaluation would not fit `memory`, or None. KLD
    windows hold the fp reference's and every scheme's cache at once; the
    needle grid holds one cache at a time."""
    schemes = ["fp", *args.kv]
    if args.windows > 0:  # plus a chunk's float32 log-probs: reference, output, exp, KLD
        need = (schemes_memory(shape, schemes, args.window, args.chunk)
                + 4 * args.chunk * shape.vocab_size * 4)
        if need > memory:
            return (f"--window {args.window}: the full-precision reference and "
                    f"{len(args.kv)} scheme(s) need {units.fmt_bytes(need)} at once, more "
                    f"than {units.fmt_bytes(memory)}; use a shorter window or fewer schemes")
    if args.needle:
        ctx = max(args.needle_contexts)
        need = schemes_memory(shape, schemes, ctx, sizing.PREFILL_STEP, at_once=False)
        if need > memory:
            return (f"--needle-contexts {ctx}: the full-precision reference needs "
                    f"{units.fmt_bytes(need)}, more than {units.fmt_bytes(memory)}")
    return None


def run(argv=None):
    """The CLI; returns its results for callers."""
    from . import corpus as corpora
    from mlx_kvq.models import DEFAULT_MODEL, describe_weights

    p = argparse.ArgumentParser(description="KV cache quality vs the full-precision cache")
    add_model(p, windowed=True)
    p.add_argument("--kv", nargs="+", default=None,
                   help="mlx_kvq specs/presets, mlx-lm baselines as mlx<bits>[-g<group>], "
                   "'calibrated' (the model folder's plan) or 'calibrated:<folder>' (a plan "
                   f"baked into another folder of this model) (default {' '.join(KLD_SCHEMES)})")
    p.add_argument("--text", nargs="*", default=None,
                   help=".txt / .jsonl files (default: Jane Austen's novels, else the bundled sample)")
    p.add_argument("--window", type=positive_int, default=2048)
    p.add_argument("--chunk", type=positive_int, default=32,
                   help="Tokens teacher-forced per step (default 32: each position reads "
                   "at most 31 more 16-bit tokens than a decode step; larger chunks read "
                   "more of their own tokens at 16 bits, as prefill does)")
    p.add_argument("--windows", type=nonneg_int, default=None,
                   help="0 skips the KLD evaluation (default 4, 0 with --ruler)")
    p.add_argument("--needle", action="store_true", help="Also run passkey retrieval")
    p.add_argument("--needle-contexts", type=token_list, default=(512, 1024),
                   help="Comma-separated prompt lengths in tokens")
    p.add_argument("--needle-depths", type=fraction_list, default=(0.1, 0.5, 0.9),
                   help="Comma-separated positions of the key (0 = start, 1 = end)")
    p.add_argument("--needle-trials", type=positive_int, default=1, help="Pass keys per cell")
    p.add_argument("--json", type=output_file, default=None,
                   help="Write results and the disclosure as JSON here")
    p.add_argument("--plot", default=None, help="Write PNG plots into this folder")
    ruler.add_arguments(p)
    args = p.parse_args(argv)
    args.kv = args.kv or list(ruler.DEFAULT_SCHEMES if args.ruler else KLD_SCHEMES)
    if args.ruler and (args.windows or args.needle):
        p.error("--ruler runs on its own: run --windows / --needle in another mlx_kvq.eval")
    args.windows = (0 if args.ruler else 4) if args.windows is None else args.windows
    try:
        ruler_tasks.parse_tasks(args.ruler_tasks)
        for name in args.kv:
            Scheme(name).validate()
    except ValueError as e:
        p.error(str(e))

    model, tokenizer, shape = load_for_schemes(p, args.model, args.kv, args.sliding_window,
                                               args.full_every)
    problem = memory_problem(shape, args, sizing.total_memory())
    if args.ruler:
        problem = problem or ruler.length_problem(shape, args.kv, args.ruler_lengths,
                                                  args.chunk, sizing.total_memory(),
                                                  args.ruler_batch)
    if problem:
        p.error(problem)
    try:
        if args.text:
            text, source = corpora.load_texts(args.text), ", ".join(args.text)
        else:
            text, source = default_text(corpora)
        if args.ruler:
            return run_ruler(p, args, model, tokenizer, shape, text, source)
        tokens = tokenizer.encode(text)
        if args.windows > 0 and len(tokens) < args.window:
            raise ValueError(f"the text has {len(tokens)} tokens, fewer than one "
                             f"--window of {args.window}")
        if args.needle:  # the longest prompt must fit the filler text
            needle_prompt(tokenizer, tokens, max(args.needle_contexts), 0.5, "0" * 5)
    except (OSError, ValueError) as e:
        p.error(str(e))
    trained = model_config(model).get("max_position_embeddings")
    longest = max([args.window] * (args.windows > 0) + list(args.needle_contexts) * args.needle,
                  default=0)
    if trained and longest > trained:
        print(f"warning: {longest} tokens exceed the model's trained context of {trained}",
              file=sys.stderr)
    n_windows = min(args.windows, len(tokens) // args.window)
    costs = run_time.measure(model, shape, args.chunk) if n_windows else None
    if costs:
        est = n_windows * (1 + len(args.kv)) * costs.prefill(args.window)
        print(f"KLD: {n_windows} window(s) of {args.window} tokens, {len(args.kv)} "
              f"scheme{'s' * (len(args.kv) > 1)} and fp; {run_time.said(est, 'window')}",
              file=sys.stderr)
    t0 = time.perf_counter()
    results, grid = {}, None
    if args.windows > 0:
        results = evaluate(model, tokens, args.kv, args.window, args.chunk, args.windows,
                           costs=costs)
        print(format_table(results))
    if args.needle:
        grid = needle_grid(model, tokenizer, tokens, args.kv, args.needle_contexts,
                           args.needle_depths, args.needle_trials)
        print(format_needle(grid))
    name = args.model or f"{DEFAULT_MODEL} (embedded)"
    meta = (name, describe_weights(args.model), source, len(tokens), args.window,
            args.chunk, n_windows)
    calibration = calibrations(model, args.kv)
    print(disclosure(*meta, results or dict.fromkeys(args.kv), grid, calibration,
                     bool(shape.windows)))
    print(f"time:         {time.perf_counter() - t0:.0f} s"
          + (f" (KLD estimate {est:.0f} s)" if costs else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"disclosure": disclosure_dict(*meta, args.kv, grid, calibration,
                                                     bool(shape.windows)),
                       "results": {k: asdict(v) for k, v in results.items()},
                       "needle": grid}, f, indent=1)
    if args.plot:
        from . import plots

        for path in plots.eval_plots(results, grid, args.plot):
            print(f"plot:         {path}")
    return results, grid


def run_ruler(p, args, model, tokenizer, shape, text, source):
    """--ruler: the RULER-style suite (ruler.py); its prompts are built
    (and refused if they do not fit) before anything runs."""
    from mlx_kvq.models import DEFAULT_MODEL, describe_weights

    d = disclosure_dict(args.model or f"{DEFAULT_MODEL} (embedded)",
                        describe_weights(args.model), source, 0, 0, 0, 0, args.kv,
                        calibration=calibrations(model, args.kv),
                        windowed=bool(shape.windows))
    del d["windows"]
    d["corpus"] = source
    try:
        return ruler.run(args, model, tokenizer, shape, text, source, d)
    except ValueError as e:
        p.error(str(e))


def load_for_schemes(p, model_ref, schemes, sliding_window=None, full_every=6):
    """(model, tokenizer, shape), or a clear argparse error: the model is not
    found, or a scheme does not apply to it. With sliding_window, the model's
    windowed copy (models.windowed_copy)."""
    from mlx_kvq.models import ModelNotFoundError, load, windowed_copy

    try:
        if sliding_window:
            model_ref = str(windowed_copy(model_ref, sliding_window, full_every))
        model, tokenizer = load(model_ref)  # first: downloads or converts the model
    except (ModelNotFoundError, ValueError) as e:
        p.error(str(e))
    try:
        shape = shapes.load_shape(model_ref)
        for name in schemes:
            Scheme(name).validate(shape, model)
    except ValueError as e:  # PlanError included
        p.error(str(e))
    return model, tokenizer, shape


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
