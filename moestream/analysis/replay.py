"""Replay a recorded routing trace through the cache policies with a cost model (`moestream bench replay`).

Hit rates are those of demand-fetch caches with the same number of slots, so Belady's MIN bounds
them all; next to the online policies, oracles that see the next 1 and 4 tokens' routing exactly
show how much any predictor of routing could add. The cost model then prices each decode step: a layer's own compute, each expert's
compute, and for each miss either the copy (hidden behind the previous layer's compute when the
prefetcher had guessed it, as recorded in the trace) or a run on the CPU when that is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..profiling.routing import Trace
from .oracles import belady, lookahead_oracle, simulate


ORACLE_TOKENS = (1, 4)  # eviction oracles that see this many tokens of routing ahead (bounds for predictors)


@dataclass
class CostSettings:
    link_gbps: float = 50.0  # host -> device GB/s (measure it; 50 is PCIe 5 x16 pinned)
    expert_ms: float = 0.1  # one expert, one token, on the device
    layer_ms: float = 0.3  # a layer's attention + router + shared expert, one token
    cpu_expert_ms: float | None = None  # one expert on the CPU; None = never run experts on the CPU


@dataclass
class ReplayRow:
    policy: str
    split: str
    prefetch: bool
    hits: int
    accesses: int
    min_hits: int
    decode_tokens: int
    decode_misses: int
    stall_s: float
    total_s: float
    expert_bytes: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def of_min(self) -> float:
        return self.hits / self.min_hits if self.min_hits else 1.0

    @property
    def bytes_per_token(self) -> float:
        return self.decode_misses * self.expert_bytes / max(1, self.decode_tokens)

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.total_s if self.total_s else 0.0


def _sequence(trace: Trace):
    """Per access, in order: (layer, expert), whether its step decodes one token, the next layer's
    recorded guesses (for the predictive policy), and whether the prefetcher had guessed it."""
    accesses, decode, guesses, predicted = [], [], [], []
    records = trace.records
    for j, r in enumerate(records):
        nxt = records[j + 1] if j + 1 < len(records) and records[j + 1]["step"] == r["step"] else None
        guess = {(nxt["layer"], e): 1 for e in nxt.get("predicted", [])} if nxt else {}
        guessed_here = set(r.get("predicted", []))
        for e in dict.fromkeys(e for row in r["experts"] for e in row):
            accesses.append((r["layer"], e))
            decode.append(len(r["experts"]) == 1)
            guesses.append(guess)
            predicted.append(e in guessed_here)
    return accesses, decode, guesses, predicted


def replay(trace: Trace, slots: int, cost: CostSettings) -> list[ReplayRow]:
    accesses, decode, guesses, predicted = _sequence(trace)
    layers = trace.meta["moe_layers"]
    eb = trace.meta["expert_bytes"]
    per_layer_slots = slots // max(1, len(layers))
    splits = {"global": (slots, None), "per-layer": (per_layer_slots, {layer: layer for layer in layers})}
    transfer_s = eb / (cost.link_gbps * 1e9)
    layer_s, expert_s = cost.layer_ms / 1e3, cost.expert_ms / 1e3
    cpu_s = cost.cpu_expert_ms / 1e3 if cost.cpu_expert_ms is not None else None
    decode_tokens = sum(1 for r in trace.records if r["layer"] == layers[0] and len(r["experts"]) == 1)
    decode_layer_steps = sum(1 for r in trace.records if len(r["experts"]) == 1)

    rows = []
    for split, (n, groups) in splits.items():
        min_flags = belady(accesses, n, groups)
        runs = [(policy, pf, simulate(accesses, n, policy, layers, groups, guesses if pf else None))
                for policy, pf in (("lru", False), ("lru", True), ("lfu", True), ("predictive", True))]
        runs += [(f"oracle: next {t} token{'s' if t > 1 else ''}", True,
                  lookahead_oracle(accesses, n, groups, t * len(layers))) for t in ORACLE_TOKENS]
        runs.append(("Belady MIN", True, min_flags))
        for name, with_prefetch, flags in runs:
            stall, misses = 0.0, 0
            for hit, is_decode, guessed in zip(flags, decode, predicted):
                if hit or not is_decode:
                    continue
                misses += 1
                wait = max(0.0, transfer_s - layer_s) if (with_prefetch and guessed) else transfer_s
                if cpu_s is not None:
                    wait = min(wait, max(0.0, cpu_s - expert_s))
                stall += wait
            decode_accesses = sum(decode)
            total = decode_layer_steps * layer_s + decode_accesses * expert_s + stall
            rows.append(ReplayRow(name, split, with_prefetch, sum(flags), len(accesses), sum(min_flags),
                                  decode_tokens, misses, stall, total, eb))
    return rows
