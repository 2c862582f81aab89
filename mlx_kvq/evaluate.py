"""Quality of KV cache schemes against the full-precision cache: `mlx_kvq.eval`.

Teacher-forced: each window of text is fed in chunks, so attention reads what
the cache stores. For every position the next-token distribution is compared
with the one computed over a full-precision KVCache: KL divergence, top-1
agreement, and perplexity.
"""

import argparse
import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from tqdm import tqdm

from .integration import make_prompt_cache
from .report import kv_stats
from .spec import parse_spec

MLX_BASELINE = re.compile(r"mlx(\d)(?:-g(\d+))?$")


@dataclass
class Scheme:
    """A cache to evaluate: an mlx_kvq spec, mlx-lm's QuantizedKVCache, or fp."""

    name: str

    def make(self, model):
        m = MLX_BASELINE.match(self.name)
        if self.name == "fp":
            return [KVCache() for _ in model.layers]
        if m:
            bits, group = int(m.group(1)), int(m.group(2) or 64)
            return [QuantizedKVCache(group_size=group, bits=bits) for _ in model.layers]
        return make_prompt_cache(model, parse_spec(self.name))

    def describe(self):
        m = MLX_BASELINE.match(self.name)
        if self.name == "fp":
            return "full precision (model dtype) KVCache"
        if m:
            return (f"mlx-lm QuantizedKVCache {m.group(1)}-bit group {m.group(2) or 64}, "
                    "keys and values per token")
        return parse_spec(self.name).describe()


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
    from .cache import KVQCache

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


def _log_softmax(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def evaluate(model, tokens, schemes, window=2048, chunk=256, n_windows=4,
             progress=True):
    """Run every scheme over the same windows; returns {scheme: Result}."""
    tokens = np.asarray(tokens)
    n_avail = len(tokens) // window
    if n_avail == 0:
        raise ValueError(f"text has {len(tokens)} tokens, fewer than one window of {window}")
    n_windows = min(n_windows, n_avail)
    results = {s: Result(s, Scheme(s).describe()) for s in schemes}
    nll = {s: [] for s in schemes}
    nll_ref, agree = [], {s: [] for s in schemes}
    bar = tqdm(total=n_windows * (window // chunk), disable=not progress, desc="eval")
    for w in range(n_windows):
        win = mx.array(tokens[w * window:(w + 1) * window])[None]
        caches = {"fp": Scheme("fp").make(model)}
        caches.update({s: Scheme(s).make(model) for s in schemes})
        for c0 in range(0, window, chunk):
            x = win[:, c0:c0 + chunk]
            tgt = win[0, c0 + 1:c0 + chunk + 1]
            ref = _log_softmax(model(x, cache=caches["fp"])[0].astype(mx.float32))
            n = tgt.shape[0]
            nll_ref.append(-mx.take_along_axis(ref[:n], tgt[:, None], -1)[:, 0])
            for s in schemes:
                out = _log_softmax(model(x, cache=caches[s])[0].astype(mx.float32))
                kld = (mx.exp(ref) * (ref - out)).sum(-1)
                agree[s].append(out.argmax(-1) == ref.argmax(-1))
                nll[s].append(-mx.take_along_axis(out[:n], tgt[:, None], -1)[:, 0])
                results[s].klds.append(kld)
                mx.eval(kld, agree[s][-1], nll[s][-1])
            bar.update(1)
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


def disclosure(model_name, weights, corpus, n_tokens, window, chunk, n_windows, results):
    import mlx_lm

    lines = [
        "==== disclosure",
        f"model:        {model_name}",
        f"weights:      {weights}",
        "calibration:  dynamic (no calibration), per-group scales computed at run time",
        f"eval corpus:  {corpus} ({n_tokens} tokens available)",
        f"windows:      {n_windows} x {window} tokens, teacher-forced in {chunk}-token chunks; "
        "reference: full-precision KVCache",
        f"software:     mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
        f"python {platform.python_version()}",
        "schemes:",
    ]
    lines += [f"  {r.scheme}: {r.label}" for r in results.values()]
    return "\n".join(lines)


def default_text(corpora):
    """Austen's novels if available (fetched from Debian), else the bundled sample."""
    try:
        books = corpora.austen_books()
        return "\n\n".join(books.values()), "Jane Austen, six novels (Debian r-cran-janeaustenr)"
    except (OSError, RuntimeError, ValueError) as e:
        print(f"[mlx_kvq] Austen corpus unavailable ({e}); using the bundled sample")
        return corpora.sample_text(), "bundled sample (Pride and Prejudice excerpt)"


def main(argv=None):
    from . import corpus as corpora
    from .models import describe_weights, load

    p = argparse.ArgumentParser(description="KV cache quality vs the full-precision cache")
    p.add_argument("--model", default=None)
    p.add_argument("--kv", nargs="+", default=["k8v8", "k4v4", "k4v2", "k2v2",
                                               "mlx8", "mlx4", "mlx4-g32", "mlx2", "mlx2-g32"],
                   help="mlx_kvq specs/presets, and mlx-lm baselines as mlx<bits>[-g<group>]")
    p.add_argument("--text", nargs="*", default=None,
                   help=".txt / .jsonl files (default: Jane Austen's novels, else the bundled sample)")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--json", default=None, help="Write results as JSON here")
    args = p.parse_args(argv)

    model, tokenizer = load(args.model)
    if args.text:
        text, source = corpora.load_texts(args.text), ", ".join(args.text)
    else:
        text, source = default_text(corpora)
    tokens = tokenizer.encode(text)
    t0 = time.perf_counter()
    results = evaluate(model, tokens, args.kv, args.window, args.chunk, args.windows)
    n_windows = min(args.windows, len(tokens) // args.window)
    print(format_table(results))
    print(disclosure(args.model or "SmolLM2-135M-Instruct (embedded)",
                     describe_weights(args.model), source, len(tokens), args.window,
                     args.chunk, n_windows, results))
    print(f"time:         {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: asdict(v) for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
