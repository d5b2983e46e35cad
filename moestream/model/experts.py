"""The experts seam: the only place the model knows routed experts might not be resident.

For each MoE layer step the model calls, on its expert source,
    order = experts.prepare(layer, wanted, h)   # every expert the step needs, before any is computed
    expert = experts.get(layer, e)              # for each e in `order`: a callable expert
and nothing else. `prepare` lets a source start every copy at once and answer with the order to
compute in; `get` hands back weights on the compute device, or a twin that runs on the CPU
(`expert.on_cpu`). A source also reports what it did (`snapshot()` -> ExpertStats) and lets go of
threads and files (`close()`). The sources live in offload/: every expert resident, or offloaded.

Each expert is ONE contiguous buffer in its format (model/formats.py: bf16, int8, int4, ...), so
moving it between tiers is a single copy (as mixtral-offloading's expert cache has it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class ExpertCounters:
    """What happened at the seam: the counters an offloading source keeps as it runs."""

    hits: int = 0  # wanted experts found in the cache
    misses: int = 0
    fetches: int = 0  # demand copies into the cache
    prefetch_issued: int = 0
    prefetch_hits: int = 0  # wanted experts that were in the cache thanks to a prefetch
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    cpu_runs: int = 0  # expert runs on the CPU
    replica_runs: int = 0  # of them, misses run from the low-bit replica (--miss-dtype)
    cpu_seconds: float = 0.0  # time spent running experts on the CPU
    stall_seconds: float = 0.0  # host time blocked on copies / disk reads


@dataclass
class ExpertStats(ExpertCounters):
    """What an expert source did since load: one group of `llm.stats()`. All zero but `gets`,
    `resident` and `device_bytes` when every expert is resident."""

    format: str = ""  # how experts are stored, moved and multiplied (--expert-dtype resolved)
    bytes_per_expert: int = 0  # one packed expert in that format, scales included
    gets: int = 0  # calls through the seam
    resident: int = 0  # experts on the compute device now
    device_bytes: int = 0  # their bytes (the cache pool, or the resident experts)
    slots: int = 0  # expert-cache slots (0: no cache, every expert resident or on the CPU)
    bytes_host_to_device: int = 0
    bytes_disk_to_host: int = 0
    host_bytes: int = 0  # the store's host-RAM tier
    disk_experts: int = 0  # experts the store keeps on disk
    replica_bytes: int = 0  # host RAM of the low-bit miss replicas (--miss-dtype)
    prefetch_recall: dict = field(default_factory=dict)  # lookahead distance -> recall
    prefetch_precision: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class ExpertSource(Protocol):
    """What the model's MoE block asks of wherever routed experts live."""

    def prepare(self, layer: int, wanted: list[int], h: torch.Tensor) -> list[int]: ...

    def get(self, layer: int, e: int): ...

    def snapshot(self) -> ExpertStats: ...

    def close(self) -> None: ...
