"""Admission: whether a chat or a document may start now, and the memory panel.

Before a job starts, the planner (budget.py) sizes the caches of every
running chat plus its own, each at the length its turn may reach, against
the memory budget: a job that cannot fit even alone is refused with what
would make it fit (or, beyond the model's trained context without
--max-kv-size, with how to go on); one that fits alone waits until running
chats finish; one that fits parks idle caches to make room, takes its
conversation's cache and trims it to what the new prompt shares with it.
The memory panel reports the same budget for one conversation.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from .errors import RequestError
from .sessions import Session


@dataclass
class Admitted:
    """A job that may start: its conversation's cache and the tokens it
    already holds of the job's `tokens`."""

    session: Session
    tokens: List[int]
    cached: int
    kv_context: int  # tokens its cache may reach: what the budget holds for it


class Admission:
    def __init__(self, loaded, sessions, store, running: Callable[[], Dict[str, int]]):
        """`running()`: {conversation: tokens its cache may reach} of the
        chats and the document that hold memory now."""
        self.loaded, self.sessions, self.store, self.running = loaded, sessions, store, running

    def start(self, job, reply_room: int, what: Callable[[int], str],
              generate: bool) -> Optional[Admitted]:
        """Admit `job` and emit its "start" event; None while it does not fit
        beside the running work (it waits). `generate`: the job is answered
        (its prompt ends with the generation prompt, and its last token runs
        again to give the first logits); `what(tokens)` names it in messages."""
        cid = job.conversation
        if job.tokens is None:  # kept while the job waits for memory
            history = [] if job.title is not None else self.store.get(cid).messages
            job.tokens = self.loaded.encode(history + job.messages, generate)
        tokens = job.tokens
        admitted = self.admit(cid, len(tokens) + reply_room, what(len(tokens)), reply_room)
        if admitted is None:
            return None
        notice, kv_context = admitted
        session = self.sessions.open(cid)
        cached = self.sessions.reuse(cid, session, tokens, keep_last=generate,
                                     busy=self.running(), room=kv_context)
        job.emit("start", {"prompt_tokens": len(tokens), "cached_tokens": cached,
                           "notice": self.sessions.notice(cid, notice)})
        return Admitted(session, tokens, cached, kv_context)

    def admit(self, cid: str, context: int, what: str,
              reply_room: int) -> Optional[Tuple[Optional[str], int]]:
        """Refuse a turn that cannot fit even alone before anything is
        allocated; None while it does not fit beside the running chats; else
        park idle caches to make room and return (notice for the reply, or
        None; the tokens its cache may reach)."""
        s, b = self.loaded.settings, self.loaded.budget
        trained = b.shape.trained_context
        beyond = bool(trained) and context > trained
        if beyond and not s.max_kv_size:
            raise RequestError(
                400, f"{what} needs {context} tokens, beyond the model's trained context "
                f"of {trained} tokens. Start a new conversation, lower max_tokens, or "
                "restart the server with --max-kv-size N to keep only the first and "
                "the most recent N tokens.", code="context_length_exceeded")
        notice = None
        kv_context = context
        if s.max_kv_size and context > s.max_kv_size:
            kv_context = s.max_kv_size
            notice = (f"This conversation reaches {context} tokens"
                      + (f", beyond the model's trained context of {trained}" if beyond
                         else "")
                      + f": the KV cache keeps the first {self.loaded.spec.sinks} and the "
                      f"most recent {s.max_kv_size} tokens (--max-kv-size); older tokens "
                      "are dropped.")
        if b.need([kv_context]) > b.memory:
            raise RequestError(400, b.refusal(kv_context, what, reply_room),
                               code="kv_budget_exceeded")
        running = self.running()
        # A batch allocates every row at its longest row's size.
        need = b.need([max([kv_context, *running.values()])] * (len(running) + 1))
        if need > b.memory:
            return None
        if self.sessions.make_room(need, b.memory, keep={cid, *running}):
            mx.clear_cache()  # the parked caches' buffers go back to the system
        return notice, kv_context

    def token_limit(self) -> Tuple[int, str]:
        """(tokens one conversation may reach, what limits it)."""
        budget = self.loaded.budget
        fit, trained = budget.max_tokens(), budget.shape.trained_context
        if trained and trained < fit and not self.loaded.settings.max_kv_size:
            return trained, "trained context"
        return fit, "memory budget"

    def panel(self, cid: str) -> dict:
        """The memory panel of a conversation."""
        loaded = self.loaded
        stats, held = self.sessions.snapshot(cid)
        resident = stats is not None
        note = self.sessions.notes.get(cid)
        if stats is None:
            problem = self.store.check_cache(cid, loaded.fingerprint, loaded.specs)
            if problem:
                note = (f"The saved KV cache is refused: {problem}. The messages are "
                        "intact; the cache is rebuilt from them on the next turn.")
            info = None if problem else self.store.cache_info(cid)
            stats = (info or {}).get("stats")
        stats = stats or {"tokens": 0, "cache_bytes": 0, "fp16_bytes": 0}
        b = loaded.budget
        workspace = b.workspace(stats["tokens"] + loaded.settings.max_tokens)
        fit, limited_by = self.token_limit()
        return {
            **stats,
            "resident": resident,
            "budget": b.memory,
            "weights": b.shape.weight_bytes,
            "workspace": workspace,
            "resident_bytes": held,
            "budget_left": b.memory - b.shape.weight_bytes - workspace - held,
            "max_tokens": fit,
            "limited_by": limited_by,
            "tokens_left": max(0, fit - stats["tokens"]),
            "spec": ", ".join(loaded.specs),
            "scheme": loaded.scheme,
            "ranks": stats.get("ranks"),
            "note": note,
        }
