"""The conversations' caches in memory, on the worker thread.

A `Session` is a conversation's prompt cache and the token ids it holds.
`Sessions` keeps them least recently used first: `open` takes a
conversation's cache from memory, else from its saved file (refused or
unreadable: a new one, and a note for the reply), else new; `reuse` trims it
to the longest common prefix with the next prompt, or, when another idle
conversation's cache holds a longer prefix of it in its 16-bit parts (a new
chat that starts as others did: the chat template's system prompt, a short
question asked again), starts from a copy of that one's, as mlx_lm.server's
prompt cache does; `save` writes a finished
turn, messages first (`save_turn`) and then the cache (`save_cache`), so the
messages are never lost;
`make_room` parks the least recently used idle caches (they are saved after
every turn, so parking only drops them from memory).

Sharded, every rank keeps its own share of each cache: `open`, `trim`,
`settle` and parking are commands every rank runs (commands.py), and after
`open` the ranks agree on the tokens held, rebuilding the cache together if
any rank's saved share differs. HTTP threads only `forget` caches and read
the memory panel's `snapshot`, under the lock.
"""

import copy
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Tuple

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlx_kvq.cache import KVQCache

from .budget import to_park
from .commands import Fork, Open, Park, Settle, Trim
from .store import DEFAULT_TITLE, CacheRefused, NotFound, Store, pause, title_of

log = logging.getLogger("mlx_kvq.assistant")


@dataclass
class Session:
    """A conversation's cache in memory and the token ids it holds."""

    cache: list
    tokens: List[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of this cache on the rank holding the most of it (the one
        the budget sizes: see ranks.py), all of it on one machine."""
        ranks = self.stats.get("ranks")
        return max(r["nbytes"] for r in ranks) if ranks else \
            self.stats.get("cache_bytes", 0)


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _in_16_bits(cache: list, n: int) -> bool:
    """Whether every quantized layer holds its first n tokens in its 16-bit
    parts (sinks, residual): a copy trimmed to them is then exactly what a
    fresh prefill of those tokens holds, so a shared prefix changes no reply."""
    return all(c.n_body == 0 or n <= c.body_start for c in cache if isinstance(c, KVQCache))


def _extend(conv, messages: List[dict]):
    if not conv.messages and conv.title == DEFAULT_TITLE:  # name it after its start
        conv.title = title_of(messages)
    conv.messages.extend(messages)


class Sessions:
    """Caches of conversations in memory, least recently used first."""

    def __init__(self, loaded, store: Store, replay):
        self.loaded, self.store, self.replay = loaded, store, replay
        self._held: "OrderedDict[str, Session]" = OrderedDict()
        self.notes: Dict[str, str] = {}  # id -> why its saved cache was not used or saved
        self._lock = threading.Lock()

    # -- any thread -------------------------------------------------------

    def forget(self, cid: str, deleted: bool = False):
        """Drop the conversation's cache from memory (`deleted`: the
        conversation is gone; sharded, the other ranks delete their files)."""
        with self._lock:
            self._held.pop(cid, None)
            self.replay.forget(cid, deleted)
        self.notes.pop(cid, None)

    def snapshot(self, cid: str) -> Tuple[Optional[dict], int]:
        """(the conversation's cache stats if it is in memory, else None;
        bytes of all caches in memory)."""
        with self._lock:
            session = self._held.get(cid)
            return (dict(session.stats) if session else None,
                    sum(s.nbytes for s in self._held.values()))

    # -- worker -----------------------------------------------------------

    def get(self, cid: str) -> Optional[Session]:
        with self._lock:
            return self._held.get(cid)

    def open(self, cid: str, resident: Optional[bool] = None) -> Session:
        """The conversation's cache: in memory, else loaded from its saved
        file, else new. Sharded, every rank takes its own share and the
        ranks agree on the tokens held (`resident`: whether rank 0 had it in
        memory; the others load it when rank 0 did)."""
        with self._lock:
            if resident is False:
                self._held.pop(cid, None)
            session = self._held.get(cid)
        if resident is None:  # this rank decides
            resident = session is not None
        self.replay.tell(Open(cid, resident))
        if session is None:
            session = self._load(cid)
        with self._lock:
            self._held[cid] = session
            self._held.move_to_end(cid)
        link = self.loaded.link
        if link is not None and not link.agree_tokens(session.tokens):
            self.notes[cid] = ("The ranks' saved KV caches did not match; the cache was "
                               "rebuilt from the messages.")
            session.cache, session.tokens, resident = self.loaded.new_cache(), [], False
        if not resident:
            session.stats = self.loaded.stats(session.cache)
        return session

    def _load(self, cid: str) -> Session:
        loaded = self.loaded
        try:
            saved = self.store.load_cache(cid, loaded.model, loaded.fingerprint, loaded.specs)
        except Exception as e:  # refused, or unreadable: the messages rebuild it
            if not isinstance(e, CacheRefused):
                log.warning("conversation %s: saved KV cache unreadable", cid, exc_info=e)
            self.notes[cid] = (f"The saved KV cache was refused: {e}. The messages are "
                               "intact; the cache was rebuilt from them.")
            saved = None
        return Session(*saved) if saved is not None else Session(loaded.new_cache())

    def reuse(self, cid: str, session: Session, tokens: List[int], keep_last: bool,
              busy: Collection[str] = (), room: Optional[int] = None) -> int:
        """Trim the cache to its longest common prefix with `tokens`, or start
        it from the conversation in memory, not in `busy` (caches in use),
        whose cache shares the longest prefix with them, if longer (and holds
        at most `room` tokens, what the budget holds for this cache: the copy
        is whole until trimmed); the number of tokens it then holds."""
        limit = len(tokens) - 1 if keep_last else len(tokens)  # the last runs for logits
        n = min(common_prefix(session.tokens, tokens), limit)
        with self._lock:
            others = [(k, v) for k, v in reversed(self._held.items())
                      if k != cid and k not in busy]
        best, donor = n, None
        for k, other in others:  # most recent first
            m = min(common_prefix(other.tokens, tokens), limit)
            if m > best and (room is None or len(other.tokens) <= room) \
                    and can_trim_prompt_cache(other.cache) and _in_16_bits(other.cache, m):
                best, donor = m, k
        if donor is not None:
            return self.fork(cid, session, donor, best)
        return self.trim(cid, session, n)

    def fork(self, cid: str, session: Session, donor: str, n: int) -> int:
        """Replace the cache with a copy of the first n tokens of `donor`'s."""
        self.replay.tell(Fork(cid, donor, n))
        other = self.get(donor)
        session.cache, session.tokens = copy.deepcopy(other.cache), list(other.tokens)
        n = self._trim(session, n)
        session.stats = self.loaded.stats(session.cache)
        log.info("conversation %s: %d prompt tokens from conversation %s's cache", cid, n, donor)
        return n

    def trim(self, cid: str, session: Session, n: int) -> int:
        """Keep the first n tokens of the cache (all of them dropped if it
        cannot be trimmed); the number kept."""
        self.replay.tell(Trim(cid, n))
        return self._trim(session, n)

    def _trim(self, session: Session, n: int) -> int:
        drop = len(session.tokens) - n
        if drop:
            if can_trim_prompt_cache(session.cache):
                trim_prompt_cache(session.cache, drop)
            else:  # tokens were evicted (--max-kv-size): start over
                session.cache = self.loaded.new_cache()
                n = 0
            session.tokens = session.tokens[:n]
        return n

    def notice(self, cid: str, admitted: Optional[str]) -> Optional[str]:
        """What the reply tells about the conversation's cache."""
        return " ".join(filter(None, [self.notes.get(cid), admitted])) or None

    def make_room(self, need: int, memory: int, keep) -> List[str]:
        """Park the least recently used caches, other than those of the
        conversations in `keep`, until `need` bytes and the caches left fit
        `memory`; the conversations parked."""
        with self._lock:
            resident = [(k, v.nbytes) for k, v in self._held.items()
                        if k not in keep]
            parked = to_park(resident, need, memory)
            for k in parked:
                pause("park")
                del self._held[k]
                log.info("conversation %s: cache parked on disk to make room", k)
        if parked:
            self.replay.tell(Park(parked))
        return parked

    def settle(self, cid: str, session: Session):
        """A turn's cache, checked against its tokens, with its stats."""
        self.replay.tell(Settle(cid))
        offset = next(c.offset for c in session.cache if isinstance(c, KVQCache))
        if offset != len(session.tokens):  # a cache we cannot map to tokens is useless
            log.warning("conversation %s: cache holds %d tokens, expected %d; dropping it",
                        cid, offset, len(session.tokens))
            session.cache = self.loaded.new_cache()
            session.tokens = []
        session.stats = self.loaded.stats(session.cache)

    def save(self, job, new_messages: List[dict], session: Session):
        """Save the turn: the messages, then the cache (the messages are never lost)."""
        self.save_turn(job, new_messages, session)
        self.save_cache(job.conversation, session)

    def save_turn(self, job, new_messages: List[dict], session: Session):
        """Settle the turn's cache and save its messages: once this returns the
        turn survives a crash (its cache is saved by `save_cache`, after)."""
        cid = job.conversation
        self.settle(cid, session)
        if job.title is not None:
            self.store.create(job.title, cid=cid, source="api", exist_ok=True)
        self.store.update(cid, lambda c: _extend(c, new_messages))

    def save_cache(self, cid: str, session: Session):
        """Save the conversation's cache (after its messages: a crash before
        it leaves the old cache, which resumes the next turn in part or is
        refused and rebuilt). A cache that cannot be saved gets a note; a
        conversation deleted meanwhile raises NotFound."""
        try:
            self._save_cache(cid, session)
            self.notes.pop(cid, None)
        except NotFound:
            raise
        except Exception as e:
            log.exception("conversation %s: could not save the KV cache", cid)
            self.notes[cid] = (f"The KV cache could not be saved ({e}); it is rebuilt "
                               "from the messages after a restart.")

    def _save_cache(self, cid: str, session: Session):
        self.store.save_cache(cid, session.cache, session.tokens, self.loaded.fingerprint,
                              session.stats)

    # -- a follower rank (commands.py) --------------------------------------

    def drop(self, cids: List[str]):
        with self._lock:
            for cid in cids:
                self._held.pop(cid, None)

    def forget_shares(self, gone: List[Tuple[str, bool]]):
        """Drop these caches; (id, deleted): delete this rank's files too."""
        self.drop([cid for cid, _ in gone])
        for cid, deleted in gone:
            if deleted and self.store.exists(cid):
                self.store.delete(cid)

    def save_share(self, cid: str):
        """Settle a turn's cache and save this rank's share, for the next
        time the conversation is loaded."""
        session = self.get(cid)
        self.settle(cid, session)
        try:
            self.store.create(cid=cid, exist_ok=True)
            self._save_cache(cid, session)
        except Exception:
            log.exception("rank %d: conversation %s: could not save the KV cache",
                          self.loaded.link.shard.rank, cid)
