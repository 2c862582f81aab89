"""Admission control: do the KV caches of the conversations answered
together fit the memory budget?

Sizes come from mlx_kvq.plan, which models KVQCache's allocation exactly:
weights + the prefill workspace + the caches of the running conversations,
each at the length its turn may reach (the engine passes the longest for
all of them: a batch allocates its rows alike). Caches of idle
conversations are saved after every turn, so they can be parked on disk to
make room and never block a turn.
"""

from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, Tuple

from mlx_kvq import shapes, sizing, units
from mlx_kvq.spec import KVQuantSpec, parse_spec

LOWER_BIT_SPECS = ("k4v2", "k3v3", "k2v2")  # suggested when a turn does not fit


@dataclass(frozen=True)
class Budget:
    shape: shapes.ModelShape = field(hash=False)
    spec: KVQuantSpec
    memory: int
    prefill_step: int = sizing.PREFILL_STEP

    def need(self, contexts: List[int], spec=None) -> int:
        """Bytes for the weights, the prefill workspace and the caches of
        conversations of these lengths (in tokens) answered together."""
        return sizing.memory_needed(self.shape, spec or self.spec,
                                  [max(c, 1) for c in contexts], self.prefill_step)

    def kv_bytes(self, context: int) -> int:
        return sizing.kv_bytes(self.shape, self.spec, max(context, 1))

    def workspace(self, context: int) -> int:
        return sizing.workspace_bytes(self.shape, self.spec, max(context, 1),
                                    self.prefill_step)

    @lru_cache(maxsize=16)
    def max_tokens(self, spec=None) -> int:
        """The longest conversation that fits (others parked)."""
        return sizing.capacity(self.shape, spec or self.spec, self.memory,
                             concurrency=1, prefill_step=self.prefill_step)

    def refusal(self, context: int, what: str, reply_room: int = 0) -> str:
        """Why `context` tokens do not fit, and what would make them fit."""
        msg = (f"Not enough memory: {what} needs {context} tokens of KV cache, but "
               f"with KV spec {self.spec} at most {self.max_tokens()} tokens fit in "
               f"the {units.fmt_bytes(self.memory)} budget (weights "
               f"{units.fmt_bytes(self.shape.weight_bytes)}, prefill workspace "
               f"{units.fmt_bytes(self.workspace(context))}); other conversations are "
               "already parked on disk.")
        options = [f"restart with --kv {name} ({n} tokens fit)"
                   for name, n in self.lower_bit_capacity() if n >= context]
        if reply_room:
            options.append(f"lower max_tokens ({reply_room} of those tokens are room "
                           "for the reply)")
        options += ["start a new conversation or add a shorter document",
                    f"raise --memory to {units.fmt_bytes(self.need([context]))}"]
        return f"{msg} To make it fit: {'; '.join(options)}."

    def lower_bit_capacity(self) -> List[Tuple[str, int]]:
        """(preset, tokens that fit) for the presets with fewer bits than ours."""
        bits = sizing.bits_per_element(self.spec, self.shape.head_dim)
        specs = [(name, parse_spec(name)) for name in LOWER_BIT_SPECS]
        return [(name, self.max_tokens(spec)) for name, spec in specs
                if sizing.bits_per_element(spec, self.shape.head_dim) < bits]


def to_park(resident: List[Tuple[str, int]], need: int, memory: int) -> List[str]:
    """Conversations to park, least recently used first, so that `need` bytes
    plus the caches left in memory fit `memory`. `resident` lists (id, bytes)
    from least to most recently used."""
    held = sum(n for _, n in resident)
    park = []
    for cid, nbytes in resident:
        if need + held <= memory:
            break
        park.append(cid)
        held -= nbytes
    return park
