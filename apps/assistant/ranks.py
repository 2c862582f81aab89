"""The assistant on several machines: `mlx.launch ... -m mlx_kvq.apps.assistant
--sharding tensor|pipeline`. Rank 0 serves HTTP and decides; every other
rank replays, on its own share of the model and of every cache, the MLX work
rank 0 does, in the same order.

Every forward pass of a sharded model holds collectives, so all ranks must
run the same passes on the same batch. mlx_lm.server gets there by sharing
each request and running the same loop everywhere; the engine here also
decides from HTTP threads (cancellations, deletions), the memory budget and
files on disk, which the ranks do not share. So rank 0 alone decides and
tells the others what to run: the commands are the engine's own operations
on the model, the batch and the caches, declared once in commands.py (each
a class: its arguments and what a follower runs), and a follower replays
them in order on its own Engine. A command is a short pickled tuple shared
with one or two all_sums (distributed.share); idle, rank 0 sends a
heartbeat every half second. Each command is a sync of all ranks, so while
every chat decodes and nothing waits, one `Step` command runs 8 decode
steps (scheduler.STEPS_PER_COMMAND; chats that end within them leave after
them).

What the ranks cannot know alike, they agree on: a conversation's saved
cache is each rank's own file (followers keep theirs under
<data-dir>/ranks/<rank>), so after loading one the ranks compare the token
ids they hold (length and crc32, all_gather) and rebuild it together if any
differs. Cache statistics are gathered from all ranks after every turn: the
memory panel shows each rank's share and the totals; the budget is sized for
the rank that holds the most (sizing.rank_shape).

Failure: a lost peer fails the next collective, and a rank that stops
answering is caught by the watchdog (distributed.Guard, --peer-timeout).
Rank 0 then answers every running and waiting request with a 503 naming the
lost rank and exits with distributed.EXIT_LOST; followers exit likewise. A
batch step that fails on one rank alone would leave the ranks out of step,
so under sharding it ends the ranks too (restart them; conversations and
their saved caches are intact, as after a crash).
"""

import logging
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from mlx_kvq import distributed, kvplan, shapes, sizing
from mlx_kvq.models import local_path

from . import commands
from .errors import RequestError

log = logging.getLogger("mlx_kvq.assistant")


class OutOfStep(RuntimeError):
    """A rank failed inside work all ranks run together (a batch step, a
    prefill chunk): the others are left in its collectives."""


class Link:
    """One rank's end of the command stream (engine.link)."""

    def __init__(self, shard: distributed.Shard, timeout: float):
        self.shard = shard
        self.guard = distributed.Guard(shard, timeout)

    @property
    def leads(self) -> bool:
        return self.shard.rank == 0

    def tell(self, command: commands.Command):
        distributed.share(command.wire(), self.shard.group)
        self.guard.beat()

    def hear(self) -> commands.Command:
        command = commands.decode(distributed.share(None, self.shard.group))
        self.guard.beat()
        return command

    def agree_tokens(self, tokens) -> bool:
        """Whether every rank's cache holds these same token ids."""
        digest = zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes())
        rows = distributed.gather([len(tokens), digest], self.shard.group)
        return bool((rows == rows[0]).all())

    @staticmethod
    def fatal(error: BaseException) -> bool:
        """Errors after which the ranks cannot go on together."""
        return isinstance(error, OutOfStep) or distributed.is_peer_loss(error)

    def lead(self, serve, abandon):
        """Run rank 0's worker loop `serve`; when the ranks cannot go on,
        answer every job through `abandon` and exit the process."""
        size = self.shard.size

        def stop(why: str):
            log.error("rank 0 of %d: %s; stopping (restart all ranks: conversations and "
                      "their saved caches are kept)", size, why)
            abandon(RequestError(503, f"The server lost a rank of its sharded model ({why}) "
                                 "and stops; restart it.", code="rank_lost"))
            time.sleep(1.0)  # the HTTP threads send the errors

        self.guard.on_lost = stop  # the watchdog: a silent peer
        try:
            with self.guard:
                serve()
        except BaseException as e:  # SystemExit: Guard has named the lost peer
            stop(f"lost {distributed.peers(0, size)}" if isinstance(e, SystemExit)
                 else f"the ranks are out of step ({type(e).__name__}: {e})")
            if not isinstance(e, SystemExit):
                log.error("rank 0 of %d failed", size, exc_info=e)
                print(f"error: rank 0 of {size}: {type(e).__name__}: {e}", file=sys.stderr,
                      flush=True)
            os._exit(distributed.EXIT_LOST)

    def heaviest(self, shape: shapes.ModelShape, sized, model_path):
        """(shape, spec) of the rank that needs the most memory: the budget
        holds for every rank if it holds for that one. `sized`: this rank's
        layer specs (under pipeline sharding with a calibrated plan, the
        whole plan is read from the model folder)."""
        s = self.shard
        if s.sharding == "pipeline" and isinstance(sized, shapes.LayerSpecs):
            plan = kvplan.load_plan(local_path(model_path))
            sized = shapes.LayerSpecs(tuple(plan.spec(i) for i in sorted(plan.layers)),
                                      plan.label())
        parts = [sizing.rank_shape(shape, s.sharding, s.size, r) for r in range(s.size)]
        specs = [sizing.rank_spec(sized, shape, p) for p in parts]
        need = [sizing.memory_needed(p, x, [4096]) for p, x in zip(parts, specs)]
        r = int(np.argmax(need))
        return parts[r], specs[r]


def follow(engine):
    """A follower rank: load the model (as rank 0 does), then replay rank 0's
    commands (commands.py) until it says stop. Returns the process exit
    status."""
    try:
        engine.load()
    except Exception as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    link = engine.link
    s = link.shard
    log.info("rank %d of %d (%s): following rank 0", s.rank, s.size, s.describe())
    try:
        with link.guard:
            while not isinstance(command := link.hear(), commands.Stop):
                command.replay(engine)
    except Exception as e:  # out of step with rank 0: it cannot go on either
        log.exception("rank %d of %d failed", s.rank, s.size)
        print(f"error: rank {s.rank} of {s.size}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        return 1
    engine.scheduler.close()
    return 0


def follower_data_dir(data_dir, rank: int) -> Path:
    """Where a follower keeps its share of the conversations' caches."""
    return Path(data_dir) / "ranks" / str(rank)
