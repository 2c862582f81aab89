"""One rank of the distributed tests (started by mlx.launch, or directly with
MLX_HOSTFILE/MLX_RANK): runs the cases of a JSON job file and writes what it
saw to <out>/rank<r>.json. Each case generates greedily with one model
folder and spec, sharded over all ranks and, as the reference, in this
process alone with the unsharded model.

    python tests/dist_worker.py job.json out_dir
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlx_kvq
import mlx.core as mx
import mlx_lm.utils
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_kvq import distributed
from mlx_kvq.report import kv_stats


def run(model, cache, prompt, n, guard=None, die_after=None):
    """Greedy tokens and their log-probabilities (one row of the vocabulary
    per token); optionally end this process
    (die_after = (tokens, signal)) part way, as a crashed or frozen rank."""
    tokens, logprobs = [], []
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(0.0),
                          prompt_cache=cache, prefill_step_size=64,
                          prompt_progress_callback=guard.beat if guard else None)
    for t, lp in steps:
        if guard:
            guard.beat()
        tokens.append(int(t))
        logprobs.append(np.array(lp, dtype=np.float32))
        if die_after and len(tokens) == die_after[0]:
            os.kill(os.getpid(), die_after[1])
    return tokens, np.stack(logprobs)


def case(c, group, prompt):
    out = {"name": c["name"]}
    spec = c.get("spec")
    # Every rank runs the reference too: a rank waiting in a collective while
    # another works alone would spin on the shared cores.
    reference = c.get("reference", True)
    if reference:
        model, _ = mlx_kvq.load(c["model"])  # with its baked plan, checked against it
        cache = mlx_kvq.make_prompt_cache(model, spec)
        tokens, lp = run(model, cache, prompt, c["tokens"])
        out.update(ref_tokens=tokens, ref_nbytes=kv_stats(cache).nbytes,
                   ref_layers=len(cache), ref_heads=cache[0].dims[1])
        ref_lp = lp
    try:
        model, _, shard = distributed.load(c["model"], c["sharding"], group)
    except ValueError as e:
        out["refused"] = f"{type(e).__name__}: {e}"
        return out
    cache = mlx_kvq.make_prompt_cache(model, spec)
    die = c.get("die")
    die_after = (die["after"], getattr(signal, die["signal"])) \
        if die and die["rank"] == shard.rank else None
    with distributed.Guard(shard, c.get("timeout", 60.0)) as guard:
        tokens, lp = run(model, cache, prompt, c["tokens"], guard, die_after)
        rows = distributed.gather([kv_stats(cache).nbytes], group)
    out.update(tokens=tokens, nbytes=int(kv_stats(cache).nbytes), all_nbytes=rows[:, 0].tolist(),
               offset=cache[0].offset,
               layers=len(cache), heads=cache[0].dims[1], shard=shard.describe(),
               specs=[str(getattr(x, "spec", None)) for x in cache],
               smoothed=[getattr(x, "v_smooth", None) is not None for x in cache])
    if reference:
        out["max_logprob_diff"] = float(np.abs(lp - ref_lp).max())
    out["logprobs"] = lp.max(-1).tolist()  # the chosen tokens' log-probabilities
    return out


def main():
    # Token ids in, token ids out: the tokenizer (a second of loading per
    # model on a busy machine) is never used here.
    mlx_lm.utils.load_tokenizer = lambda *a, **k: None
    job = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    group = distributed.init()
    prompt = np.random.default_rng(job.get("seed", 0)).integers(0, 512, job["prompt"]).tolist()
    results = []
    for c in job["cases"]:
        t = time.perf_counter()
        results.append(case(c, group, prompt))
        results[-1]["seconds"] = round(time.perf_counter() - t, 2)
        (out_dir / f"rank{group.rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
