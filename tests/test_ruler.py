"""The RULER-style suite (mlx_kvq.eval --ruler): generators, scorer, prompt
fitting, the shared-context path and the planner."""

import json
import re
from collections import Counter

import pytest

import mlx_kvq
import mlx_kvq.commands.corpus
from mlx_kvq import models, shapes, sizing
from mlx_kvq.commands import evaluate, ruler, ruler_tasks
from mlx_kvq.commands.schemes import Scheme
from mlx_kvq.commands.ruler_tasks import TASKS, plan_context, spread

ESSAY = ruler_tasks.sentences(mlx_kvq.commands.corpus.sample_text())
ALL = spread(22, TASKS)  # two questions of every task


def test_scorer_is_rulers_string_match():
    all_, part = ruler_tasks.string_match_all, ruler_tasks.string_match_part
    refs = ["1234567", "Apple-Pie", "xyz"]
    assert all_("the values are 1234567 and apple-pie", refs) == pytest.approx(2 / 3)
    assert all_("1234567 APPLE-PIE XYZ", refs) == 1.0
    assert all_("nothing here", refs) == 0.0
    assert all_("123456", ["1234567"]) == 0.0  # a prefix is not a match
    assert part("only xyz", refs) == 1.0 and part("none", refs) == 0.0
    assert all_("  \x00 1234567\x1f", ["1234567"]) == 1.0  # RULER's postprocessing
    assert ruler_tasks.postprocess(" a\tb\x01 ") == "a\nb"


def test_generators_are_deterministic_per_seed():
    a = plan_context("0:4096:0", ALL, ESSAY, 2).render(300)
    b = plan_context("0:4096:0", ALL, ESSAY, 2).render(300)
    c = plan_context("1:4096:0", ALL, ESSAY, 2).render(300)
    assert a == b and a != c
    qa = plan_context("0:4096:0", ALL, ESSAY, 2).questions
    assert [q.answers for q in qa] == [q.answers for q in
                                      plan_context("0:4096:0", ALL, ESSAY, 2).questions]
    # the items do not depend on the haystack's size
    bare = plan_context("0:4096:0", ALL, ESSAY, 2).render(0)
    assert len(bare) < len(a)
    assert all(x in bare and x in a for q in qa for x in q.answers)


def test_every_answer_is_where_its_question_says():
    plan = plan_context(7, ALL, ESSAY, 3)
    text = plan.render(400)
    assert len(plan.questions) == 22
    assert Counter(q.task for q in plan.questions) == dict.fromkeys(TASKS, 2)
    for q in plan.questions:
        oracle = " ".join(q.answers)
        assert q.score(oracle) == 1.0, q
        assert q.score("I do not know.") == 0.0
        t = TASKS[q.task]
        if t.family == "niah":
            key = re.search(r"for (.+) mentioned", q.text).group(1)
            keys = key.replace(", and ", ", ").split(", ") if t.queries > 1 else [key]
            for k in keys:
                found = re.findall(rf"special magic {t.value} for {re.escape(k)} is: (\S+)\.",
                                   text)
                assert found and set(found) <= set(q.answers)
            assert text.count(q.answers[0]) == 1  # unique in the context
        elif t.family == "vt":
            value = re.search(r"the value (\d+)", q.text).group(1)
            links = [f"VAR {q.answers[0]} = {value}"] + [
                f"VAR {b} = VAR {a}" for a, b in zip(q.answers, q.answers[1:])]
            at = [text.index(link) for link in links]
            assert at == sorted(at)  # the chain in order
        else:
            n = re.search(r"(?:list|coded text) (\d+) above", q.text).group(1)
            if t.family == "cwe":
                block = text.split(f"list of words, list {n}.")[1].split("\n")[1]
                words = Counter(re.findall(r"\d+\. (\S+)", block))
                top = [w for w, _ in words.most_common(10)]
                assert sorted(top) == sorted(q.answers)
                assert words.most_common(11)[-1][1] < words[q.answers[0]]
            else:
                block = text.split(f"coded text {n}, and track")[1].split("\n")[0]
                words = Counter(block.split(". ", 2)[-1].split())
                top = [w for w, _ in words.most_common(4) if w != "..."][:3]
                assert top == q.answers
    # a wrong answer (another question's) scores below 1
    a, b = plan.questions[:2]
    assert a.score(" ".join(b.answers)) < 1.0


def test_task_names_parse_with_clear_errors():
    assert ruler_tasks.parse_tasks("niah_single_1,vt") == ("niah_single_1", "vt")
    assert len(ruler_tasks.parse_tasks("niah")) == 8
    assert ruler_tasks.parse_tasks("all") == tuple(TASKS)
    with pytest.raises(ValueError, match="unknown RULER task 'qa'.*niah_single_1"):
        ruler_tasks.parse_tasks("vt,qa")


def test_prompts_fill_the_length_and_split_at_the_context():
    _, tokenizer = models.load()
    prompts = ruler.build_prompts(tokenizer, tuple(TASKS), [4096], 11, 1, 0, ESSAY)
    assert len(prompts) == 1
    p = prompts[0]
    assert 4096 - 64 <= p.longest <= 4096
    parts = ruler.chat_parts(tokenizer)
    for q, suffix in zip(p.questions, p.suffixes):
        full = tokenizer.encode(tokenizer.decode(p.context + suffix), add_special_tokens=False)
        assert full == p.context + suffix
        assert tokenizer.decode(suffix).endswith(q.answer_prefix)
        assert parts[1].strip() in tokenizer.decode(suffix)
    assert all(0 <= d < 1 for d in p.depths) and max(p.depths) - min(p.depths) > 0.5
    again = ruler.build_prompts(tokenizer, tuple(TASKS), [4096], 11, 1, 0, ESSAY)[0]
    assert again.context == p.context and again.suffixes == p.suffixes
    with pytest.raises(ValueError, match="too few for 11 questions"):
        ruler.build_prompts(tokenizer, tuple(TASKS), [1024], 11, 1, 0, ESSAY)


class _MergingTokenizer:
    """Characters as tokens, except ".\n", which is one token (as BPE
    tokenizers merge a sentence's end with the line break after it)."""

    def encode(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            if text.startswith(".\n", i):
                out.append(1000)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out


def test_prompts_split_where_the_tokenizer_merges_across_the_context_end():
    tok = _MergingTokenizer()
    plan = plan_context("0:2048:0", spread(3, TASKS), ESSAY)
    text = plan.render(2) + "."  # its last token merges with the question's line break
    parts = ("<user>", "</user>")
    context, suffixes = ruler.split_prompts(tok, text, plan.questions, parts)
    assert tok.encode(parts[0] + text)[:len(context)] == context
    assert len(context) < len(tok.encode(parts[0] + text))  # the merged token went to the questions
    for q, suffix in zip(plan.questions, suffixes):
        assert context + suffix == tok.encode(parts[0] + text + "\n" + q.text + parts[1]
                                              + q.answer_prefix)
        assert suffix[0] == 1000 and len(suffix) > 1


def test_questions_spread_over_tasks_and_contexts():
    _, tokenizer = models.load()
    prompts = ruler.build_prompts(tokenizer, tuple(TASKS), [2048], 15, 3, 0, ESSAY)
    assert [p.seed for p in prompts] == ["0:2048:0", "0:2048:1", "0:2048:2"]
    assert [len(p.questions) for p in prompts] == [5, 5, 5]
    per_task = Counter(q.task for p in prompts for q in p.questions)
    assert set(per_task) == set(TASKS) and set(per_task.values()) == {1, 2}
    assert len({tuple(p.context) for p in prompts}) == 3


def test_planner_refuses_what_does_not_fit():
    shape = shapes.load_shape()
    assert shape.trained_context == 8192
    assert ruler.length_problem(shape, ["k4v4"], [4096, 8192], 256, 1 << 40) is None
    msg = ruler.length_problem(shape, ["k4v4"], [4096, 16384], 256, 1 << 40)
    assert "--ruler-lengths 16384: more than the model's trained context of 8192" in msg
    msg = ruler.length_problem(shape, ["k4v4"], [8192], 256, shape.weight_bytes)
    assert "--ruler-lengths 8192: the weights and 3 caches of the largest scheme" in msg
    # a batch of questions holds a copy of the cache per question and their batch cache
    kv = Scheme("fp").kv_bytes(shape, 8192)
    fits_one = shape.weight_bytes + sizing.workspace_bytes(shape, "fp16", 8192, 256) + 3 * kv
    assert ruler.length_problem(shape, ["k4v4"], [8192], 256, fits_one, batch=1) is None
    msg = ruler.length_problem(shape, ["k4v4"], [8192], 256, fits_one, batch=8)
    assert "17 caches of the largest scheme" in msg and "smaller --ruler-batch" in msg


@pytest.mark.parametrize("argv, msg", [
    (["--ruler", "--ruler-lengths", "16K"], "more than the model's trained context of 8192"),
    (["--ruler", "--ruler-tasks", "vt,qa"], "unknown RULER task 'qa'"),
    (["--ruler", "--needle"], "--ruler runs on its own"),
    (["--ruler", "--ruler-lengths", "512"], "512 tokens are too few for 22 questions"),
    (["--ruler", "--ruler-questions", "0"], "--ruler-questions: '0' is not a positive"),
])
def test_bad_ruler_arguments_are_clear_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.run(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_ruler_cli_end_to_end_resumes_and_copies_answer_as_a_fresh_prefill(
        tmp_path, capsys, monkeypatch):
    """A bounded run on the embedded model, stopped after fp's run and
    resumed by the same command (only k4v4 runs then; a file of other
    settings is refused and kept); fp's answers from copies of the shared
    cache (the second question's copy made after the first was answered)
    equal those of a fresh prefill of each whole prompt."""
    path = tmp_path / "r.json"
    argv = ["--ruler", "--ruler-lengths", "512", "--ruler-tasks", "niah_single_1,vt",
            "--ruler-questions", "2", "--kv", "k4v4", "--seed", "3",
            "--json", str(path), "--plot", str(tmp_path)]
    real, calls = ruler.answers, []

    def stopped_at_the_second_run(*a, **k):
        calls.append(a[2])  # the cache
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ruler, "answers", stopped_at_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(argv)
    unfinished = json.loads(path.read_text())
    assert unfinished["complete"] is False and unfinished["elapsed"] > 0
    assert [r["scheme"] for r in unfinished["records"]] == ["fp", "fp"]
    other = list(argv)
    other[argv.index("--seed") + 1] = "4"
    with pytest.raises(SystemExit):
        evaluate.run(other)
    err = capsys.readouterr().err
    assert "unfinished RULER run made with other settings (seed differ)" in err
    assert json.loads(path.read_text()) == unfinished

    calls.clear()
    rows, records = evaluate.run(argv)
    assert len(calls) == 1  # k4v4's run; fp's came from the file
    out, err = capsys.readouterr()
    assert "resuming" in err and "1 of 2 (context, scheme) runs" in err
    assert "estimated run time" in err and "an estimate" in err
    assert "==== RULER" in out and "niah_single_1" in out and "all" in out
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["records"] == records and saved["complete"]
    assert records[:2] == unfinished["records"]
    assert "niah_single_1, vt" in saved["disclosure"]["ruler"]
    assert (tmp_path / "ruler.png").is_file()
    assert {(r["scheme"], r["task"]) for r in records} == {
        (s, t) for s in ("fp", "k4v4") for t in ("niah_single_1", "vt")}
    by = {(r["task"], r["scheme"]): r for r in rows}
    for t in ("niah_single_1", "vt", "all"):
        assert by[(t, "fp")]["agree"] == 1.0
        assert 0 <= by[(t, "k4v4")]["score"] <= 1
    assert all(r["context_tokens"] < 512 for r in records)

    calls.clear()  # a scheme added to the finished run's command runs alone
    more = argv[:argv.index("k4v4") + 1] + ["k8v8"] + argv[argv.index("k4v4") + 1:]
    _, both = evaluate.run(more)
    assert len(calls) == 1 and "2 of 3 (context, scheme) runs" in capsys.readouterr().err
    assert both[:4] == records and {r["scheme"] for r in both[4:]} == {"k8v8"}
    calls.clear()  # and one left out of it stays in the file
    _, kept = evaluate.run(argv)
    assert calls == [] and kept == both
    assert json.loads(path.read_text())["records"] == both

    model, tokenizer = models.load()
    [p] = ruler.build_prompts(tokenizer, ("niah_single_1", "vt"), [512], 2, 1, 3,
                              ruler_tasks.sentences(evaluate.default_text(
                                  mlx_kvq.commands.corpus)[0]))
    fp = [r for r in records if r["scheme"] == "fp"]
    assert [r["answers"] for r in fp] == [q.answers for q in p.questions]
    for r, q, suffix in zip(fp, p.questions, p.suffixes):
        fresh = ruler.answer(model, tokenizer, ruler.Scheme("fp").make(model),
                             p.context + suffix, q)
        assert fresh == r["output"]


def test_summary_counts_agreement_per_question():
    rec = [dict(length=1, seed="s", task="vt", scheme=s, score=x)
           for s, x in (("fp", 1.0), ("fp", 0.0), ("k2v2", 1.0), ("k2v2", 1.0))]
    rows = {(r["task"], r["scheme"]): r for r in ruler.summarize(rec)}
    assert rows[("vt", "k2v2")]["score"] == 1.0 and rows[("vt", "k2v2")]["agree"] == 0.5
    assert rows[("all", "fp")]["agree"] == 1.0 and rows[("vt", "fp")]["questions"] == 2
    assert rows[("vt", "k2v2")]["fp_solved"] == 1 and rows[("vt", "k2v2")]["kept"] == 1.0
    assert "vt" in ruler.format_table(list(rows.values()))


def test_kv_report_says_when_the_cache_quantizes_and_what_it_saves_at_8k_and_32k():
    import mlx.core as mx

    from mlx_kvq import sizing
    from mlx_kvq.integration import make_prompt_cache
    from mlx_kvq.report import format_report, kv_stats

    model, tokenizer = models.load()
    shape = shapes.load_shape()
    cache = make_prompt_cache(model, "k4v4")
    model(mx.array(tokenizer.encode("What is the capital of France? " * 4))[None], cache=cache)
    stats = kv_stats(cache)
    assert stats.tokens < 100 and stats.quantizes_from == 4 + 64 + 32  # sinks, residual, group
    assert stats.quantized_tokens == 0 and stats.nbytes == stats.fp16_nbytes
    for n, held, fp16 in stats.projection:
        assert held == sizing.kv_bytes(shape, "k4v4", n)
        assert fp16 == 2 * n * shape.n_layers * shape.n_kv_heads * 2 * shape.head_dim
    text = format_report(stats, peak=0)
    assert "quantizes:    from 100 tokens on" in text and "all still 16-bit" in text
    n, held, fp16 = stats.projection[0]
    assert n == 8192 and f"8K tokens {held / 1e6:.2f} MB vs {fp16 / 1e6:.2f} MB in fp16" in text
    assert 3 < fp16 / held < 3.2  # a 4-bit body with fp16 scales per 32: 5 bits of 16
    assert "32K tokens" in text and "bits per element" in text
    model(mx.array(tokenizer.encode("The sky is blue. " * 40))[None], cache=cache)
    stats = kv_stats(cache)
    assert stats.quantized_tokens == stats.tokens - 4 - 64 - (stats.tokens - 68) % 32
    assert f"{stats.quantized_tokens} of these {stats.tokens} tokens are quantized" in \
        format_report(stats, peak=0)


def test_a_saved_run_gives_back_runs_of_its_settings_and_plans(tmp_path):
    """A --json file gives back its runs when made with the same settings;
    a calibrated scheme's runs only when made with the plan it has now
    (named in --kv: it runs again; left out: refused, the file kept)."""
    from mlx_kvq.commands.ruler_runs import same_plans, saved_runs

    settings = {"model": "m", "seed": 0, "lengths": [4096]}
    recs = [{"length": 4096, "seed": "0:4096:0", "scheme": s, "score": 1.0}
            for s in ("fp", "k4v4", "calibrated")]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"settings": settings, "plans": {"calibrated": "plan A"},
                                "complete": True, "elapsed": 5.0, "records": recs}))
    done, before, plans = saved_runs(path, settings)
    assert sorted(k[2] for k in done) == ["calibrated", "fp", "k4v4"] and before == 5.0
    assert plans == {"calibrated": "plan A"}
    assert saved_runs(path, {**settings, "seed": 1}) == ({}, 0.0, {})  # finished: written over
    assert saved_runs(tmp_path / "none.json", settings) == ({}, 0.0, {})

    kept, said = same_plans(path, done, plans, {"calibrated": "plan A"}, ["k4v4"])
    assert kept == done and said == []
    kept, said = same_plans(path, done, plans, {"calibrated": "plan B"}, ["calibrated"])
    assert sorted(k[2] for k in kept) == ["fp", "k4v4"]
    assert said == ["calibrated ran with another plan than its current one (plan A): "
                    "it runs again"]
    with pytest.raises(ValueError, match="runs of 'calibrated' made with another plan than "
                       r"it has now \(plan B\): name calibrated in --kv"):
        same_plans(path, done, plans, {"calibrated": "plan B"}, ["k4v4"])

    # an unfinished file of other settings is refused, naming what differs
    # (a setting the command no longer has included)
    path.write_text(json.dumps({"settings": {**settings, "calibration": "x"},
                                "complete": False, "records": recs}))
    with pytest.raises(ValueError, match=r"other settings \(calibration differ\)"):
        saved_runs(path, settings)


def test_a_stop_while_adding_a_scheme_keeps_the_later_contexts_runs():
    """Each save holds every run of the file, those of contexts the loop has not
    reached yet too: a stop during the first new run loses none of them."""
    model, tokenizer = models.load()
    prompts = ruler.build_prompts(tokenizer, ("niah_single_1",), [512], 2, 2, 3, ESSAY)
    assert len(prompts) == 2 and prompts[0].seed != prompts[1].seed
    done = {(p.length, p.seed, s): [{"length": p.length, "seed": p.seed, "scheme": s,
                                     "task": q.task, "score": 1.0} for q in p.questions]
            for p in prompts for s in ("fp", "k4v4")}
    saved = []

    def save(records):
        saved.append(list(records))
        raise KeyboardInterrupt  # stopped right after the first new run

    with pytest.raises(KeyboardInterrupt):
        ruler.run_prompts(model, tokenizer, prompts, ["k4v4", "k8v8"], 512, done=done,
                          progress=False, save=save)
    [records] = saved
    runs = Counter((r["seed"], r["scheme"]) for r in records)
    assert runs == {(p.seed, s): 1 for p in prompts for s in ("fp", "k4v4")} | {
        (prompts[0].seed, "k8v8"): 1}
