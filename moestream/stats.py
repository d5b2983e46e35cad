"""Stats: the one object every counter lands in; the chat, reports, benchmarks and tests read it.

The UI never reaches into a cache or a store: `LLM.stats()` fills a fresh Stats from the parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    # expert offload (all zero when every expert is resident)
    cache_slots: int = 0
    expert_hits: int = 0
    expert_misses: int = 0
    expert_fetches: int = 0  # demand copies into the expert cache
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    cpu_experts: int = 0  # expert runs on the CPU
    cpu_expert_seconds: float = 0.0
    stall_seconds: float = 0.0  # host time blocked on copies / disk reads
    bytes_host_to_device: int = 0
    bytes_disk_to_host: int = 0
    host_expert_bytes: int = 0  # the ExpertStore's host-RAM tier
    disk_experts: int = 0
    prefetch_recall: dict = field(default_factory=dict)  # lookahead distance -> recall
    prefetch_precision: dict = field(default_factory=dict)
    # memory
    resident_bytes: int = 0  # attention, norms, routers, shared/dense MLPs, embeddings, lm_head
    expert_bytes: int = 0  # routed experts on the compute device (cache pool or resident experts)
    kv_bytes: int = 0  # KV on the compute device
    kv_tokens: int = 0  # tokens in the conversation's cache
    # KV tiers (tokens of one global layer per tier; bytes summed over layers)
    kv_tokens_device: int = 0
    kv_tokens_host: int = 0
    kv_tokens_disk: int = 0
    kv_host_bytes: int = 0
    kv_spilled_to_host_bytes: int = 0
    kv_spilled_to_disk_bytes: int = 0
    kv_fetched_to_device_bytes: int = 0
    kv_read_from_disk_bytes: int = 0
    kv_attention_seconds: dict = field(default_factory=dict)  # tier -> seconds of attention over it
    device_bytes: int = 0  # the runtime's own accounting: resident + experts + KV
    gpu_mem: int | None = None  # the compute-device budget it must stay within (None = none)

    @property
    def hit_rate(self) -> float:
        n = self.expert_hits + self.expert_misses
        return self.expert_hits / n if n else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tps"], d["generation_tps"], d["hit_rate"] = self.prompt_tps, self.generation_tps, self.hit_rate
        return d
