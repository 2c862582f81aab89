"""The model and the conversations' caches: the engine behind the server.

One worker thread runs every MLX operation (loading, prefill, generation,
cache loads and saves); HTTP threads submit jobs to a bounded queue and read
their events (jobs.py). `Engine` owns that thread and its loop, and hands
the work to collaborators with one job each:

- loaded.py: the model, its tokenizer and KV cache spec, the memory budget;
- sessions.py: conversations' caches in memory (least recently used first),
  loaded from and saved to the store, trimmed to a prompt, parked;
- admission.py: whether a job fits the budget beside the running work
  (refused if it cannot fit even alone, else waits or starts), and the
  memory panel;
- scheduler.py: the running batch of chats (continuous batching in mlx-lm's
  BatchGenerator over quantized caches; prompts prefilled in bounded chunks
  interleaved with decode steps, up to --decode-concurrency chats);
- documents.py: a document prefilled one --prefill-step-size chunk between
  decode steps;
- commands.py: the operations other ranks replay, declared once.

Each turn of the loop takes new jobs, starts the waiting ones that can start
(oldest first), prefills a document chunk and steps the batch. A chat that
ends (length, stop token or string, client gone) leaves the batch with its
cache, which is saved and kept as the conversation's cache. Caches of
recently used conversations stay in memory within the budget; the others
are parked (they are saved after every turn) and loaded back on use.

Sharded over several ranks (--sharding under mlx.launch), this engine runs
on every rank: rank 0 decides and tells the others each operation on the
model or a cache (commands.Replay), which they run on their shares
(ranks.follow).
"""

import queue
import threading
from typing import Dict, List, Tuple

import mlx.core as mx

from .admission import Admission
from .commands import Beat, Replay, Stop
from .documents import Documents
from .errors import RequestError, busy
from .jobs import Job, StopText, fail
from .loaded import Loaded, Settings
from .scheduler import Scheduler
from .sessions import Sessions, common_prefix
from .store import Store

__all__ = ["Engine", "Job", "Settings", "StopText", "common_prefix"]


def _loaded(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.loaded, name), doc=doc)


class Engine:
    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self.loaded = Loaded(settings)
        self.replay = Replay(self.loaded)
        self.sessions = Sessions(self.loaded, store, self.replay)
        self.admission = Admission(self.loaded, self.sessions, store, self._holding)
        self.scheduler = Scheduler(self.loaded, self.sessions, self.admission, self.replay)
        self.documents = Documents(self.loaded, self.sessions, self.admission, self.replay)
        self.jobs = queue.Queue()
        self.waiting: List[Job] = []  # taken from `jobs`, not started yet (worker only)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="mlx_kvq-worker",
                                        daemon=True)

    model = _loaded("model", "The MLX model (set at load).")
    tokenizer = _loaded("tokenizer", "Its tokenizer (set at load).")
    model_id = _loaded("model_id", "The model's folder or hub id, as served.")
    specs = _loaded("specs", "The KV specs of the cache's layers, sorted.")
    scheme = _loaded("scheme", "The KV cache scheme in words.")
    link = _loaded("link", "Sharded: this rank's ranks.Link; else None.")

    @property
    def budget(self):
        """The memory budget (budget.Budget), sized at load."""
        return self.loaded.budget

    @budget.setter
    def budget(self, budget):
        self.loaded.budget = budget

    def encode(self, messages: List[dict], add_generation_prompt: bool) -> List[int]:
        return self.loaded.encode(messages, add_generation_prompt)

    # -- any thread -------------------------------------------------------

    def start(self):
        """Start the worker and wait until the model is loaded."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 60.0):
        """Stop taking jobs, end the running chats (their replies so far are saved)."""
        self._stopping.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> Job:
        if self._stopping.is_set():
            raise busy("the server is shutting down")
        if self.queued() >= self.settings.queue_size:
            raise busy(f"the generation queue is full ({self.settings.queue_size} requests "
                       "waiting); try again shortly")
        self.jobs.put(job)
        return job

    def queued(self) -> int:
        """Requests waiting to start."""
        return self.jobs.qsize() + len(self.waiting)

    def peak_memory(self) -> int:
        """Peak bytes MLX has held since the start (what --memory bounds)."""
        return mx.get_peak_memory()

    def running(self) -> int:
        """Chats in the batch and documents being prefilled."""
        return len(self.scheduler.turns) + (self.documents.filling is not None)

    def forget(self, cid: str, deleted: bool = False):
        """Drop the conversation's cache from memory (`deleted`: the
        conversation is gone; sharded, the other ranks delete their files)."""
        self.sessions.forget(cid, deleted)

    def memory(self, cid: str) -> dict:
        """The memory panel of a conversation."""
        return self.admission.panel(cid)

    def token_limit(self) -> Tuple[int, str]:
        """(tokens one conversation may reach, what limits it)."""
        return self.admission.token_limit()

    # -- worker -----------------------------------------------------------

    def load(self):
        """Load the model and make the batch (the worker does; a follower
        rank, ranks.follow)."""
        self.loaded.load()
        self.scheduler.open()

    def _run(self):
        try:
            self.load()
        except Exception as e:
            self._error = e
            return
        finally:
            self._ready.set()
        if self.link is None:
            self._serve()
        else:
            self.link.lead(self._serve, self._abandon)

    def _serve(self):
        scheduler, documents = self.scheduler, self.documents
        while not self._stopping.is_set():
            idle = not scheduler.turns and documents.filling is None
            self._take(block=idle)
            if idle:
                self.replay.tell(Beat())
            self._start_waiting()
            if documents.filling is not None:
                documents.fill()
            if scheduler.turns:
                scheduler.step(others_wait=bool(self.waiting or documents.filling
                                                or self.jobs.qsize()))
        documents.abandon()
        scheduler.cancel_all()
        scheduler.close()
        self.replay.tell(Stop())
        for job in self.waiting + self._drain():
            job.emit("error", busy("the server is shutting down"))

    def _abandon(self, error: RequestError):
        """Answer every job with `error` (the ranks cannot go on)."""
        self._stopping.set()
        for job in [t.job for t in self._running()] + self.waiting + self._drain():
            job.emit("error", error)

    def _running(self) -> list:
        """Turns and the filling document: what holds memory and a conversation."""
        f = self.documents.filling
        return list(self.scheduler.turns.values()) + ([f] if f is not None else [])

    def _holding(self) -> Dict[str, int]:
        """{conversation: tokens its cache may reach} of the running work."""
        return {t.job.conversation: t.kv_context for t in self._running()}

    def _drain(self) -> List[Job]:
        out = []
        while True:
            try:
                out.append(self.jobs.get_nowait())
            except queue.Empty:
                return out

    def _take(self, block: bool):
        """Move submitted jobs to `waiting` (waiting a little for one when idle)."""
        if block and not self.waiting:
            try:
                self.waiting.append(self.jobs.get(timeout=0.5))
            except queue.Empty:
                return
        self.waiting.extend(self._drain())

    def _start_waiting(self):
        """Start the waiting jobs that can start now, oldest first. A job waits
        while its conversation is busy; one the budget cannot hold yet keeps
        the jobs behind it waiting too (none overtakes it forever)."""
        busy_ids = set(self._holding())
        for job in list(self.waiting):
            if job.cancelled.is_set():
                self.waiting.remove(job)
                job.emit("error", RequestError(499, "the client left before it started"))
                continue
            if job.conversation in busy_ids or (job.kind == "document"
                                                and self.documents.filling):
                busy_ids.add(job.conversation)  # its later jobs wait behind it
                continue
            if job.kind == "chat" and self.scheduler.full():
                break
            try:
                begin = self.scheduler.begin if job.kind == "chat" else self.documents.begin
                started = begin(job)
            except Exception as e:
                fail(job, e, self.forget, self.replay.fatal(e))
                started = True
            if not started:
                break
            self.waiting.remove(job)
            busy_ids.add(job.conversation)
