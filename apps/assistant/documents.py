"""Documents added to a conversation: prefilled into its cache, no reply.

One document at a time is prefilled, one --prefill-step-size chunk between
the batch's steps, so running chats keep streaming; the client gets a
"progress" event per chunk. Complete, the document's messages and the cache
are saved as after a turn. A document that fails or whose client leaves is
not added, and its half-filled cache is forgotten (the saved one stays).
Sharded, each chunk is a command every rank runs (commands.py).
"""

from dataclasses import dataclass
from typing import List, Optional

from mlx_kvq.integration import prefill_chunk

from .admission import Admission
from .commands import Prefill
from .errors import RequestError, busy
from .jobs import Job, fail
from .ranks import OutOfStep
from .sessions import Session


@dataclass
class Filling:
    """A document being prefilled, one chunk between decode steps."""

    job: Job
    session: Session
    tokens: List[int]
    cached: int
    done: int  # tokens of `tokens` in the cache
    kv_context: int


class Documents:
    def __init__(self, loaded, sessions, admission: Admission, replay):
        self.loaded, self.sessions, self.admission, self.replay = (
            loaded, sessions, admission, replay)
        self.filling: Optional[Filling] = None  # the document being prefilled

    def begin(self, job: Job) -> bool:
        """Start prefilling the document; False while the budget cannot hold
        it beside the running chats."""
        room = self.loaded.settings.max_tokens
        admitted = self.admission.start(
            job, room, lambda n: f"this conversation with the document ({n} tokens, plus "
            f"{room} for a reply)", generate=False)
        if admitted is None:
            return False
        a = admitted
        self.filling = Filling(job, a.session, a.tokens, a.cached, a.cached, a.kv_context)
        return True

    def fill(self):
        """Prefill the next chunk of the document; save it when complete."""
        f, step = self.filling, self.loaded.settings.prefill_step_size
        try:
            if f.job.cancelled.is_set():
                raise RequestError(499, "the client left before the document was added")
            chunk = f.tokens[f.done:f.done + step]
            if chunk:
                self.prefill(f.job.conversation, f.session, chunk)
                f.done += len(chunk)
                f.job.emit("progress", {"done": f.done, "total": len(f.tokens)})
            if f.done < len(f.tokens):
                return
            self.filling = None
            self.sessions.save(f.job, f.job.messages, f.session)
        except Exception as e:
            self.filling = None
            self.sessions.forget(f.job.conversation)  # its cache is half filled
            fail(f.job, e, self.sessions.forget, self.replay.fatal(e))
            return
        f.job.emit("done", {"prompt_tokens": len(f.tokens), "cached_tokens": f.cached,
                            "memory": self.admission.panel(f.job.conversation)})

    def prefill(self, cid: str, session: Session, chunk: List[int]):
        self.replay.tell(Prefill(cid, chunk))
        try:
            prefill_chunk(self.loaded.model, session.cache, chunk)
        except Exception as e:
            if self.loaded.link is not None and not self.replay.fatal(e):
                raise OutOfStep(f"a prefill step failed: {type(e).__name__}: {e}") from e
            raise
        session.tokens = session.tokens + list(chunk)

    def abandon(self):
        """The server stops: the document is not added."""
        if self.filling is not None:
            self.sessions.forget(self.filling.job.conversation)
            self.filling.job.emit("error", busy("the server is shutting down"))
