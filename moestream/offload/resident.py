"""ResidentExperts: the expert source when the budget holds every expert — no store, no copies.

Each expert is read from the checkpoint into its own device buffer the first time a token routes to
it (not at load: start-up stays fast, and tests count the reads to prove laziness); after warm-up
it is simply the resident model.
"""

from __future__ import annotations

import torch

from ..model.experts import ExpertStats, PackedExpert


class ResidentExperts:
    def __init__(self, checkpoint, device, dtype):
        self.checkpoint = checkpoint
        self.device, self.dtype = device, dtype
        self.loaded: dict[tuple[int, int], PackedExpert] = {}
        self.gets = 0  # calls through the seam

    def prepare(self, layer: int, wanted: list[int], h: torch.Tensor) -> list[int]:
        """Nothing to plan when every expert is resident: compute in the router's order."""
        return wanted

    def get(self, layer: int, e: int) -> PackedExpert:
        self.gets += 1
        expert = self.loaded.get((layer, e))
        if expert is None:
            gate_up, down = self.checkpoint.read_expert(layer, e)
            expert = self.loaded[(layer, e)] = PackedExpert.pack(gate_up, down, self.device, self.dtype)
        return expert

    def snapshot(self) -> ExpertStats:
        return ExpertStats(gets=self.gets, resident=len(self.loaded),
                           device_bytes=sum(x.nbytes for x in self.loaded.values()))

    def close(self) -> None:
        pass
