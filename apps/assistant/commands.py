"""The commands rank 0 tells the other ranks, declared once.

Sharded (ranks.py), every rank runs the same MLX work on its share of the
model and of every cache, in the same order, and rank 0 alone decides what
that work is. Each operation on the model, the batch or a cache is a
command class here: its fields are its arguments, and `replay` is what a
follower rank runs when it hears it. On rank 0 the collaborators that do
the work tell the command first (`Replay.tell`), then run it; several of
them run the very method `replay` calls, so the ranks cannot drift apart.
On the wire a command is the tuple (class name, *fields), a short pickle
(distributed.share).

A cache dropped from an HTTP thread (a deleted conversation) is told with
the next command (`Replay.forget`): only the worker thread talks to the
ranks.
"""

import threading
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Tuple

COMMANDS: Dict[str, type] = {}  # class name -> command class


class Command:
    """An operation every rank runs alike."""

    def wire(self) -> tuple:
        return (type(self).__name__, *(getattr(self, f.name) for f in fields(self)))

    def replay(self, engine):
        """Run it on a follower rank (`engine`: that rank's Engine)."""
        raise NotImplementedError


def command(cls):
    cls = dataclass(frozen=True)(cls)
    COMMANDS[cls.__name__] = cls
    return cls


def decode(wire: tuple) -> Command:
    """The command `Command.wire` sent."""
    name, *args = wire
    return COMMANDS[name](*args)


@command
class Beat(Command):
    """Rank 0 is idle and alive (the watchdog's heartbeat)."""

    def replay(self, engine):
        pass


@command
class Stop(Command):
    """The server stops: followers leave their loop."""

    def replay(self, engine):
        pass


@command
class Forget(Command):
    """Drop these caches from memory; (id, deleted): delete the files too."""

    gone: List[Tuple[str, bool]]

    def replay(self, engine):
        engine.sessions.forget_shares(self.gone)


@command
class Open(Command):
    """Take the conversation's cache: in memory if rank 0 had it there
    (`resident`), else from this rank's saved share; the ranks agree on the
    tokens held."""

    cid: str
    resident: bool

    def replay(self, engine):
        engine.sessions.open(self.cid, self.resident)


@command
class Trim(Command):
    """Keep the first n tokens of the conversation's cache."""

    cid: str
    n: int

    def replay(self, engine):
        engine.sessions.trim(self.cid, engine.sessions.get(self.cid), self.n)


@command
class Fork(Command):
    """Start the conversation's cache from the first n tokens of another
    conversation's (a prompt that begins as that one's did)."""

    cid: str
    donor: str
    n: int

    def replay(self, engine):
        engine.sessions.fork(self.cid, engine.sessions.get(self.cid), self.donor, self.n)


@command
class Park(Command):
    """Drop these conversations' caches from memory (saved: loaded on use)."""

    cids: List[str]

    def replay(self, engine):
        engine.sessions.drop(self.cids)


@command
class Settle(Command):
    """Check a turn's cache against its tokens, gather its stats, save this
    rank's share."""

    cid: str

    def replay(self, engine):
        engine.sessions.save_share(self.cid)


@command
class Insert(Command):
    """The conversation's chat joins the batch with this prompt tail."""

    cid: str
    tail: List[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]

    def replay(self, engine):
        engine.scheduler.insert(self.cid, engine.sessions.get(self.cid), self.tail,
                                self.max_tokens, self.temperature, self.top_p, self.seed)


@command
class Step(Command):
    """`runs` steps of the batch, prompts prefilled `size` tokens a step."""

    size: int
    runs: int

    def replay(self, engine):
        engine.scheduler.replay_steps(self.size, self.runs)


@command
class End(Command):
    """A chat leaves the batch, its cache the conversation's (`removed`: taken
    out of the batch before it finished)."""

    uid: int
    cid: str
    removed: bool

    def replay(self, engine):
        engine.scheduler.replay_end(self.uid, self.cid, self.removed)


@command
class Drop(Command):
    """A chat that failed leaves the batch (`finished`: the batch ended it)."""

    uid: int
    finished: bool

    def replay(self, engine):
        engine.scheduler.drop(self.uid, self.finished)


@command
class Prefill(Command):
    """Prefill a chunk of a document into the conversation's cache."""

    cid: str
    chunk: List[int]

    def replay(self, engine):
        engine.documents.prefill(self.cid, engine.sessions.get(self.cid), self.chunk)


class Replay:
    """Rank 0's end of the command stream; nothing unsharded or on a follower
    (`loaded.link`: ranks.Link, set when the model is loaded)."""

    def __init__(self, loaded):
        self.loaded = loaded
        self._forgotten: List[Tuple[str, bool]] = []
        self._lock = threading.Lock()

    @property
    def leads(self) -> bool:
        link = self.loaded.link
        return link is not None and link.leads

    def tell(self, command: Command):
        """The other ranks run `command` too; first they drop the caches this
        rank forgot."""
        if not self.leads:
            return
        with self._lock:
            gone, self._forgotten = self._forgotten, []
        if gone:
            self.loaded.link.tell(Forget(gone))
        self.loaded.link.tell(command)

    def forget(self, cid: str, deleted: bool):
        """From any thread: the ranks drop this cache (and its files, if
        `deleted`) before the next command."""
        if self.loaded.link is not None:
            with self._lock:
                self._forgotten.append((cid, deleted))

    def fatal(self, error: BaseException) -> bool:
        """Whether the ranks cannot go on together after `error`."""
        return self.loaded.link is not None and self.loaded.link.fatal(error)
