"""Conversations on disk.

    <data_dir>/conversations/<id>/
        conversation.json   title, times and messages, rewritten after every turn
        cache.safetensors   the quantized prompt cache (mlx_kvq.persist: the KV
                            spec and model fingerprint are in its metadata)
        cache.json          sidecar: size and sha256 of cache.safetensors, the
                            token ids it holds, its memory stats

Every file goes to a temporary name, is flushed, fsynced and renamed over the
old one, so a crash leaves the old version or the new one. The sidecar is
written after the cache file: a crash in between leaves a checksum mismatch,
and the cache is refused and rebuilt from the messages.

Fault points: with $MLX_KVQ_ASSISTANT_PAUSE naming a file that holds
"point" or "point:n" (conversation-save, cache-save, sidecar-save, park),
the process logs "paused at <point>" and hangs the n-th time (default the
first) it gets there after the file named it, so a crash harness
(faults.py) can kill it at that moment.
"""

import copy
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from mlx_kvq import persist
from mlx_kvq.files import atomic_write, sha256_file, write_json
from mlx_kvq.cache import KVQCache

CONVERSATION, CACHE, SIDECAR = "conversation.json", "cache.safetensors", "cache.json"
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
TITLE_CHARS = 200
DEFAULT_TITLE = "New conversation"

log = logging.getLogger("mlx_kvq.assistant")


PAUSE_ENV = "MLX_KVQ_ASSISTANT_PAUSE"
_reached = {}  # fault point -> times reached since it was armed


def pause(point: str):
    """Hang here if the file named by $MLX_KVQ_ASSISTANT_PAUSE arms this point
    and this is its n-th time since; a no-op without that variable."""
    path = os.environ.get(PAUSE_ENV)
    if not path:
        return
    try:
        want = Path(path).read_text().strip()
    except OSError:
        want = ""
    name, _, nth = want.partition(":")
    if name != point:
        _reached.pop(point, None)
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        log.warning("paused at %s", point)
        while True:
            time.sleep(3600)


class NotFound(KeyError):
    pass


class CacheRefused(ValueError):
    """A saved cache that cannot be used; str() says why."""


def validate_id(cid) -> str:
    if not isinstance(cid, str) or not ID_PATTERN.fullmatch(cid):
        raise ValueError(
            "a conversation id is 1-64 characters of letters, digits, '-' and '_'"
        )
    return cid


def new_id() -> str:
    return uuid.uuid4().hex


def clean_title(title) -> str:
    if not isinstance(title, str) or not title.strip():
        raise ValueError("title must be a non-empty string")
    return " ".join(title.split())[:TITLE_CHARS]


def title_of(messages: List[dict]) -> str:
    """A title from the first user message."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return " ".join(first.split())[:60] or DEFAULT_TITLE


@dataclass
class Conversation:
    id: str
    title: str
    messages: List[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    source: str = "page"  # "page" or "api": who started it

    def summary(self) -> dict:
        d = asdict(self)
        d["messages"] = len(self.messages)
        return d


class Store:
    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()
        self.dir = self.root / "conversations"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._checked = {}  # cid -> (file identity, problem): check_cache memo
        self._conversations = {}
        for folder in sorted(self.dir.iterdir()):
            if folder.is_dir() and ID_PATTERN.fullmatch(folder.name):
                self._load(folder)

    def _load(self, folder: Path):
        for tmp in folder.glob(".*.tmp*"):  # left by a crash mid-write
            tmp.unlink(missing_ok=True)
        try:
            data = json.loads((folder / CONVERSATION).read_text(encoding="utf-8"))
            conv = Conversation(**data)
            if conv.id != folder.name:
                raise ValueError(f"id {conv.id!r} does not match the folder")
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as e:
            # Left on disk untouched for the user to inspect.
            log.error("skipping conversation folder %s: unreadable %s (%s)",
                      folder, CONVERSATION, e)
            return
        self._conversations[conv.id] = conv

    def folder(self, cid) -> Path:
        path = (self.dir / validate_id(cid)).resolve()
        if path.parent != self.dir:
            raise ValueError(f"conversation id {cid!r} escapes the data dir")
        return path

    # -- conversations ----------------------------------------------------

    def list(self) -> List[Conversation]:
        with self._lock:
            convs = sorted(self._conversations.values(), key=lambda c: -c.updated)
            return [copy.deepcopy(c) for c in convs]

    def exists(self, cid) -> bool:
        with self._lock:
            return cid in self._conversations

    def get(self, cid) -> Conversation:
        with self._lock:
            if cid not in self._conversations:
                raise NotFound(cid)
            return copy.deepcopy(self._conversations[cid])

    def create(self, title: Optional[str] = None, cid: Optional[str] = None,
               source: str = "page", exist_ok: bool = False) -> Conversation:
        with self._lock:
            cid = validate_id(cid) if cid is not None else new_id()
            if cid in self._conversations:
                if exist_ok:
                    return copy.deepcopy(self._conversations[cid])
                raise ValueError(f"conversation {cid} already exists")
            conv = Conversation(cid, clean_title(title or DEFAULT_TITLE),
                                source=source)
            self.folder(cid).mkdir(exist_ok=True)
            self._write(conv)
            self._conversations[cid] = conv
            return copy.deepcopy(conv)

    def update(self, cid, change: Callable[[Conversation], None]) -> Conversation:
        """Apply `change` to the conversation and save it."""
        with self._lock:
            if cid not in self._conversations:
                raise NotFound(cid)
            conv = copy.deepcopy(self._conversations[cid])
            change(conv)
            conv.updated = time.time()
            self._write(conv)
            self._conversations[cid] = conv
            return copy.deepcopy(conv)

    def delete(self, cid):
        with self._lock:
            if self._conversations.pop(cid, None) is None:
                raise NotFound(cid)
            self._checked.pop(cid, None)
            shutil.rmtree(self.folder(cid), ignore_errors=True)

    def _write(self, conv: Conversation):
        pause("conversation-save")
        write_json(self.folder(conv.id) / CONVERSATION, asdict(conv))

    # -- caches -------------------------------------------------------------

    def save_cache(self, cid, cache, tokens, fingerprint: str, stats: dict):
        folder = self.folder(cid)
        digest = {}

        def write(tmp):
            persist.save_prompt_cache(tmp, cache, fingerprint=fingerprint)
            digest.update(size=tmp.stat().st_size, sha256=sha256_file(tmp))
            pause("cache-save")  # the new cache is in its temporary file

        with self._lock:  # serialized with delete()
            if cid not in self._conversations:
                raise NotFound(cid)
            atomic_write(folder / CACHE, write)
            pause("sidecar-save")  # the new cache is in place, its sidecar is old
            specs = sorted({str(c.spec) for c in cache if isinstance(c, KVQCache)})
            write_json(folder / SIDECAR, {
                **digest, "model": fingerprint, "spec": specs, "tokens": list(tokens),
                "stats": stats, "saved": time.time(),
            })

    def cache_info(self, cid) -> Optional[dict]:
        """The sidecar of the saved cache, or None if there is none."""
        folder = self.folder(cid)
        if not (folder / CACHE).exists() and not (folder / SIDECAR).exists():
            return None
        try:
            info = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def check_cache(self, cid, fingerprint: str, specs: List[str]) -> Optional[str]:
        """Why the saved cache cannot be used, without loading it (None if it
        can, or if there is none): checksum sidecar, size, sha256, model, spec."""
        folder = self.folder(cid)
        with self._lock:  # not while save_cache is halfway through
            ident = tuple((s.st_size, s.st_mtime_ns) if (s := _stat(f)) else None
                          for f in (folder / CACHE, folder / SIDECAR))
            memo = self._checked.get(cid)
            if memo and memo[0] == ident:
                return memo[1]
            problem = self._check(folder, fingerprint, specs)
            self._checked[cid] = (ident, problem)
        if problem:
            log.warning("conversation %s: saved KV cache refused: %s", cid, problem)
        return problem

    def _check(self, folder: Path, fingerprint: str, specs: List[str]) -> Optional[str]:
        info = self.cache_info(folder.name)
        if info is None:
            return None
        if not (folder / CACHE).exists():
            return "the cache file is missing"
        if not {"size", "sha256", "tokens", "model", "spec"} <= info.keys():
            return "its checksum sidecar (cache.json) is missing or unreadable"
        size = (folder / CACHE).stat().st_size
        if size != info["size"]:
            return (f"the file is truncated or damaged ({size} bytes on disk, "
                    f"{info['size']} written)")
        if sha256_file(folder / CACHE) != info["sha256"]:
            return "the file is damaged (sha256 checksum mismatch)"
        if info["model"] != fingerprint:
            return (f"it was made with another model (fingerprint {info['model']}, "
                    f"this model is {fingerprint})")
        if info["spec"] != list(specs):
            return (f"it was made with KV spec {', '.join(info['spec'])}, the server "
                    f"runs {', '.join(specs)}")
        return None

    def load_cache(self, cid, model, fingerprint: str, specs: List[str]):
        """(cache, token ids) of the saved cache, or None if there is none;
        CacheRefused if it is damaged or made for another model or specs
        (sorted labels of its quantized layers)."""
        problem = self.check_cache(cid, fingerprint, specs)
        if problem:
            raise CacheRefused(problem)
        info = self.cache_info(cid)
        if info is None:
            return None
        try:
            cache = persist.load_prompt_cache(self.folder(cid) / CACHE, model=model,
                                              spec=specs[0] if len(specs) == 1 else None,
                                              fingerprint=fingerprint)
        except ValueError as e:
            log.warning("conversation %s: saved KV cache refused: %s", cid, e)
            raise CacheRefused(str(e)) from e
        tokens = info["tokens"]
        offsets = {c.offset for c in cache if isinstance(c, KVQCache)}
        if offsets != {len(tokens)}:
            raise CacheRefused(f"it holds {sorted(offsets)} tokens, its sidecar lists "
                               f"{len(tokens)}")
        return cache, tokens


def _stat(path: Path):
    try:
        return path.stat()
    except FileNotFoundError:
        return None
