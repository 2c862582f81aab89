"""The RULER-style long-context suite of `mlx_kvq.eval --ruler`: prompts,
planner, runner, table, JSON and plot (the tasks and scorer: ruler_tasks.py).

A length costs about one prefill per scheme: for each (length, seed) one
shared context (ruler_tasks.plan_context) is rendered into the user turn of
the model's chat template and fitted to the length with the model's
tokenizer (a length counts every token: template, context, the longest
question and its answer cap, as RULER's max_seq_length does). Each question's
prompt is template(user: context + "\\n" + question) followed by its answer
prefix; its tokens are split where the context's end, and the split is
checked to be a true prefix (tokenization does not merge across it). Every
scheme ("fp" first) prefills the context once; each question is then
answered greedily from a `copy.deepcopy` of that cache, so all schemes
answer the same questions on the same samples, and a question agrees with
fp when its score equals fp's.

The planner refuses, before the model runs, lengths beyond the model's
trained context (config max_position_embeddings) or whose cache, its copy,
the weights and a prefill chunk's workspace exceed the machine's memory.
The run time is estimated before the run from the model's weights and one
layer's attention timed then (run_time.py).
With --json, the file holds every finished (context, scheme) run as the run
goes: the same command resumes it (runs take hours on a CPU), and schemes
added to --kv run alone (ruler_runs.py says what a file gives back).
"""

import copy
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step
from tqdm import tqdm

from mlx_kvq import files, sizing, units
from . import ruler_runs, ruler_tasks, run_time
from .cli_types import nonneg_int, positive_int, token_list
from .schemes import Scheme, calibrations, plan_labels

DEFAULT_SCHEMES = ("k4v4", "k3v3", "k2v2", "mlx4")


def add_arguments(p):
    g = p.add_argument_group("RULER suite (--ruler)")
    g.add_argument("--ruler", action="store_true",
                   help="Run RULER's synthetic long-context tasks for every --kv scheme "
                   f"against fp (default schemes {' '.join(DEFAULT_SCHEMES)}) instead of "
                   "the KLD windows")
    g.add_argument("--ruler-lengths", type=token_list, default=(4096, 8192),
                   help="Comma-separated sequence lengths in tokens (4K,8K,16K,32K)")
    g.add_argument("--ruler-tasks", default="all",
                   help="Comma-separated tasks: all, niah, or any of "
                   + ", ".join(ruler_tasks.TASKS))
    g.add_argument("--ruler-questions", type=positive_int, default=22,
                   help="Questions per length, spread over the tasks and contexts")
    g.add_argument("--ruler-contexts", type=positive_int, default=1,
                   help="Shared contexts per length (each: one prefill per scheme)")
    g.add_argument("--ruler-batch", type=positive_int, default=8,
                   help="Questions of one context answered together (mlx-lm's batch "
                   "machinery; 1: one at a time; the mlxN baselines always one at a time)")
    g.add_argument("--seed", type=nonneg_int, default=0)


# -- prompts -----------------------------------------------------------------------

@dataclass
class Prompt:
    """A shared context's tokens and, for each question, the tokens after it."""

    length: int
    seed: str
    context: list
    questions: list  # ruler_tasks.Question
    suffixes: list  # token lists
    depths: list  # where each question's first answer first occurs, 0..1 of the context

    @property
    def longest(self) -> int:
        return len(self.context) + max(len(s) + q.max_tokens
                                       for s, q in zip(self.suffixes, self.questions))


def chat_parts(tokenizer) -> tuple:
    """The chat template's text before and after a user message (with the
    assistant's turn started)."""
    if not getattr(tokenizer, "has_chat_template", False):
        return "", "\n"
    marker = "<<CONTEXT>>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                             tokenize=False, add_generation_prompt=True)
    pre, post = rendered.split(marker)
    return pre, post


def _encode(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


def split_prompts(tokenizer, context_text: str, questions, parts) -> tuple:
    """(context tokens, each question's tokens after them) of the questions'
    prompts: the context is the longest prefix of the context's own tokens
    that every prompt starts with, so each prompt is exactly its own text's
    tokens even where the tokenizer merges the context's last characters with
    the question's first ones (the merged tokens then go to each question)."""
    pre, post = parts
    head = pre + context_text
    fulls = [_encode(tokenizer, head + "\n" + q.text + post + q.answer_prefix)
             for q in questions]
    first = _encode(tokenizer, head)
    n = min(len(first), *(len(f) - 1 for f in fulls))  # every question keeps a token
    for f in fulls:
        n = next((i for i in range(n) if f[i] != first[i]), n)
    return first[:n], [f[n:] for f in fulls]


def build_prompt(tokenizer, counts: dict, length: int, seed: str, essay: list,
                 parts=None) -> Prompt:
    """The shared context of `length` tokens (questions and answers included)
    with as much haystack as fits."""
    parts = parts or chat_parts(tokenizer)
    plan = ruler_tasks.plan_context(seed, counts, essay, blocks_per_kind=max(1, length // 2048))
    empty = plan.render(0)
    _, suffixes = split_prompts(tokenizer, empty, plan.questions, parts)
    tail = max(len(t) + q.max_tokens for t, q in zip(suffixes, plan.questions))
    budget = length - tail

    def size(n):
        return len(_encode(tokenizer, parts[0] + plan.render(n)))

    if size(0) > budget:
        raise ValueError(f"{length} tokens are too few for {len(plan.questions)} questions "
                         f"in one context: their items alone take {size(0) + tail} tokens; "
                         "use fewer --ruler-questions, more --ruler-contexts or longer "
                         "--ruler-lengths")
    per_unit = max(1.0, (size(64) - size(0)) / 64)
    step = int((budget - size(0)) / per_unit * 0.01) + 4  # overshoot the length little
    lo, hi = 0, int((budget - size(0)) / per_unit) + step
    while size(hi) <= budget:
        lo, hi, step = hi, hi + step, 2 * step
    while hi - lo > 1:  # size(lo) fits, size(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    text = plan.render(lo)
    context, suffixes = split_prompts(tokenizer, text, plan.questions, parts)
    depths = [round(text.find(q.answers[0]) / len(text), 3) for q in plan.questions]
    return Prompt(length, seed, context, plan.questions, suffixes, depths)


def build_prompts(tokenizer, tasks, lengths, questions, contexts, seed, essay) -> list:
    """`questions` per length over `contexts` shared contexts; when they do
    not divide evenly over the tasks, each context starts where the last
    left off."""
    parts = chat_parts(tokenizer)
    per_context = -(-questions // contexts)
    tasks = list(tasks)

    def turn(c):
        k = c * per_context % len(tasks)
        return tasks[k:] + tasks[:k]

    return [build_prompt(tokenizer, ruler_tasks.spread(per_context, turn(c)), length,
                         f"{seed}:{length}:{c}", essay, parts)
            for length in lengths for c in range(contexts)]


# -- planner and estimate ------------------------------------------------------------

def length_problem(shape, schemes, lengths, chunk: int, memory: int, batch: int = 1):
    """Why a length cannot run, or None: beyond the model's trained context,
    or the weights, a chunk's workspace and the caches of the largest scheme
    exceed `memory`: the prefilled cache, one copy per question of a batch,
    and the batch cache they merge into (1 + 2 x batch caches)."""
    trained = shape.trained_context
    for length in lengths:
        if trained and length > trained:
            return (f"--ruler-lengths {length}: more than the model's trained context of "
                    f"{trained} tokens (config max_position_embeddings); use lengths up to "
                    f"{trained}")
        kv = max(Scheme(s).kv_bytes(shape, length) for s in ["fp", *schemes])
        copies = 1 + 2 * batch
        need = (shape.weight_bytes + sizing.workspace_bytes(shape, "fp16", length, chunk)
                + copies * kv)
        if need > memory:
            return (f"--ruler-lengths {length}: the weights and {copies} caches of the largest "
                    f"scheme (the prefilled one, a copy per question of a batch of {batch} and "
                    f"their batch) need {units.fmt_bytes(need)}, more than "
                    f"{units.fmt_bytes(memory)}; use shorter lengths or a smaller --ruler-batch")
    return None


def _prefill(model, tokens, cache, chunk):
    for i in range(0, len(tokens), chunk):
        model(mx.array(tokens[i:i + chunk])[None], cache=cache)
        mx.eval([c.state for c in cache])


def estimate_seconds(model, shape, prompts, n_schemes: int, chunk: int) -> float:
    """The run time (run_time.py): every scheme prefills each context, then
    feeds each question's suffix and decodes its answer up to its cap."""
    c = run_time.measure(model, shape, chunk)
    total = 0.0
    for p in prompts:
        L = len(p.context)
        answers = sum(c.prefill(len(s), L) + c.decode(q.max_tokens, L)
                      for q, s in zip(p.questions, p.suffixes))
        total += n_schemes * (c.prefill(L) + answers)
    return total


# -- running -------------------------------------------------------------------------

def answer(model, tokenizer, cache, suffix, question) -> str:
    """Greedy answer to one question, from a cache holding the context; stops
    at end of turn, at the cap, or once the score cannot change (all found)."""
    out, text = [], ""
    for tok, _ in generate_step(mx.array(suffix), model, max_tokens=question.max_tokens,
                                prompt_cache=cache):
        if tok in tokenizer.eos_token_ids:
            break
        out.append(tok)
        text = tokenizer.decode(out)
        if question.metric == "all" and question.score(text) == 1.0:
            break
    return text


def batchable(cache) -> bool:
    """Whether mlx-lm's batch machinery can merge copies of `cache` (every
    layer's class has a `merge`; mlx-lm's QuantizedKVCache has none)."""
    return all(hasattr(c, "merge") for c in cache)


def answer_batch(model, tokenizer, cache, suffixes, questions, chunk: int) -> list:
    """Greedy answers to several questions, each from its own copy of a cache
    holding the context, decoded together by mlx-lm's BatchGenerator (the
    machinery of batch_generate, which merges the copies through the cache
    class's `merge`). Each answer stops as `answer`'s does: at end of turn,
    at its cap, or once its score cannot change (then it leaves the batch)."""
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         prefill_batch_size=len(suffixes),
                         completion_batch_size=len(suffixes), prefill_step_size=chunk)
    try:
        uids = gen.insert([list(s) for s in suffixes], [q.max_tokens for q in questions],
                          caches=[copy.deepcopy(cache) for _ in suffixes])
        question = dict(zip(uids, questions))
        tokens = {u: [] for u in uids}
        while responses := gen.next_generated():
            done = []
            for r in responses:
                if r.finish_reason == "stop":
                    continue
                tokens[r.uid].append(r.token)
                q = question[r.uid]
                if r.finish_reason is None and q.metric == "all" and \
                        q.score(tokenizer.decode(tokens[r.uid])) == 1.0:
                    done.append(r.uid)
            if done:
                gen.remove(done)
    finally:
        gen.close()
    return [tokenizer.decode(tokens[u]) for u in uids]


def answers(model, tokenizer, cache, prompt, batch: int, chunk: int):
    """Every question of `prompt` answered from copies of `cache`: in batches
    of at most `batch` when the cache can be merged, else one at a time."""
    qs, sx = prompt.questions, prompt.suffixes
    if batch <= 1 or not batchable(cache):
        for q, s in zip(qs, sx):
            yield answer(model, tokenizer, copy.deepcopy(cache), s, q)
        return
    for i in range(0, len(qs), batch):
        yield from answer_batch(model, tokenizer, cache, sx[i:i + batch], qs[i:i + batch], chunk)


def run_prompts(model, tokenizer, prompts, schemes, chunk: int, batch: int = 1,
                progress=True, done=None, save=None) -> list:
    """Every scheme ("fp" first) answers every question: one record each.
    `done` maps (length, seed, scheme) to the records of runs already made
    (ruler_runs.saved_runs), which are taken as they are; `save(records)` is called
    after each (context, scheme) run, with the runs of `done` not reached yet
    (a stop then loses none of them)."""
    schemes = ["fp"] + [s for s in schemes if s != "fp"]
    ahead = dict(done or {})  # runs of `done` the loop has not taken yet

    def steps(p):  # prefill chunks, then one per answer
        return -(-len(p.context) // chunk) + len(p.questions)

    bar = tqdm(total=sum(map(steps, prompts)) * len(schemes), disable=not progress,
               desc="ruler", unit="step")
    records = []
    for p in prompts:
        for s in schemes:
            old = ahead.pop((p.length, p.seed, s), None)
            if old is not None and len(old) == len(p.questions):
                records += old
                bar.update(steps(p))
                continue
            cache = Scheme(s).make(model)
            for i in range(0, len(p.context), chunk):
                _prefill(model, p.context[i:i + chunk], cache, chunk)
                bar.update(1)
            for q, depth, out in zip(p.questions, p.depths,
                                     answers(model, tokenizer, cache, p, batch, chunk)):
                records.append({"length": p.length, "seed": p.seed, "task": q.task,
                                "scheme": s, "context_tokens": len(p.context), "depth": depth,
                                "answers": q.answers, "output": out, "score": q.score(out)})
                bar.update(1)
            del cache
            if save is not None:
                save(records + [r for rs in ahead.values() for r in rs])
    bar.close()
    return records


def summarize(records) -> list:
    """One row per (task, length, scheme), plus task "all" per length: mean
    score, agreement = share of questions scored as fp scores them, fp_solved =
    questions fp scores 1, kept = share of those the scheme also scores 1."""
    fp = {(r["length"], r["seed"], r["task"], i): r["score"]
          for i, r in _numbered(records) if r["scheme"] == "fp"}
    groups = {}
    for i, r in _numbered(records):
        base = fp[(r["length"], r["seed"], r["task"], i)]
        for task in (r["task"], "all"):
            groups.setdefault((task, r["length"], r["scheme"]), []).append(
                (r["score"], r["score"] == base, base == 1.0))
    rows = []
    for (t, n, s), v in groups.items():
        solved = [x for x, _, b in v if b]
        rows.append({"task": t, "length": n, "scheme": s, "questions": len(v),
                     "score": sum(x for x, _, _ in v) / len(v),
                     "agree": sum(a for _, a, _ in v) / len(v), "fp_solved": len(solved),
                     "kept": sum(x == 1.0 for x in solved) / len(solved) if solved else None})
    return rows


def _numbered(records):
    """(index of the question within its context and task, record)."""
    seen = {}
    for r in records:
        k = (r["length"], r["seed"], r["task"], r["scheme"])
        seen[k] = seen.get(k, -1) + 1
        yield seen[k], r


def format_table(rows) -> str:
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["task"] != "all")) + ["all"]
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["task"], r["length"], r["scheme"]): r for r in rows}
    head = f"{'task':<17}{'length':>7}{'n':>4} |" + "".join(
        f"{s:>10}" if s == "fp" else f"{s:>17}" for s in schemes)
    lines = ["==== RULER (score: mean string match; agree: share of questions scored as "
             "fp scores them)", head,
             f"{'':<28} |" + "".join(f"{'score':>10}" if s == "fp" else
                                     f"{'score':>10}{'agree':>7}" for s in schemes),
             "-" * len(head)]
    for t in tasks:
        for n in lengths:
            row = [cell.get((t, n, s)) for s in schemes]
            if row[0] is None:
                continue
            text = f"{t:<17}{n:>7}{row[0]['questions']:>4} |"
            for s, r in zip(schemes, row):
                text += f"{r['score']:>10.2f}" if s == "fp" else \
                    f"{r['score']:>10.2f}{r['agree']:>7.2f}"
            lines.append(text)
    lines.append("fp solved (score 1) / share of those each scheme also solves, all tasks: "
                 + ", ".join(
        f"{n}: {cell[('all', n, schemes[0])]['fp_solved']} / " + " ".join(
            f"{s} {_share(cell[('all', n, s)]['kept'])}" for s in schemes[1:]) for n in lengths))
    return "\n".join(lines)


def run(args, model, tokenizer, shape, essay_text: str, source: str, disclosure: dict):
    """The --ruler mode of mlx_kvq.eval; returns (rows, records). With
    --json, the file holds every finished (context, scheme) run as the run
    goes; the same command resumes an unfinished one, and with schemes
    added to --kv runs only those."""
    import sys

    tasks = ruler_tasks.parse_tasks(args.ruler_tasks)
    schemes = list(args.kv)
    prompts = build_prompts(tokenizer, tasks, args.ruler_lengths, args.ruler_questions,
                            args.ruler_contexts, args.seed, ruler_tasks.sentences(essay_text))
    settings = ruler_runs.run_settings(args, tasks, disclosure)
    done, before, saved_plans = ruler_runs.saved_runs(args.json, settings)
    kept = [s for s in dict.fromkeys(k[2] for k in done) if s not in ("fp", *schemes)]
    if kept:  # the file's other schemes stay in it and in the table
        schemes += kept
        disclosure = dict(disclosure, calibration=calibrations(model, schemes) or
                          disclosure["calibration"], schemes={**disclosure["schemes"], **{
                              s: Scheme(s).describe(bool(shape.windows)) for s in kept}})
    plans = plan_labels(model, schemes)
    done, said = ruler_runs.same_plans(args.json, done, saved_plans, plans, args.kv)
    for line in said:
        print(f"RULER: --json {args.json}: {line}", file=sys.stderr)
    runs = [(p.length, p.seed, s) for p in prompts for s in ["fp", *schemes]]
    resumed = sum(r in done for r in runs)
    est = estimate_seconds(model, shape, prompts, 1 + len(schemes), args.chunk) \
        * (len(runs) - resumed) / len(runs)
    n_q = sum(len(p.questions) for p in prompts)
    if resumed:
        print(f"RULER: resuming --json {args.json}: {resumed} of {len(runs)} (context, "
              "scheme) runs already made are taken from it", file=sys.stderr)
    print(f"RULER: {len(prompts)} shared context(s), {n_q} questions, {len(schemes) + 1} "
          f"schemes; {run_time.said(est, 'context', 'every answer at its token cap')}",
          file=sys.stderr)
    t0 = time.perf_counter()

    def save(records):  # after each (context, scheme) run: a stop loses at most one
        files.write_json(args.json, {"settings": settings, "plans": plans, "complete": False,
                                     "elapsed": before + time.perf_counter() - t0,
                                     "disclosure": disclosure, "records": records})

    records = run_prompts(model, tokenizer, prompts, schemes, args.chunk, args.ruler_batch,
                          done=done, save=save if args.json else None)
    took = before + time.perf_counter() - t0
    rows = summarize(records)
    print(format_table(rows))
    disclosure = dict(disclosure, ruler=(
        f"tasks {', '.join(tasks)}; lengths {list(args.ruler_lengths)} tokens (template, "
        f"context, question and answer cap); {args.ruler_contexts} shared context(s) and "
        f"{n_q // len(args.ruler_lengths)} questions per length, seed {args.seed}; haystack "
        f"prose: {source}; greedy answers, scored by RULER's string match"),
        estimate=f"{est:.0f} s", time=f"{took:.0f} s" + (
            f" (over more than one run: {resumed} of {len(runs)} (context, scheme) runs "
            "resumed from --json)" if resumed else ""))
    for k, v in disclosure.items():
        if k != "schemes":
            print(f"{k + ':':<14}{v}")
    if args.json:
        files.write_json(args.json, {"settings": settings, "plans": plans, "complete": True,
                                     "elapsed": took,
                                     "disclosure": disclosure, "rows": rows,
                                     "records": records})
    if args.plot:
        from . import plots

        print(f"plot:         {plots.ruler_plot(rows, args.plot)}")
    return rows, records


def _share(x) -> str:
    return "-" if x is None else f"{x:.2f}"
