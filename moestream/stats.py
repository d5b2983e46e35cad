"""Stats: the one object every counter lands in; the chat, reports, benchmarks and tests read it.

The UI never reaches into a cache or a store: `LLM.stats()` fills a fresh Stats from the parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stats:
    load_seconds: float = 0.0
    # the last generate() call (what the chat shows after each reply)
    prompt_tokens: int = 0  # tokens actually prefilled (a reused prefix is not counted)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    # totals since load
    total_prompt_tokens: int = 0
    total_generated_tokens: int = 0
    # experts
    expert_gets: int = 0  # routed-expert requests through the ExpertStore seam
    expert_reads: int = 0  # experts sliced out of the checkpoint files
    expert_bytes_read: int = 0
    experts_resident: int = 0
    # memory
    resident_bytes: int = 0  # attention, norms, routers, shared/dense MLPs, embeddings, lm_head
    expert_bytes: int = 0  # routed experts on the compute device
    kv_bytes: int = 0
    kv_tokens: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tps"], d["generation_tps"] = self.prompt_tps, self.generation_tps
        return d
