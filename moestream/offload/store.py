"""Routed-expert storage: the one seam between the model and where expert weights live.

The MoE block calls `experts.get(layer, e)` for each expert its router picked and nothing else;
that call is the only place the model knows experts might not be resident. Each expert is packed
into ONE contiguous buffer (gate_up then down), so moving it between tiers is a single copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.checkpoint import Checkpoint


class PackedExpert:
    """One routed expert: buffer = [gate_up (D x 2F) | down (F x D)], x@W orientation."""

    __slots__ = ("buffer", "gate_up", "down")

    def __init__(self, buffer: torch.Tensor, hidden: int, inter: int):
        self.buffer = buffer
        n = hidden * 2 * inter
        self.gate_up = buffer[:n].view(hidden, 2 * inter)
        self.down = buffer[n:].view(inter, hidden)

    @classmethod
    def pack(cls, gate_up: torch.Tensor, down: torch.Tensor, device, dtype) -> "PackedExpert":
        hidden, inter = down.shape[1], down.shape[0]
        buffer = torch.empty(gate_up.numel() + down.numel(), device=device, dtype=dtype)
        expert = cls(buffer, hidden, inter)
        expert.gate_up.copy_(gate_up)
        expert.down.copy_(down)
        return expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(x @ Wgate) * (x @ Wup))."""
        gate, up = (x @ self.gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class ResidentExperts:
    """Every expert on the compute device, each read from the checkpoint the first time it is used.

    The degenerate case of an expert cache whose budget holds all experts: after warm-up there are
    no copies at all. Reading on first use (not at load) keeps start-up fast and proves laziness.
    """

    def __init__(self, checkpoint: Checkpoint, device, dtype):
        self.checkpoint = checkpoint
        self.device, self.dtype = device, dtype
        self.experts: dict[tuple[int, int], PackedExpert] = {}
        self.gets = 0  # calls through the narrow interface

    def get(self, layer: int, e: int) -> PackedExpert:
        self.gets += 1
        expert = self.experts.get((layer, e))
        if expert is None:
            gate_up, down = self.checkpoint.read_expert(layer, e)
            expert = self.experts[(layer, e)] = PackedExpert.pack(gate_up, down, self.device, self.dtype)
        return expert

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.experts.values())
