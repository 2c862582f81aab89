"""Concurrent chats through mlx-lm's BatchGenerator: `mlx_kvq.bench
--concurrency`.

N concurrent chats (--concurrency 1,4,8,16) through mlx-lm's own batch
machinery. For each N, each scheme in turn (every --kv mlx_kvq spec, and
always the full-precision peer: mlx-lm's BatchKVCache in the model dtype),
interleaved as the model bench is. Each chat gets its own document: N
consecutive --context-token slices of the bench corpus, used as the prompts
as they are (no chat template, so every chat's prompt is exactly --context
tokens). The N prompts are inserted together into one BatchGenerator, with
per-chat caches from make_batch_prompt_caches (none for the fp peer: mlx-lm
makes its KVCaches), prefill chunks of --prefill-step-size and every chat
prefilled in the same batch (prefill and completion batch sizes = N), greedy
sampling and no stop tokens, so each chat generates exactly --max-tokens.
One short untimed chat per scheme first takes the one-time costs.
One run per case measures, from the times the generator hands out tokens:
  decode t/s  aggregate: tokens generated after the first decode step over
              the time from it to the last (prefill excluded);
  e2e t/s     all generated tokens over the time from insert to the last;
  TTFT        per chat, insert to its first token: median and p95;
  peak        mx.get_peak_memory above the weights (reset per case);
  KV/chat     nbytes of each chat's cache as its final response returns it
              (the cache extracted from the batch), averaged over the chats.
Below the table, from the same run: each scheme's decode t/s at each N over
its own rate at the smallest N (N=1 normally), and over the fp peer's at the
same N. Before any work, bench.py checks that N chats of the fp peer
(prompt + generated tokens, plus N times a one-chat prefill workspace) fit
this machine's memory: the model bench's check (evaluate.schemes_memory),
scaled by N.
mlx-lm's QuantizedKVCache has no batched form in mlx-lm 0.32 and is refused.
"""

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from tqdm import tqdm

from mlx_kvq.integration import make_batch_prompt_caches
from mlx_kvq.spec import parse_spec
from .bench_attention import _dtype_name
from .bench_model import cache_bytes, clear

CONCURRENCY_SCHEMES = ("k4v4", "k4v2")  # mlx-lm's QuantizedKVCache has no batched form


@dataclass
class ConcurrencyCase:
    scheme: str
    chats: int
    context: int  # prompt tokens of each chat
    generated: list  # tokens each chat generated
    decode_tps: float  # aggregate: after the first decode step, to the last
    e2e_tps: float  # aggregate: from insert (prefill included) to the last token
    ttft_median: float  # seconds, insert to a chat's first token
    ttft_p95: float
    peak: int  # bytes above the weights
    kv_bytes_per_chat: float  # mean nbytes of the chats' final caches

def fp_peer_name(model) -> str:
    """The full-precision peer: mlx-lm's BatchKVCache, which holds K/V in the
    dtype of the model's activations (its floating-point parameters')."""
    dtypes = (v.dtype for _, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating))
    return f"fp (mlx-lm BatchKVCache {_dtype_name(next(dtypes, mx.float32))})"


def _is_fp(scheme: str) -> bool:
    return scheme == "fp" or scheme.startswith("fp (")


def chat_prompts(tokens, chats: int, context: int) -> list:
    """One document per chat: consecutive `context`-token slices of the
    corpus tokens (repeated from an offset if the corpus is too short)."""
    tokens = list(tokens)
    if len(tokens) < chats * context:
        tokens = tokens * -(-chats * context // len(tokens))
    return [tokens[i * context:(i + 1) * context] for i in range(chats)]


def _batch_caches(model, scheme, chats):
    """Per-chat prompt caches for BatchGenerator.insert; None for the fp peer
    (mlx-lm then makes its own KVCaches and merges them into BatchKVCache)."""
    if _is_fp(scheme):
        return None
    return make_batch_prompt_caches(model, chats, None if scheme == "calibrated" else
                                    parse_spec(scheme))


def _drain(gen, chats):
    """Step the generator until every chat has finished: the times each
    chat's tokens arrived, and each chat's cache from its final response."""
    arrivals, finals = defaultdict(list), {}
    while len(finals) < chats:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            arrivals[r.uid].append(now)
            if r.finish_reason is not None:
                finals[r.uid] = r.prompt_cache
    return arrivals, finals


def _rates(arrivals, t_insert):
    """(decode t/s, end-to-end t/s, TTFTs) from token arrival times."""
    times = sorted(t for ts in arrivals.values() for t in ts)
    first, last = times[0], times[-1]
    after_first = sum(t > first for t in times)
    decode = after_first / (last - first) if last > first else 0.0
    return decode, len(times) / (last - t_insert), [ts[0] - t_insert for ts in arrivals.values()]


def run_concurrency_case(model, prompts, scheme, max_tokens, prefill_step, weights=0,
                         name=None) -> ConcurrencyCase:
    """All `prompts` inserted at once into one BatchGenerator; each chat
    generates exactly `max_tokens` greedy tokens (no stop tokens)."""
    n = len(prompts)
    clear()
    mx.reset_peak_memory()
    caches = _batch_caches(model, scheme, n)
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=None,
                         prefill_step_size=prefill_step, prefill_batch_size=n,
                         completion_batch_size=n)
    t0 = time.perf_counter()
    uids = gen.insert(prompts, [max_tokens] * n, caches=caches)
    arrivals, finals = _drain(gen, n)
    gen.close()
    decode, e2e, ttft = _rates(arrivals, t0)
    case = ConcurrencyCase(
        name or scheme, n, len(prompts[0]), [len(arrivals[u]) for u in uids], decode, e2e,
        statistics.median(ttft), float(np.percentile(ttft, 95)),
        mx.get_peak_memory() - weights,
        statistics.mean(cache_bytes(finals[u]) for u in uids))
    del gen, caches, finals
    clear()
    return case


def bench_concurrency(model, tokens, schemes=CONCURRENCY_SCHEMES, concurrency=(1, 4, 8, 16),
                      context=1024, max_tokens=64, prefill_step=2048, weights=0,
                      progress=True):
    """ConcurrencyCases for the fp peer and every scheme at every N, run
    interleaved (for N: for scheme) over the same N documents."""
    fp = fp_peer_name(model)
    schemes = ["fp"] + [s for s in schemes if not _is_fp(s)]
    for s in schemes:  # untimed: the first case would pay one-time costs alone
        run_concurrency_case(model, chat_prompts(tokens, 1, min(context, 32)), s, 2,
                             prefill_step)
    bar = tqdm(total=len(concurrency) * len(schemes), disable=not progress,
               desc="concurrency")
    cases = []
    for n in concurrency:
        prompts = chat_prompts(tokens, n, context)
        for s in schemes:
            cases.append(run_concurrency_case(model, prompts, s, max_tokens, prefill_step,
                                              weights, fp if s == "fp" else s))
            bar.update(1)
    bar.close()
    return cases


def concurrency_ratios(cases) -> dict:
    """Per scheme and N, aggregate decode t/s over the same scheme's at the
    smallest N ("vs_base"), and over the fp peer's at the same N ("vs_fp")."""
    rate = {(c.scheme, c.chats): c.decode_tps for c in cases}
    fp = {c.chats: c.decode_tps for c in cases if _is_fp(c.scheme)}
    base = min(c.chats for c in cases)
    out = {}
    for c in cases:
        r = out.setdefault(c.scheme, {"base_chats": base, "vs_base": {}, "vs_fp": {}})
        r["vs_base"][c.chats] = c.decode_tps / max(rate[c.scheme, base], 1e-9)
        r["vs_fp"][c.chats] = c.decode_tps / max(fp[c.chats], 1e-9)
    return out


def format_concurrency_table(cases) -> str:
    fp = {c.chats: c for c in cases if _is_fp(c.scheme)}
    w = max(len("scheme"), *(len(c.scheme) for c in cases)) + 2
    head = (f"{'chats':>5}  {'scheme':<{w}}{'decode t/s':>11}{'e2e t/s':>9}"
            f"{'TTFT med s':>12}{'TTFT p95 s':>12}{'peak MiB':>10}{'KV MiB/chat':>13}{'x fp':>7}")
    rows = [head, "-" * len(head)]
    for c in cases:
        rows.append(f"{c.chats:>5}  {c.scheme:<{w}}{c.decode_tps:>11.1f}{c.e2e_tps:>9.1f}"
                    f"{c.ttft_median:>12.2f}{c.ttft_p95:>12.2f}{c.peak / 2**20:>10.0f}"
                    f"{c.kv_bytes_per_chat / 2**20:>13.2f}"
                    f"{c.kv_bytes_per_chat / fp[c.chats].kv_bytes_per_chat:>7.2f}")
    return "\n".join(rows)


def format_concurrency_ratios(cases) -> str:
    ratios = concurrency_ratios(cases)
    ns = sorted({c.chats for c in cases})
    base = ns[0]
    w = max(34, max(len(s) for s in ratios) + 4)
    cols = "".join(f"{f'N={n}':>8}" for n in ns)
    lines = ["aggregate decode t/s ratios, from this run:",
             f"  {f'over the same scheme at N={base}':<{w}}{cols}"]
    lines += [f"    {s:<{w - 2}}" + "".join(f"{r['vs_base'][n]:>8.2f}" for n in ns)
              for s, r in ratios.items()]
    lines.append(f"  {'over the fp peer at the same N':<{w}}{cols}")
    lines += [f"    {s:<{w - 2}}" + "".join(f"{r['vs_fp'][n]:>8.2f}" for n in ns)
              for s, r in ratios.items() if not _is_fp(s)]
    return "\n".join(lines)
