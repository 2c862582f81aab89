"""The model and the conversations' caches.

One worker thread runs every MLX operation (loading, prefill, generation,
cache loads and saves); HTTP threads submit jobs to a bounded queue and read
their events. Chats are answered by continuous batching in mlx-lm's
BatchGenerator over quantized caches (mlx_kvq.KVQBatchCache): a new chat
joins the running batch between decode steps, its prompt prefilled in
bounded chunks interleaved with decoding, up to --decode-concurrency chats;
a document is prefilled one --prefill-step-size chunk between decode steps.
Before a chat joins, the planner sizes the caches of every running chat
plus its own against the memory budget: one that cannot fit even alone is
refused; one that fits alone waits until running chats finish. A chat that
ends (length, stop token or string, client gone) leaves the batch with its
cache extracted, saved and kept as the conversation's cache. Caches of
recently used conversations stay in memory within the budget; the others
are parked (they are saved after every turn) and loaded back on use.

Sharded over several ranks (--sharding under mlx.launch), this engine runs
on every rank: rank 0 decides and tells the others each operation on the
model or a cache (`_tell`), which they run on their shares (ranks.py).
"""

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_kvq import distributed, make_prompt_cache, persist, shapes, sizing, units
from mlx_kvq.integration import prefill_chunk
from mlx_kvq.cache import KVQCache
from mlx_kvq.models import DEFAULT_MODEL, load
from mlx_kvq.report import kv_stats
from mlx_kvq.spec import DEFAULT_PRESET, parse_spec

from .budget import Budget, to_park
from .errors import RequestError, busy
from .ranks import Link, OutOfStep
from .store import DEFAULT_TITLE, CacheRefused, NotFound, Store, pause, title_of

log = logging.getLogger("mlx_kvq.assistant")
# Sharded: decode steps run per command while no chat prefills and nothing
# waits (each command is a sync of all ranks; a new request waits at most this
# many steps to join).
STEPS_PER_COMMAND = 8


@dataclass
class Settings:
    model: Optional[str] = None  # folder or hub id; None: the embedded model
    kv: Optional[str] = None  # None: the model's baked plan, else the default preset
    memory: Optional[int] = None  # bytes; None: half of this machine's RAM
    max_tokens: int = 512
    temp: float = 0.0
    top_p: float = 1.0
    max_kv_size: Optional[int] = None
    prefill_step_size: int = 2048
    queue_size: int = 8
    decode_concurrency: int = 32  # chats decoded together
    prompt_concurrency: int = 8  # prompts prefilled together
    sharding: Optional[str] = None  # under mlx.launch: "tensor" or "pipeline" (ranks.py)
    peer_timeout: float = 120.0  # sharded: seconds without progress before a rank exits


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


@dataclass
class Turn:
    """A chat being answered in the running batch."""

    job: Job
    session: Session
    prompt: List[int]
    cached: int
    kv_context: int  # tokens its cache may reach: what the budget holds for it
    detokenizer: object
    stops: StopText
    reply: List[str] = field(default_factory=list)
    generated: int = 0
    first_token: Optional[float] = None


@dataclass
class Filling:
    """A document being prefilled, one chunk between decode steps."""

    job: Job
    session: Session
    tokens: List[int]
    cached: int
    done: int  # tokens of `tokens` in the cache
    kv_context: int


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_messages(messages: List[dict]) -> List[dict]:
    """Messages as the chat template takes them (the page's extra keys dropped)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _extend(conv, messages: List[dict]):
    if not conv.messages and conv.title == DEFAULT_TITLE:  # name it after its start
        conv.title = title_of(messages)
    conv.messages.extend(messages)


class Engine:
    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        # The spec asked for; set at load to the default preset or, for a
        # calibrated model folder, None: the plan baked into it.
        self.cache_spec = parse_spec(settings.kv) if settings.kv else None
        self.jobs = queue.Queue()
        self.waiting: List[Job] = []  # taken from `jobs`, not started yet (worker only)
        self.turns: Dict[int, Turn] = {}  # batch uid -> chat being answered
        self.filling: Optional[Filling] = None  # the document being prefilled
        self.batch = None  # BatchGenerator, made at load
        self.sessions = OrderedDict()  # id -> Session, least recently used first
        self.notes = {}  # id -> why its saved cache was not used or saved
        self._lock = threading.Lock()
        self.link = None  # sharded (ranks.py): rank 0 tells the others what to run
        self._forgotten: List[Tuple[str, bool]] = []  # (id, deleted): to tell the ranks
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="mlx_kvq-worker",
                                        daemon=True)

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
        return len(self.turns) + (self.filling is not None)

    def forget(self, cid: str, deleted: bool = False):
        """Drop the conversation's cache from memory (`deleted`: the
        conversation is gone; sharded, the other ranks delete their files)."""
        with self._lock:
            self.sessions.pop(cid, None)
            if self.link is not None:
                self._forgotten.append((cid, deleted))
        self.notes.pop(cid, None)

    def memory(self, cid: str) -> dict:
        """The memory panel of a conversation."""
        with self._lock:
            session = self.sessions.get(cid)
            stats = dict(session.stats) if session else None
            held = sum(s.nbytes for s in self.sessions.values())
        note = self.notes.get(cid)
        if stats is None:
            problem = self.store.check_cache(cid, self.fingerprint, self.specs)
            if problem:
                note = (f"The saved KV cache is refused: {problem}. The messages are "
                        "intact; the cache is rebuilt from them on the next turn.")
            info = None if problem else self.store.cache_info(cid)
            stats = (info or {}).get("stats")
        stats = stats or {"tokens": 0, "cache_bytes": 0, "fp16_bytes": 0}
        b = self.budget
        workspace = b.workspace(stats["tokens"] + self.settings.max_tokens)
        fit, limited_by = self.token_limit()
        return {
            **stats,
            "resident": session is not None,
            "budget": b.memory,
            "weights": b.shape.weight_bytes,
            "workspace": workspace,
            "resident_bytes": held,
            "budget_left": b.memory - b.shape.weight_bytes - workspace - held,
            "max_tokens": fit,
            "limited_by": limited_by,
            "tokens_left": max(0, fit - stats["tokens"]),
            "spec": ", ".join(self.specs),
            "scheme": self.scheme,
            "ranks": stats.get("ranks"),
            "note": note,
        }

    def token_limit(self) -> Tuple[int, str]:
        """(tokens one conversation may reach, what limits it)."""
        fit, trained = self.budget.max_tokens(), self.budget.shape.trained_context
        if trained and trained < fit and not self.settings.max_kv_size:
            return trained, "trained context"
        return fit, "memory budget"

    # -- worker -----------------------------------------------------------

    def _run(self):
        try:
            self._load()
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
        while not self._stopping.is_set():
            idle = not self.turns and self.filling is None
            self._take(block=idle)
            if idle:
                self._tell("beat")
            self._start_waiting()
            if self.filling is not None:
                self._fill()
            if self.turns:
                self._step()
        if self.filling is not None:  # its document is not added
            self.forget(self.filling.job.conversation)
            self.filling.job.emit("error", busy("the server is shutting down"))
        for turn in list(self.turns.values()):
            turn.job.cancelled.set()
            self._end(turn, "cancelled")
        self.batch.close()
        self._tell("stop")
        for job in self.waiting + self._drain():
            job.emit("error", busy("the server is shutting down"))

    def _abandon(self, error: RequestError):
        """Answer every job with `error` (the ranks cannot go on)."""
        self._stopping.set()
        jobs = [t.job for t in self._running()] + self.waiting + self._drain()
        for job in jobs:
            job.emit("error", error)

    def _tell(self, *command):
        """Sharded: the other ranks run `command` too (see ranks.py); first
        they drop the caches this rank forgot."""
        if self.link is None or not self.link.leads:
            return
        with self._lock:
            gone, self._forgotten = self._forgotten, []
        if gone:
            self.link.tell("forget", gone)
        self.link.tell(*command)

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
        busy_ids = {t.job.conversation for t in self._running()}
        for job in list(self.waiting):
            if job.cancelled.is_set():
                self.waiting.remove(job)
                job.emit("error", RequestError(499, "the client left before it started"))
                continue
            if job.conversation in busy_ids or (job.kind == "document" and self.filling):
                busy_ids.add(job.conversation)  # its later jobs wait behind it
                continue
            if job.kind == "chat" and len(self.turns) >= self.settings.decode_concurrency:
                break
            try:
                started = self._begin(job)
            except Exception as e:
                self._fail(job, e)
                started = True
            if not started:
                break
            self.waiting.remove(job)
            busy_ids.add(job.conversation)

    def _running(self) -> list:
        """Turns and the filling document: what holds memory and a conversation."""
        return list(self.turns.values()) + ([self.filling] if self.filling else [])

    def _fail(self, job: Job, e: Exception):
        if self.link is not None and self.link.fatal(e):
            raise e
        if isinstance(e, RequestError):
            job.emit("error", e)
        elif isinstance(e, NotFound):
            self.forget(job.conversation)
            job.emit("error", RequestError(404, f"conversation {job.conversation} "
                                           "was deleted"))
        else:
            log.error("conversation %s: %s job failed", job.conversation, job.kind,
                      exc_info=e)
            self.forget(job.conversation)  # its cache may be half updated
            job.emit("error", RequestError(500, f"internal error: {type(e).__name__}: {e}"))

    def _begin(self, job: Job) -> bool:
        """Start a job (a chat joins the batch; a document starts filling);
        False when the budget cannot hold it next to the running chats yet."""
        return (self._begin_chat if job.kind == "chat" else self._document)(job)

    def _step(self):
        """Steps of the batch: a prefill chunk and/or one token for every chat
        (one step; sharded, while every chat decodes and nothing waits, a run
        of STEPS_PER_COMMAND, so the ranks sync once per run: chats that end
        within it leave after it)."""
        # Prompts prefilled together share one --prefill-step-size chunk
        # (the workspace the planner sizes); a lone prompt takes all of it.
        s = self.settings
        filling = sum(t.first_token is None for t in self.turns.values())
        step = max(1, s.prefill_step_size // max(1, min(filling, s.prompt_concurrency)))
        quiet = not (filling or self.waiting or self.filling or self.jobs.qsize())
        runs = STEPS_PER_COMMAND if self.link is not None and quiet else 1
        self._tell("step", step, runs)
        self.batch.prefill_step_size = step
        ending = {}  # uid -> (finish, cache, tokens): chats that leave after the run
        failed = {}  # uid -> (error, whether the batch had ended the chat)
        for _ in range(runs):
            try:
                prompt_responses, gen_responses = self.batch.next()
            except Exception as e:
                if self.link is not None:
                    raise OutOfStep(f"a batch step failed: {type(e).__name__}: {e}") from e
                log.exception("the batch failed; its chats are answered with an error")
                for turn in self.turns.values():
                    self._fail(turn.job, e)
                self.turns.clear()
                self.batch.close()
                self.batch = self._new_batch()
                return
            for r in prompt_responses:
                turn = self.turns.get(r.uid)
                if turn is not None and not r.end_of_prompt:
                    done, total = r.progress
                    turn.job.emit("progress", {"done": turn.cached + done,
                                               "total": turn.cached + total})
            for r in gen_responses:
                turn = self.turns.get(r.uid)
                if turn is None:
                    continue
                if r.uid in failed:  # the batch ran on
                    failed[r.uid] = (failed[r.uid][0], r.finish_reason is not None)
                    continue
                if r.uid in ending:  # stopped by a stop string; the batch ran on
                    if r.finish_reason is not None:
                        ending[r.uid] = (ending[r.uid][0], r.prompt_cache, r.all_tokens)
                    continue
                try:
                    finish = self._on_token(turn, r)
                except Exception as e:  # this chat fails; the others go on
                    failed[r.uid] = (e, r.finish_reason is not None)
                    continue
                if finish is not None:
                    ending[r.uid] = ((finish, r.prompt_cache, r.all_tokens)
                                     if r.finish_reason is not None else (finish, None, None))
        for uid, (e, finished) in failed.items():
            turn = self.turns.pop(uid)
            self._drop(uid, finished)
            self._fail(turn.job, e)
        for uid, (finish, cache, tokens) in ending.items():
            self._end(self.turns[uid], finish, cache, tokens)
        for turn in [t for t in self.turns.values() if t.job.cancelled.is_set()]:
            self._end(turn, "cancelled")

    def _drop(self, uid: int, finished: bool):
        """A chat that failed leaves the batch (if the batch has not ended it)."""
        self._tell("drop", uid, finished)
        if not finished:
            self.batch.remove([uid])

    def _on_token(self, turn: Turn, r) -> Optional[str]:
        """Stream a chat's new token; why it ends, if it does."""
        turn.first_token = turn.first_token or time.perf_counter() - turn.job.submitted
        turn.generated += 1
        detok = turn.detokenizer
        if r.finish_reason != "stop":  # the end-of-sequence token is not text
            detok.add_token(r.token)
        if r.finish_reason is not None:
            detok.finalize()
        text, stopped = turn.stops.feed(detok.last_segment)
        finish = "stop" if stopped else r.finish_reason
        if finish is not None and not stopped:
            text += turn.stops.flush()
        if text:
            turn.reply.append(text)
            turn.job.emit("text", text)
        return finish

    def _end(self, turn: Turn, finish: str, cache=None, tokens=None):
        """A chat leaves the batch: its cache becomes the conversation's, the
        turn is saved, the client gets "done"."""
        uid = next(u for u, t in self.turns.items() if t is turn)
        job, session = turn.job, turn.session
        try:
            self._tell("end", uid, job.conversation, cache is None)
            if cache is None:  # ended before the batch finished it
                cache, tokens = self.batch.remove([uid], return_prompt_caches=True)[uid]
            del self.turns[uid]
            session.cache, session.tokens = cache, list(tokens)
            self._commit(job, job.messages + [{"role": "assistant",
                                               "content": "".join(turn.reply)}], session)
        except Exception as e:
            self.turns.pop(uid, None)
            self._fail(job, e)
            return
        log.info("conversation %s: %d prompt tokens (%d cached), %d generated, first "
                 "token after %.2f s", job.conversation, len(turn.prompt), turn.cached,
                 turn.generated, turn.first_token or 0.0)
        job.emit("done", {
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(turn.prompt), "completion_tokens": turn.generated,
                      "cached_tokens": turn.cached},
            "first_token_s": turn.first_token,
            "memory": self.memory(job.conversation),
        })

    def _new_batch(self) -> BatchGenerator:
        s = self.settings
        return BatchGenerator(
            self.model, stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=s.decode_concurrency,
            prefill_batch_size=s.prompt_concurrency,
            prefill_step_size=s.prefill_step_size)

    def _load(self):
        s = self.settings
        if s.sharding:
            self.model, self.tokenizer, shard = distributed.load(s.model, s.sharding)
            self.link = Link(shard, s.peer_timeout)
            mx.random.seed(distributed.shared_seed(shard.group))
        else:
            self.model, self.tokenizer = load(s.model)
        self.model_id = s.model or DEFAULT_MODEL
        kv_plan = getattr(self.model, "kvq_plan", None)
        if self.cache_spec is None and kv_plan is None:
            self.cache_spec = parse_spec(DEFAULT_PRESET)
        # Refuses an unsupported model/spec now.
        layers = [c.spec for c in make_prompt_cache(self.model, self.cache_spec, s.max_kv_size)
                  if isinstance(c, KVQCache)]
        self.specs = sorted({str(x) for x in layers})  # what saved caches must hold
        self.scheme = (f"calibrated per-layer plan {kv_plan.label()}; {kv_plan.source}"
                       if self.cache_spec is None else self.cache_spec.describe())
        self.fingerprint = persist.model_fingerprint(self.model)
        shape = shapes.load_shape(s.model)
        # A plan's spec varies per layer: the budget sizes each layer; the
        # sinks named in notices are the widest layer's.
        self.spec = max(layers, key=lambda x: sizing.bits_per_element(x, shape.head_dim))
        sized = self.cache_spec or shapes.LayerSpecs(tuple(layers), kv_plan.label())
        if self.link is not None:
            shape, sized = self.link.heaviest(shape, sized, s.model)
        memory = s.memory or sizing.total_memory() // 2
        self.budget = Budget(shape, sized, memory, s.prefill_step_size)
        if self.budget.max_tokens() == 0:
            raise ValueError(
                f"the memory budget {units.fmt_bytes(memory)} does not hold the model "
                f"(weights {units.fmt_bytes(self.budget.shape.weight_bytes)}) and a "
                "prefill workspace; raise --memory")
        self.batch = self._new_batch()

    def encode(self, messages: List[dict], add_generation_prompt: bool) -> List[int]:
        messages = chat_messages(messages)
        if self.tokenizer.has_chat_template:
            return list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True))
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return self.tokenizer.encode(text + ("\n\nassistant:" if add_generation_prompt
                                             else ""))

    def _admit(self, cid: str, context: int, what: str,
               reply_room: int) -> Optional[Tuple[Optional[str], int]]:
        """Refuse a turn that cannot fit even alone before anything is
        allocated; None while it does not fit beside the running chats; else
        park idle caches to make room and return (notice for the reply, or
        None; the tokens its cache may reach)."""
        s, b = self.settings, self.budget
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
                      + f": the KV cache keeps the first {self.spec.sinks} and the most "
                      f"recent {s.max_kv_size} tokens (--max-kv-size); older tokens are "
                      "dropped.")
        if b.need([kv_context]) > b.memory:
            raise RequestError(400, b.refusal(kv_context, what, reply_room),
                               code="kv_budget_exceeded")
        running = {t.job.conversation: t.kv_context for t in self._running()}
        # A batch allocates every row at its longest row's size.
        need = b.need([max([kv_context, *running.values()])] * (len(running) + 1))
        if need > b.memory:
            return None
        with self._lock:
            resident = [(k, v.nbytes) for k, v in self.sessions.items()
                        if k != cid and k not in running]
            parked = to_park(resident, need, b.memory)
            for k in parked:
                pause("park")
                del self.sessions[k]
                log.info("conversation %s: cache parked on disk to make room", k)
        if parked:
            self._tell("park", parked)
        mx.clear_cache()
        return notice, kv_context

    def _session(self, cid: str, resident: Optional[bool] = None) -> Session:
        """The conversation's cache: in memory, else loaded from its saved
        file, else new. Sharded, every rank takes its own share and the
        ranks agree on the tokens held (`resident`: whether rank 0 had it in
        memory; the others load it when rank 0 did)."""
        with self._lock:
            if resident is False:
                self.sessions.pop(cid, None)
            session = self.sessions.get(cid)
        if resident is None:  # this rank decides
            resident = session is not None
        self._tell("session", cid, resident)
        if session is None:
            session = self._open(cid)
        with self._lock:
            self.sessions[cid] = session
            self.sessions.move_to_end(cid)
        if self.link is not None and not self.link.agree_tokens(session.tokens):
            self.notes[cid] = ("The ranks' saved KV caches did not match; the cache was "
                               "rebuilt from the messages.")
            session.cache, session.tokens, resident = self._new_cache(), [], False
        if not resident:
            session.stats = self._stats(session.cache)
        return session

    def _open(self, cid: str) -> Session:
        try:
            loaded = self.store.load_cache(cid, self.model, self.fingerprint, self.specs)
        except Exception as e:  # refused, or unreadable: the messages rebuild it
            if not isinstance(e, CacheRefused):
                log.warning("conversation %s: saved KV cache unreadable", cid, exc_info=e)
            self.notes[cid] = (f"The saved KV cache was refused: {e}. The messages are "
                               "intact; the cache was rebuilt from them.")
            loaded = None
        return Session(*loaded) if loaded is not None else Session(self._new_cache())

    def _reuse(self, cid: str, session: Session, tokens: List[int], keep_last: bool) -> int:
        """Trim the cache to its longest common prefix with `tokens`; the number
        of tokens it still holds."""
        n = common_prefix(session.tokens, tokens)
        if keep_last:  # the last prompt token must run to give the first logits
            n = min(n, len(tokens) - 1)
        return self._trim(cid, session, n)

    def _trim(self, cid: str, session: Session, n: int) -> int:
        """Keep the first n tokens of the cache (all of them dropped if it
        cannot be trimmed); the number kept."""
        self._tell("trim", cid, n)
        drop = len(session.tokens) - n
        if drop:
            if can_trim_prompt_cache(session.cache):
                trim_prompt_cache(session.cache, drop)
            else:  # tokens were evicted (--max-kv-size): start over
                session.cache = self._new_cache()
                n = 0
            session.tokens = session.tokens[:n]
        return n

    def _new_cache(self):
        return make_prompt_cache(self.model, self.cache_spec, self.settings.max_kv_size)

    def _stats(self, cache) -> dict:
        """Tokens and bytes of a cache; sharded (every rank calls it), also
        each rank's share, and the totals over the ranks."""
        st = kv_stats(cache)
        out = {"tokens": st.tokens, "cache_bytes": st.nbytes, "fp16_bytes": st.fp16_nbytes}
        if self.link is not None:
            out["ranks"] = distributed.rank_rows(self.link.shard, st.nbytes, st.fp16_nbytes)
            out["cache_bytes"] = sum(r["nbytes"] for r in out["ranks"])
            out["fp16_bytes"] = sum(r["fp16_nbytes"] for r in out["ranks"])
        return out

    def _notice(self, cid: str, admitted: Optional[str]) -> Optional[str]:
        return " ".join(filter(None, [self.notes.get(cid), admitted])) or None

    def _history(self, job: Job) -> List[dict]:
        return [] if job.title is not None else self.store.get(job.conversation).messages

    def _begin_chat(self, job: Job) -> bool:
        cid = job.conversation
        if job.tokens is None:  # kept while the job waits for memory
            job.tokens = self.encode(self._history(job) + job.messages, True)
        prompt = job.tokens
        admitted = self._admit(
            cid, len(prompt) + job.max_tokens,
            f"this turn ({len(prompt)} prompt tokens + max_tokens {job.max_tokens})",
            job.max_tokens)
        if admitted is None:
            return False
        notice, kv_context = admitted
        session = self._session(cid)
        cached = self._reuse(cid, session, prompt, keep_last=True)
        job.emit("start", {"prompt_tokens": len(prompt), "cached_tokens": cached,
                           "notice": self._notice(cid, notice)})
        uid = self._insert(cid, session, prompt[cached:], job.max_tokens, job.temperature,
                           job.top_p, job.seed)
        self.turns[uid] = Turn(job, session, prompt, cached, kv_context,
                               self.tokenizer.detokenizer, StopText(job.stop))
        return True

    def _insert(self, cid: str, session: Session, tail: List[int], max_tokens: int,
                temperature: float, top_p: float, seed: Optional[int]) -> int:
        """The chat joins the batch; its uid there."""
        if seed is not None:
            mx.random.seed(seed)
        uid, = self.batch.insert(
            [tail], [max_tokens], caches=[session.cache], all_tokens=[session.tokens],
            samplers=[make_sampler(temperature, top_p)])
        self._tell("insert", cid, tail, max_tokens, temperature, top_p, seed)
        # The batch holds a copy of the cache now; the chat's end gives it back.
        session.cache = None
        return uid

    def _document(self, job: Job) -> bool:
        cid = job.conversation
        if job.tokens is None:  # kept while the job waits for memory
            job.tokens = self.encode(self._history(job) + job.messages, False)
        tokens = job.tokens
        room = self.settings.max_tokens
        admitted = self._admit(
            cid, len(tokens) + room,
            f"this conversation with the document ({len(tokens)} tokens, plus {room} "
            "for a reply)", room)
        if admitted is None:
            return False
        session = self._session(cid)
        cached = self._reuse(cid, session, tokens, keep_last=False)
        job.emit("start", {"prompt_tokens": len(tokens), "cached_tokens": cached,
                           "notice": self._notice(cid, admitted[0])})
        self.filling = Filling(job, session, tokens, cached, cached, admitted[1])
        return True

    def _fill(self):
        """Prefill the next chunk of the document; save it when complete."""
        f, step = self.filling, self.settings.prefill_step_size
        try:
            if f.job.cancelled.is_set():
                raise RequestError(499, "the client left before the document was added")
            chunk = f.tokens[f.done:f.done + step]
            if chunk:
                self._prefill(f.job.conversation, f.session, chunk)
                f.done += len(chunk)
                f.job.emit("progress", {"done": f.done, "total": len(f.tokens)})
            if f.done < len(f.tokens):
                return
            self.filling = None
            self._commit(f.job, f.job.messages, f.session)
        except Exception as e:
            self.filling = None
            self.forget(f.job.conversation)  # its cache is half filled
            self._fail(f.job, e)
            return
        f.job.emit("done", {"prompt_tokens": len(f.tokens), "cached_tokens": f.cached,
                            "memory": self.memory(f.job.conversation)})

    def _prefill(self, cid: str, session: Session, chunk: List[int]):
        self._tell("prefill", cid, chunk)
        try:
            prefill_chunk(self.model, session.cache, chunk)
        except Exception as e:
            if self.link is not None and not self.link.fatal(e):
                raise OutOfStep(f"a prefill step failed: {type(e).__name__}: {e}") from e
            raise
        session.tokens = session.tokens + list(chunk)

    def _settle(self, cid: str, session: Session):
        """A turn's cache, checked against its tokens, with its stats."""
        self._tell("settle", cid)
        offset = next(c.offset for c in session.cache if isinstance(c, KVQCache))
        if offset != len(session.tokens):  # a cache we cannot map to tokens is useless
            log.warning("conversation %s: cache holds %d tokens, expected %d; dropping it",
                        cid, offset, len(session.tokens))
            session.cache = self._new_cache()
            session.tokens = []
        session.stats = self._stats(session.cache)

    def _commit(self, job: Job, new_messages: List[dict], session: Session):
        """Save the messages, then the cache (the messages are never lost)."""
        cid = job.conversation
        self._settle(cid, session)
        if job.title is not None:
            self.store.create(job.title, cid=cid, source="api", exist_ok=True)
        self.store.update(cid, lambda c: _extend(c, new_messages))
        try:
            self.store.save_cache(cid, session.cache, session.tokens, self.fingerprint,
                                  session.stats)
            self.notes.pop(cid, None)
        except NotFound:
            raise
        except Exception as e:
            log.exception("conversation %s: could not save the KV cache", cid)
            self.notes[cid] = (f"The KV cache could not be saved ({e}); it is rebuilt "
                               "from the messages after a restart.")
