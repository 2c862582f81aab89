"""What a request asks of the engine, and how it is answered.

A `Job` is made by an HTTP thread and read by it through `stream`; the
worker thread emits its events ("start", "progress", "text", then "done" or
"error") into the job's own queue, so no client ever holds the worker.
`StopText` cuts a streamed reply at its stop strings; `fail` answers a job
that went wrong with an error that says what happened.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from .errors import RequestError
from .store import NotFound

log = logging.getLogger("mlx_kvq.assistant")


@dataclass
class Job:
    kind: str  # "chat": answer the messages; "document": prefill them, no answer
    conversation: str
    messages: List[dict]  # appended to the conversation's messages
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None
    title: Optional[str] = None  # set: a new conversation, created when the turn is saved
    submitted: float = field(default_factory=time.perf_counter)
    tokens: Optional[List[int]] = None  # the conversation encoded, once it may start
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, data=None):
        self.events.put((kind, data))

    def stream(self, alive, gone=None):
        """(kind, data) events up to and including "done" or "error". `gone()`
        is asked about twice a second whether the client left: then the job is
        cancelled (its events still end with "done" or "error")."""
        checked = time.monotonic()
        while True:
            try:
                kind, data = self.events.get(timeout=0.5)
            except queue.Empty:
                kind = None
                if not alive():
                    yield "error", RequestError(500, "the generation worker stopped")
                    return
            if gone is not None and not self.cancelled.is_set() and (
                    time.monotonic() - checked >= 0.5):
                checked = time.monotonic()
                if gone():
                    log.info("conversation %s: the client left; its %s is cancelled",
                             self.conversation, self.kind)
                    self.cancelled.set()
            if kind is None:
                continue
            yield kind, data
            if kind in ("done", "error"):
                return


class StopText:
    """Cuts generated text at the first stop string. Text that could begin a
    stop string is held back, so nothing streamed is ever taken back."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> Tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def fail(job: Job, e: Exception, forget: Callable[[str], None], fatal: bool = False):
    """Answer `job` with what went wrong. `forget(cid)` drops its
    conversation's cache from memory where it may be half updated; `fatal`:
    the ranks cannot go on after `e`, which is raised instead."""
    if fatal:
        raise e
    if isinstance(e, RequestError):
        job.emit("error", e)
    elif isinstance(e, NotFound):
        forget(job.conversation)
        job.emit("error", RequestError(404, f"conversation {job.conversation} was deleted"))
    else:
        log.error("conversation %s: %s job failed", job.conversation, job.kind, exc_info=e)
        forget(job.conversation)  # its cache may be half updated
        job.emit("error", RequestError(500, f"internal error: {type(e).__name__}: {e}"))
