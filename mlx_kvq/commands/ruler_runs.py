"""RULER runs longer than a sitting: what a `--json` file of
`mlx_kvq.eval --ruler` gives back to the command run again.

The file is rewritten after each (context, scheme) run, marked unfinished
until the end. A run is identified by its settings (run_settings: the model,
its weights, the corpus, tasks, lengths, questions, contexts, seed, chunk and
batch) and, for a "calibrated" scheme, by its plan (schemes.plan_labels): a
plan fixes only that scheme's answers, so it is held per scheme ("plans" in
the file), not among the settings, and which schemes --kv names changes
nothing of the rest. The same command resumes an unfinished file; with
schemes added to --kv, finished or not, only those run; schemes of the file
left out of --kv stay in it. Refused, before anything runs (it would be
written over): an unfinished file of other settings, and a file whose
calibrated scheme, left out of --kv, was made with another plan than the
one it has now. A calibrated scheme named in --kv whose plan changed runs
again. A finished file of other settings is an earlier result, written over
as any output file.
"""

import json
from pathlib import Path


def run_settings(args, tasks, disclosure: dict) -> dict:
    """What fixes the questions and every scheme's answers but for plans: a
    run resumes only from a file made with the same."""
    key = {k: disclosure[k] for k in ("model", "weights", "corpus")}
    key.update(tasks=tasks, lengths=args.ruler_lengths, questions=args.ruler_questions,
               contexts=args.ruler_contexts, seed=args.seed, chunk=args.chunk,
               batch=args.ruler_batch)
    return json.loads(json.dumps(key))  # as it reads back from the file


def saved_runs(path, settings: dict) -> tuple:
    """({(length, seed, scheme): records}, seconds spent, {scheme: plan
    label}) of the run in the --json file `path` made with these settings,
    finished or not; ({}, 0, {}) when there is none. An unfinished run of
    other settings is refused."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        saved = None  # no file, or not one of this suite's: written as before
    if not isinstance(saved, dict) or "records" not in saved:
        return {}, 0.0, {}
    if saved.get("settings") != settings:
        if saved.get("complete", True):
            return {}, 0.0, {}
        old = saved.get("settings") or {}
        differ = [k for k in {**settings, **old} if old.get(k) != settings.get(k)]
        raise ValueError(f"--json {path} holds an unfinished RULER run made with other "
                         f"settings ({', '.join(differ) or 'unreadable'} differ): run its "
                         "command again to resume it, or write to another --json")
    runs = {}
    for r in saved["records"]:
        runs.setdefault((r["length"], r["seed"], r["scheme"]), []).append(r)
    return runs, float(saved.get("elapsed", 0.0)), dict(saved.get("plans") or {})


def same_plans(path, done: dict, saved: dict, plans: dict, named) -> tuple:
    """(runs of `done` still valid, what is said of those dropped): a
    calibrated scheme's runs made with another plan than its current one
    (`plans`; `saved` from the file) are dropped when --kv names it
    (`named`: it runs again) and refused when it does not (its records would
    stand under the new plan)."""
    stale = sorted({s for (_, _, s) in done if s in plans and saved.get(s) != plans[s]})
    left = [s for s in stale if s not in named]
    if left:
        raise ValueError(f"--json {path} holds runs of {', '.join(map(repr, left))} made with "
                         f"another plan than {'it has' if len(left) == 1 else 'they have'} "
                         f"now ({plans[left[0]]}): name {' '.join(left)} in --kv to run "
                         f"{'it' if len(left) == 1 else 'them'} again, or write to "
                         "another --json")
    said = [f"{s} ran with another plan than its current one ({saved.get(s) or 'unknown'}): "
            "it runs again" for s in stale]
    return {k: v for k, v in done.items() if k[2] not in stale}, said
