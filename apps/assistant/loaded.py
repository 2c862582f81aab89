"""The model the assistant serves, and what follows from it.

`Settings` are the server's options. `Loaded` loads the model (on the worker
thread; sharded, every rank its share, with its `link` to the other ranks)
and holds what the rest of the engine reads from it: the tokenizer, the KV
cache spec or calibrated plan, the specs a saved cache must hold, the model
fingerprint, and the memory `budget` sized for it (for the rank that needs
the most, sharded). It makes new caches, encodes conversations and measures
caches; it decides nothing.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx

from mlx_kvq import distributed, make_prompt_cache, persist, shapes, sizing, units
from mlx_kvq.cache import KVQCache
from mlx_kvq.models import DEFAULT_MODEL, load
from mlx_kvq.report import kv_stats
from mlx_kvq.spec import DEFAULT_PRESET, parse_spec

from .budget import Budget
from .ranks import Link


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


def chat_messages(messages: List[dict]) -> List[dict]:
    """Messages as the chat template takes them (the page's extra keys dropped)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Loaded:
    """The model, its tokenizer and KV cache spec, and the memory budget
    (`load` sets them; until then only `settings`, `cache_spec` and `link`)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # The spec asked for; set at load to the default preset or, for a
        # calibrated model folder, None: the plan baked into it.
        self.cache_spec = parse_spec(settings.kv) if settings.kv else None
        self.link: Optional[Link] = None  # sharded: this rank's end of the command stream

    def load(self):
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
        layers = [c.spec for c in self.new_cache() if isinstance(c, KVQCache)]
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

    def new_cache(self) -> list:
        return make_prompt_cache(self.model, self.cache_spec, self.settings.max_kv_size)

    def encode(self, messages: List[dict], add_generation_prompt: bool) -> List[int]:
        messages = chat_messages(messages)
        if self.tokenizer.has_chat_template:
            return list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True))
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return self.tokenizer.encode(text + ("\n\nassistant:" if add_generation_prompt
                                             else ""))

    def stats(self, cache) -> dict:
        """Tokens and bytes of a cache; sharded (every rank calls it), also
        each rank's share, and the totals over the ranks."""
        st = kv_stats(cache)
        out = {"tokens": st.tokens, "cache_bytes": st.nbytes, "fp16_bytes": st.fp16_nbytes}
        if self.link is not None:
            out["ranks"] = distributed.rank_rows(self.link.shard, st.nbytes, st.fp16_nbytes)
            out["cache_bytes"] = sum(r["nbytes"] for r in out["ranks"])
            out["fp16_bytes"] = sum(r["fp16_nbytes"] for r in out["ranks"])
        return out
