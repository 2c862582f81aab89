"""Benchmark: continue a conversation holding a long document, resumed from its
saved quantized cache vs prefilled again from the text, through the
assistant's own engine and store; and the saved cache file's size vs an fp16
cache file of the same tokens (an mlx-lm KVCache converted to float16).

    python -m mlx_kvq.harness.bench_resume --doc-tokens 4096 --kv k4v4
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from mlx_kvq.commands.cli_types import positive_int
from mlx_kvq.commands.corpus import sample_text
from mlx_kvq.integration import prefill

from mlx_kvq.apps.assistant.engine import Engine, Job, Settings
from mlx_kvq.apps.assistant.store import CACHE, SIDECAR, Store

QUESTION = "Who is this text about? Answer in a few words."
GOAL_SPEEDUP, GOAL_SIZE = 10.0, 1 / 3


def run(engine: Engine, job: Job) -> dict:
    """Submit a job, wait for it; its "done" event."""
    engine.submit(job)
    for kind, data in job.stream(engine.alive):
        if kind == "error":
            raise RuntimeError(data.message)
        if kind == "done":
            return data


def document(tokenizer, n_tokens: int) -> str:
    """The first `n_tokens` tokens of the bundled Pride and Prejudice excerpt."""
    ids = tokenizer.encode(sample_text()[:8 * n_tokens], add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"the sample text has only {len(ids)} tokens")
    return tokenizer.decode(ids[:n_tokens])


def turn(engine: Engine, cid: str, from_text: bool) -> dict:
    """Ask the question with the conversation's cache parked on disk, or gone."""
    engine.forget(cid)
    if from_text:
        for name in (CACHE, SIDECAR):
            (engine.store.folder(cid) / name).unlink()
    return run(engine, Job("chat", cid, [{"role": "user", "content": QUESTION}],
                           max_tokens=2))


def fp16_file_size(engine: Engine, tokens, path: Path) -> int:
    """Size of an mlx-lm KVCache file holding `tokens`, converted to float16."""
    cache = mlx_cache.make_prompt_cache(engine.model)
    prefill(engine.model, cache, tokens, engine.settings.prefill_step_size,
            lambda *_: None)
    for c in cache:  # exactly the tokens held: no preallocated slack
        k, v = (x.astype(mx.float16) for x in c.keys_and_values())
        c.state = (k, v, c.offset)
    mlx_cache.save_prompt_cache(str(path), cache)
    return path.stat().st_size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Model (default: the embedded one)")
    p.add_argument("--kv", default="k4v4", help="KV cache spec (default k4v4)")
    p.add_argument("--doc-tokens", type=positive_int, default=4096)
    p.add_argument("--repeats", type=positive_int, default=3, help="Resumed turns to time")
    p.add_argument("--prefill-repeats", type=positive_int, default=1,
                   help="Turns prefilled from text to time (slow)")
    p.add_argument("--json", default=None, help="Write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "data")
        engine = Engine(Settings(model=args.model, kv=args.kv, max_tokens=2), store)
        engine.start()
        try:
            text = document(engine.tokenizer, args.doc_tokens)
            cid = store.create("bench").id
            doc = {"role": "user", "content": f'Document "pride.txt":\n\n{text}',
                   "document": {"name": "pride.txt", "chars": len(text)}}
            run(engine, Job("document", cid, [doc]))
            saved = (store.folder(cid) / CACHE).stat().st_size
            tokens = engine.encode([doc], False)
            resumed = [turn(engine, cid, from_text=False) for _ in range(args.repeats)]
            again = [turn(engine, cid, from_text=True) for _ in range(args.prefill_repeats)]
            fp16 = fp16_file_size(engine, tokens, Path(tmp) / "fp16.safetensors")
        finally:
            engine.stop()

    ttft_resumed = statistics.median(d["first_token_s"] for d in resumed)
    ttft_again = statistics.median(d["first_token_s"] for d in again)
    result = {
        "model": engine.model_id, "spec": ", ".join(engine.specs), "document_tokens": len(tokens),
        "ttft_resumed_s": ttft_resumed, "ttft_prefilled_s": ttft_again,
        "speedup": ttft_again / ttft_resumed,
        "resumed": [d["usage"] for d in resumed], "prefilled": [d["usage"] for d in again],
        "cache_file_bytes": saved, "fp16_file_bytes": fp16, "size_ratio": saved / fp16,
    }
    u_r, u_a = resumed[-1]["usage"], again[-1]["usage"]
    print(f"==== resume vs re-prefill: {result['model']}, KV {result['spec']}, "
          f"document {len(tokens)} tokens\n"
          f"time to first token, resumed from the saved cache: {ttft_resumed:8.3f} s "
          f"(median of {len(resumed)}; prompt {u_r['prompt_tokens']} tokens, "
          f"{u_r['cached_tokens']} from the cache file)\n"
          f"time to first token, prefilled again from text:    {ttft_again:8.3f} s "
          f"(median of {len(again)}; prompt {u_a['prompt_tokens']} tokens, "
          f"{u_a['cached_tokens']} cached)\n"
          f"speedup: {result['speedup']:.1f}x (goal >= {GOAL_SPEEDUP:.0f}x)\n"
          f"saved cache file: {saved / 1e6:.2f} MB; fp16 KVCache file: {fp16 / 1e6:.2f} MB; "
          f"ratio {result['size_ratio']:.3f} (goal <= {GOAL_SIZE:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
