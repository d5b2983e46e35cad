"""ResidentExperts: the expert source when the budget holds every expert — no store, no copies.

Each expert is read from the checkpoint into its own device buffer the first time a token routes to
it (not at load: start-up stays fast, and tests count the reads to prove laziness); after warm-up
it is simply the resident model. A format may then re-lay it for its kernel (ExpertFormat.settle:
bf16 on the CPU goes into oneDNN's blocked layout), since a resident expert is never copied again.
"""

from __future__ import annotations

import torch

from .. import memory
from ..model.experts import ExpertStats
from ..model.formats import Expert, ExpertFormat


class ResidentExperts:
    def __init__(self, checkpoint, fmt: ExpertFormat, device, dtype: torch.dtype):
        self.checkpoint, self.fmt, self.device, self.dtype = checkpoint, fmt, device, dtype
        self.hidden, self.inter = checkpoint.config.hidden_size, checkpoint.config.intermediate_size
        self.loaded: dict[tuple[int, int], Expert] = {}
        self.gets = 0  # calls through the seam

    def prepare(self, layer: int, wanted: list[int], h: torch.Tensor) -> list[int]:
        """Nothing to plan when every expert is resident: compute in the router's order."""
        return wanted

    def place_all(self) -> None:
        """Read (and pack) every expert now: what a benchmark does first, so that no timed token pays
        for an expert's first use (an int4 Scout expert packs in seconds)."""
        for layer in self.checkpoint.config.moe_layers:
            for e in range(self.checkpoint.config.num_local_experts):
                self._load(layer, e)

    def get(self, layer: int, e: int) -> Expert:
        self.gets += 1
        return self._load(layer, e)

    def _load(self, layer: int, e: int) -> Expert:
        expert = self.loaded.get((layer, e))
        if expert is None:
            buffer = memory.empty(self.fmt.nbytes(self.hidden, self.inter), torch.uint8)
            self.checkpoint.read_expert_into(layer, e, buffer, self.fmt)  # packed on the host, then moved once
            expert = self.fmt.settle(self.fmt.expert(buffer.to(self.device), self.hidden, self.inter), self.dtype)
            self.loaded[(layer, e)] = expert
        return expert

    def snapshot(self) -> ExpertStats:
        return ExpertStats(format=self.fmt.name, bytes_per_expert=self.fmt.nbytes(self.hidden, self.inter),
                           gets=self.gets, resident=len(self.loaded),
                           device_bytes=sum(x.nbytes for x in self.loaded.values()))

    def close(self) -> None:
        pass
