"""ExpertCache: slots on the compute device holding packed experts; which expert sits where.

A slot is one row of a single byte pool, in the experts' format, so an expert fetch is one copy into
one row. Capacity is
either one pool shared by all layers ("global") or an equal share per MoE layer ("per-layer"); the
policy (offload/policies.py) picks the victim within a key's group.
"""

from __future__ import annotations

import torch

from ..model.formats import ExpertFormat
from .policies import POLICIES, Key


class ExpertCache:
    """`slots` packed experts on the compute device; which expert sits where; who goes next."""

    def __init__(self, slots: int, fmt: ExpertFormat, hidden: int, inter: int, device, policy: str, split: str,
                 moe_layers: list[int]):
        self.pool = torch.empty(slots, fmt.nbytes(hidden, inter), device=device, dtype=torch.uint8)
        self.slot_experts = [fmt.expert(self.pool[i], hidden, inter) for i in range(slots)]  # views of the rows
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * slots
        self.policy = POLICIES[policy](moe_layers)
        if split == "auto":
            split = "per-layer" if moe_layers and slots >= len(moe_layers) else "global"
        self.split = split
        if split == "per-layer" and moe_layers:  # an equal share each; the remainder to the first layers
            share, extra = divmod(slots, len(moe_layers))
            bounds = [0]
            for i in range(len(moe_layers)):
                bounds.append(bounds[-1] + share + (i < extra))
            self.groups = {layer: list(range(bounds[i], bounds[i + 1])) for i, layer in enumerate(moe_layers)}
        else:
            self.groups = {layer: list(range(slots)) for layer in moe_layers}
        self.evictions = 0

    @property
    def slots(self) -> int:
        return len(self.key_of)

    @property
    def nbytes(self) -> int:
        return self.pool.numel()

    def snapshot(self) -> dict:
        return {"slots": self.slots, "resident": len(self.slot_of), "device_bytes": self.nbytes}

    def lookup(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def assign(self, key: Key, protect: set[Key]) -> tuple[int | None, Key | None]:
        """(slot, evicted key) for `key`: a free slot of its group, else the policy's victim outside
        `protect`; (None, None) when every candidate is protected."""
        group = self.groups.get(key[0], [])
        free = [s for s in group if self.key_of[s] is None]
        victim = None
        if free:
            slot = free[0]
        else:
            candidates = [self.key_of[s] for s in group if self.key_of[s] not in protect]
            if not candidates:
                return None, None
            victim = self.policy.victim(candidates)
            slot = self.slot_of.pop(victim)
            self.policy.forget(victim)
            self.evictions += 1
        self.key_of[slot] = key
        self.slot_of[key] = slot
        return slot, victim

    def release(self, key: Key) -> None:
        """Empty key's slot (its copy failed: the row holds nothing usable)."""
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.key_of[slot] = None
        self.policy.forget(key)
