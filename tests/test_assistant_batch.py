"""The assistant answers concurrent chats by continuous batching: concurrent
clients get their solo replies and usage; the memory budget holds as many
chats as the planner says, queues the next and refuses what never fits."""

import dataclasses
import threading

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from test_assistant import Assistant, ask

from mlx_kvq import sizing
from mlx_kvq.apps.assistant.engine import Engine, Job, Settings
from mlx_kvq.apps.assistant.errors import RequestError
from mlx_kvq.apps.assistant.store import Store

QUESTIONS = ["Name a color.", "What is two plus two?", "Say hello in French.",
             "Name an animal that lives in the sea."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    s = Assistant(tmp / "data", "--max-tokens", "12", log_file=tmp / "server.log")
    yield s
    s.stop()


def reply(client, question, stream):
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = ask(client, messages, max_tokens=12, temperature=0.0)
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens
    chunks = list(ask(client, messages, max_tokens=12, temperature=0.0, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens


def test_concurrent_clients_get_their_solo_replies(server):
    client = server.client()
    solo = [reply(client, q, stream=False) for q in QUESTIONS]
    out = [None] * len(QUESTIONS)
    go = threading.Barrier(len(QUESTIONS))

    def one(i):
        go.wait()
        out[i] = reply(server.client(), QUESTIONS[i], stream=i % 2 == 1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert out == solo  # text, prompt tokens and completion tokens of each
    assert all(text for text, _, _ in out)
    log = server.log()
    assert "Traceback" not in log


def run_jobs(engine, jobs):
    """Submit jobs together; per job its events in order, and the global order
    of ("start"|"done", job index) events."""
    order, lock, events = [], threading.Lock(), [[] for _ in jobs]

    def follow(i, job):
        for kind, data in job.stream(engine.alive):
            events[i].append((kind, data))
            if kind in ("start", "done", "error"):
                with lock:
                    order.append((kind, i))

    for job in jobs:
        engine.submit(job)
    threads = [threading.Thread(target=follow, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return events, order


def test_budget_holds_what_the_planner_says_and_queues_the_next(tmp_path):
    """A budget the planner sizes for exactly N chats of this length runs N
    together and keeps the N+1-th waiting until one ends; peak memory stays
    within it; a chat that can never fit is refused with what would fit."""
    n, max_tokens = 3, 24
    store = Store(tmp_path / "data")
    engine = Engine(Settings(kv="k4v4", max_tokens=max_tokens, queue_size=8), store)
    engine.start()
    try:
        msgs = [{"role": "user", "content": "Count from one to twenty."}]
        context = len(engine.encode(msgs, True)) + max_tokens
        b = engine.budget
        memory = b.need([context] * n)
        assert sizing.capacity(b.shape, b.spec, memory, context=context,
                             prefill_step=b.prefill_step) == n
        engine.budget = dataclasses.replace(engine.budget, memory=memory)
        jobs = [Job("chat", store.create(f"c{i}").id, msgs, max_tokens=max_tokens)
                for i in range(n + 1)]
        jobs.append(Job("chat", store.create("big").id, msgs, max_tokens=6000))
        mx.reset_peak_memory()
        events, order = run_jobs(engine, jobs)
        peak = mx.get_peak_memory()
    finally:
        engine.stop()
    err = [data for kind, data in events[-1] if kind == "error"]
    assert err and isinstance(err[0], RequestError) and err[0].code == "kv_budget_exceeded"
    assert "tokens fit" in err[0].message
    for ev in events[:-1]:
        done = [data for kind, data in ev if kind == "done"]
        assert done and done[0]["usage"]["completion_tokens"] > 0
    starts_before_first_done = [i for kind, i in order[:order.index(
        next(x for x in order if x[0] == "done"))] if kind == "start"]
    assert len(starts_before_first_done) == n  # the 4th waited for memory
    assert peak <= memory, (peak, memory)


def test_document_prefill_interleaves_with_a_running_chat(tmp_path):
    """A document is prefilled a chunk at a time between decode steps: the
    running chat streams while it fills; both complete, the document saved."""
    from mlx_kvq.commands.corpus import sample_text

    store = Store(tmp_path / "data")
    engine = Engine(Settings(kv="k4v4", max_tokens=8, prefill_step_size=128), store)
    engine.start()
    try:
        chat = Job("chat", store.create("chat").id,
                   [{"role": "user", "content": "Count from one to fifty."}], max_tokens=48)
        doc_cid = store.create("doc").id
        doc = Job("document", doc_cid, [{"role": "user", "content": sample_text()[:4000]}])
        engine.submit(chat)
        next(kind for kind, _ in chat.stream(engine.alive) if kind == "text")
        timeline, lock = [], threading.Lock()

        def follow(name, job):
            for kind, _ in job.stream(engine.alive):
                with lock:
                    timeline.append((name, kind))

        threads = [threading.Thread(target=follow, args=a) for a in (("chat", chat), ("doc", doc))]
        threads[0].start()
        engine.submit(doc)
        threads[1].start()
        for t in threads:
            t.join(300)
    finally:
        engine.stop()
    assert ("chat", "done") in timeline and ("doc", "done") in timeline
    doc_steps = [i for i, x in enumerate(timeline) if x == ("doc", "progress")]
    assert len(doc_steps) >= 3
    between = [x for x in timeline[doc_steps[0]:doc_steps[-1]] if x == ("chat", "text")]
    assert between  # the chat streamed while the document filled
    assert store.get(doc_cid).messages and engine.memory(doc_cid)["tokens"] > 500
