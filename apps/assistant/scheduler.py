"""The running batch of chats: continuous batching in mlx-lm's BatchGenerator.

A chat admitted (admission.py) joins the batch with its conversation's
quantized cache (mlx_kvq.KVQBatchCache) and the prompt tokens the cache
does not hold yet; `step` runs the batch between the worker's other work:
prompts are prefilled in chunks (the ones prefilled together share one
--prefill-step-size chunk, the workspace the planner sizes) interleaved
with one decode step for every chat, up to --decode-concurrency chats. Each
new token is streamed through the chat's detokenizer and stop strings. A
chat that ends (length, stop token or string, client gone) leaves the batch
with its cache, which becomes the conversation's; its messages are saved,
then the client gets "done", and the caches of the chats that ended in a
step are saved after all of them got theirs (before the worker takes any
other work, so the conversation's next turn finds its cache on disk as in
memory): the clients do not wait for each other's cache files.

Sharded, each step is a command the other ranks replay (commands.py);
while every chat decodes and nothing waits, one command runs
STEPS_PER_COMMAND steps, so the ranks sync once per run (chats that end
within it leave after it). Followers keep the caches of chats the batch
ended until rank 0 says whose they are (`replay_steps`, `replay_end`).
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from .admission import Admission
from .commands import Drop, End, Insert, Step
from .jobs import Job, StopText, fail
from .ranks import OutOfStep
from .sessions import Session
from .store import NotFound

log = logging.getLogger("mlx_kvq.assistant")
# Sharded: decode steps run per command while no chat prefills and nothing
# waits (each command is a sync of all ranks; a new request waits at most this
# many steps to join).
STEPS_PER_COMMAND = 8


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


class Scheduler:
    def __init__(self, loaded, sessions, admission: Admission, replay):
        self.loaded, self.sessions, self.admission, self.replay = (
            loaded, sessions, admission, replay)
        self.turns: Dict[int, Turn] = {}  # batch uid -> chat being answered
        self.batch: Optional[BatchGenerator] = None  # made by `open`, once loaded
        self.finished = {}  # a follower: uid -> (cache, tokens) of chats the batch ended
        self.unsaved: List[tuple] = []  # (conversation, session): turns whose cache is not saved

    def open(self):
        s, loaded = self.loaded.settings, self.loaded
        self.batch = BatchGenerator(
            loaded.model, stop_tokens=[[t] for t in loaded.tokenizer.eos_token_ids],
            completion_batch_size=s.decode_concurrency,
            prefill_batch_size=s.prompt_concurrency,
            prefill_step_size=s.prefill_step_size)

    def close(self):
        self.batch.close()

    def full(self) -> bool:
        return len(self.turns) >= self.loaded.settings.decode_concurrency

    def _fail(self, job: Job, e: Exception):
        fail(job, e, self.sessions.forget, self.replay.fatal(e))

    def begin(self, job: Job) -> bool:
        """The chat joins the batch; False while the budget cannot hold it
        beside the running chats."""
        admitted = self.admission.start(
            job, job.max_tokens, lambda n: f"this turn ({n} prompt tokens + max_tokens "
            f"{job.max_tokens})", generate=True)
        if admitted is None:
            return False
        a, cid = admitted, job.conversation
        uid = self.insert(cid, a.session, a.tokens[a.cached:], job.max_tokens,
                          job.temperature, job.top_p, job.seed)
        self.turns[uid] = Turn(job, a.session, a.tokens, a.cached, a.kv_context,
                               self.loaded.tokenizer.detokenizer, StopText(job.stop))
        return True

    def insert(self, cid: str, session: Session, tail: List[int], max_tokens: int,
               temperature: float, top_p: float, seed: Optional[int]) -> int:
        """The chat joins the batch; its uid there."""
        if seed is not None:
            mx.random.seed(seed)
        uid, = self.batch.insert(
            [tail], [max_tokens], caches=[session.cache], all_tokens=[session.tokens],
            samplers=[make_sampler(temperature, top_p)])
        self.replay.tell(Insert(cid, tail, max_tokens, temperature, top_p, seed))
        # The batch holds a copy of the cache now; the chat's end gives it back.
        session.cache = None
        return uid

    def step(self, others_wait: bool):
        """Steps of the batch: a prefill chunk and/or one token for every chat
        (one step; sharded, while every chat decodes and nothing waits
        (`others_wait`: jobs or a document do), a run of STEPS_PER_COMMAND)."""
        # Prompts prefilled together share one --prefill-step-size chunk
        # (the workspace the planner sizes); a lone prompt takes all of it.
        s = self.loaded.settings
        filling = sum(t.first_token is None for t in self.turns.values())
        step = max(1, s.prefill_step_size // max(1, min(filling, s.prompt_concurrency)))
        quiet = not (filling or others_wait)
        runs = STEPS_PER_COMMAND if self.loaded.link is not None and quiet else 1
        self.replay.tell(Step(step, runs))
        self.batch.prefill_step_size = step
        ending = {}  # uid -> (finish, cache, tokens): chats that leave after the run
        failed = {}  # uid -> (error, whether the batch had ended the chat)
        for _ in range(runs):
            try:
                prompt_responses, gen_responses = self.batch.next()
            except Exception as e:
                if self.loaded.link is not None:
                    raise OutOfStep(f"a batch step failed: {type(e).__name__}: {e}") from e
                log.exception("the batch failed; its chats are answered with an error")
                for turn in self.turns.values():
                    self._fail(turn.job, e)
                self.turns.clear()
                self.batch.close()
                self.open()
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
            self.drop(uid, finished)
            self._fail(turn.job, e)
        for uid, (finish, cache, tokens) in ending.items():
            self.end(self.turns[uid], finish, cache, tokens)
        for turn in [t for t in self.turns.values() if t.job.cancelled.is_set()]:
            self.end(turn, "cancelled")
        self.save_caches()

    def drop(self, uid: int, finished: bool):
        """A chat that failed leaves the batch (if the batch has not ended it)."""
        self.replay.tell(Drop(uid, finished))
        self.finished.pop(uid, None)
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

    def end(self, turn: Turn, finish: str, cache=None, tokens=None):
        """A chat leaves the batch: its cache becomes the conversation's, the
        turn's messages are saved, the client gets "done" (`save_caches`
        saves the cache next)."""
        uid = next(u for u, t in self.turns.items() if t is turn)
        job, session = turn.job, turn.session
        try:
            self.replay.tell(End(uid, job.conversation, cache is None))
            if cache is None:  # ended before the batch finished it
                cache, tokens = self._remove(uid)
            del self.turns[uid]
            session.cache, session.tokens = cache, list(tokens)
            self.sessions.save_turn(job, job.messages + [{"role": "assistant",
                                                          "content": "".join(turn.reply)}],
                                    session)
        except Exception as e:
            self.turns.pop(uid, None)
            self._fail(job, e)
            return
        self.unsaved.append((job.conversation, session))
        log.info("conversation %s: %d prompt tokens (%d cached), %d generated, first "
                 "token after %.2f s", job.conversation, len(turn.prompt), turn.cached,
                 turn.generated, turn.first_token or 0.0)
        job.emit("done", {
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(turn.prompt), "completion_tokens": turn.generated,
                      "cached_tokens": turn.cached},
            "first_token_s": turn.first_token,
            "memory": self.admission.panel(job.conversation),
        })

    def save_caches(self):
        """Save the caches of the turns that ended (their messages are saved)."""
        unsaved, self.unsaved = self.unsaved, []
        for cid, session in unsaved:
            try:
                self.sessions.save_cache(cid, session)
            except NotFound:  # deleted after its turn was saved: nothing to keep
                log.info("conversation %s: deleted before its KV cache was saved", cid)

    def _remove(self, uid: int):
        """(cache, tokens) of a chat taken out of the batch."""
        return self.batch.remove([uid], return_prompt_caches=True)[uid]

    def cancel_all(self):
        """The server stops: every chat ends, its reply so far saved."""
        for turn in list(self.turns.values()):
            turn.job.cancelled.set()
            self.end(turn, "cancelled")
        self.save_caches()

    # -- a follower rank (commands.py) --------------------------------------

    def replay_steps(self, size: int, runs: int):
        self.batch.prefill_step_size = size
        for _ in range(runs):
            _, responses = self.batch.next()
            for r in responses:
                if r.finish_reason is not None:
                    self.finished[r.uid] = (r.prompt_cache, r.all_tokens)

    def replay_end(self, uid: int, cid: str, removed: bool):
        session = self.sessions.get(cid)
        cache, tokens = self._remove(uid) if removed else self.finished.pop(uid)
        session.cache, session.tokens = cache, list(tokens)
