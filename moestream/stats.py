"""Stats: one snapshot of every part's counters, grouped by the part that counts them.

    s = llm.stats()
    s.turn.generation_tps, s.experts.hit_rate, s.kv.tokens_host, s.memory.device_bytes

Each group is the snapshot its part makes of itself (the expert source, the KV cache, the
checkpoint, the generation loop); the chat, `bench`, `report`, the profiler and the tests read
these snapshots, never the parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .cache.kv import KVStats
from .model.checkpoint import CheckpointStats
from .model.experts import ExpertStats
from .scheduler.generate import TurnStats


@dataclass
class Totals:
    """Tokens since load."""

    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class MemoryStats:
    """The runtime's own accounting of the compute device, held under --gpu-mem (tested)."""

    resident_bytes: int = 0  # attention, norms, routers, shared/dense MLPs, embeddings, lm_head
    expert_bytes: int = 0  # routed experts on the device (the cache pool, or the resident experts)
    kv_bytes: int = 0  # KV on the device
    gpu_mem: int | None = None  # the budget (None = none)

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes + self.kv_bytes


@dataclass
class Stats:
    load_seconds: float = 0.0
    turn: TurnStats = field(default_factory=TurnStats)  # the last generate() call
    totals: Totals = field(default_factory=Totals)
    experts: ExpertStats = field(default_factory=ExpertStats)
    kv: KVStats = field(default_factory=KVStats)  # the conversation's cache (or the last one used)
    memory: MemoryStats = field(default_factory=MemoryStats)
    checkpoint: CheckpointStats = field(default_factory=CheckpointStats)

    def as_dict(self) -> dict:
        """Nested like the groups, with the derived rates (what summary.json and `generate --json` carry)."""
        d = asdict(self)
        d["turn"].update(prompt_tps=self.turn.prompt_tps, generation_tps=self.turn.generation_tps)
        d["experts"]["hit_rate"] = self.experts.hit_rate
        d["memory"]["device_bytes"] = self.memory.device_bytes
        return d
