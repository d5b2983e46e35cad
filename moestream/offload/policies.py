"""Eviction policies of the expert cache: which unprotected resident of a slot group goes next.

- LRU: least recently used.
- LFU: least often used over the whole run (ties: least recent).
- predictive: aims at Belady's MIN (evict the expert whose next use is farthest) with what can be
  known online: a per-layer Markov chain of routing learned from the run, plus the prefetcher's
  guesses for the coming layers. Exact MIN needs the future: analysis/oracles.py computes it offline
  for a recorded trace, the bound every policy is measured against.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

Key = tuple[int, int]  # (layer, expert)


class LRU:
    name = "lru"

    def __init__(self, moe_layers: list[int]):
        self.last: dict[Key, int] = {}
        self.clock = 0

    def observe(self, layer: int, wanted: list[int]) -> None:
        """Every layer's routing, hit or miss (frequency-aware policies learn from it)."""

    def predicted(self, keys: dict[Key, int]) -> None:
        """Experts the prefetcher expects, with their distance in layers."""

    def touch(self, key: Key) -> None:
        self.clock += 1
        self.last[key] = self.clock

    def forget(self, key: Key) -> None:
        self.last.pop(key, None)

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: self.last.get(k, 0))


class LFU(LRU):
    name = "lfu"

    def __init__(self, moe_layers: list[int]):
        super().__init__(moe_layers)
        self.count: dict[Key, int] = defaultdict(int)

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.count[key] += 1

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count[k], self.last.get(k, 0)))


class Predictive(LRU):
    """Evict the expert with the least expected use to come, learned from the routing itself.

    Per layer it counts transitions between one token's experts and the next token's (consecutive
    tokens' routing is correlated), giving a Markov chain P. From a layer's latest choice v, the
    discounted expected uses of expert x over all tokens to come are (v P (I - gamma P)^-1)[x];
    experts of layers the current token has not reached yet are due sooner, so they are discounted
    by the fraction of a token until their layer comes round. An expert the prefetcher predicted
    for a coming layer counts one use more. On the embedded model's sampled routing this is 0.02-0.09
    of MIN above LFU (per-layer and global splits, three traces); on greedy routing it ties
    (`benchmarks/offload_cpu.py`).
    """

    name = "predictive"
    GAMMA = 0.6  # discount per token: how far ahead expected uses still count
    PRIOR = 0.5  # pseudo-count per transition, so that unseen transitions keep some probability

    def __init__(self, moe_layers: list[int]):
        super().__init__(moe_layers)
        self.order = {layer: i for i, layer in enumerate(moe_layers)}
        self.n = max(1, len(moe_layers))
        self.now = 0  # position (index into moe_layers) of the layer being routed
        self.state: dict[int, list[int]] = {}  # layer -> its latest experts
        self.counts: dict[int, np.ndarray] = {}  # layer -> transition counts [E, E]
        self.seen: dict[int, int] = defaultdict(int)  # layer -> transitions counted
        self.future: dict[int, tuple[int, np.ndarray]] = {}  # layer -> (seen at build, P (I - gamma P)^-1)
        self.scores: dict[int, list[float]] = {}  # layer -> expected discounted uses per expert
        self.expected: set[Key] = set()
        self.discount = [self.GAMMA ** (ahead / self.n) for ahead in range(self.n + 1)]

    def observe(self, layer: int, wanted: list[int]) -> None:
        if layer not in self.order:  # a layer whose experts never enter the cache (--n-cpu-moe)
            return
        self.now = self.order[layer]
        prev = self.state.get(layer)
        need = max(wanted, default=-1) + 1
        counts = self.counts.get(layer)
        if counts is None or counts.shape[0] < need:  # grow to the largest expert index seen
            grown = np.zeros((need, need))
            if counts is not None:
                grown[:counts.shape[0], :counts.shape[0]] = counts
            counts = self.counts[layer] = grown
        if prev is not None:
            share = 1.0 / len(prev)
            for a in prev:
                row = counts[a]
                for b in wanted:
                    row[b] += share
            self.seen[layer] += 1
        self.state[layer] = list(wanted)
        self.scores.pop(layer, None)
        self.expected = set()

    def predicted(self, keys: dict[Key, int]) -> None:
        self.expected.update(keys)

    def _future(self, layer: int) -> np.ndarray:
        """P (I - gamma P)^-1 for the layer, rebuilt as its counts grow (often at first, then rarely)."""
        seen, counts = self.seen[layer], self.counts[layer]
        built = self.future.get(layer)
        if built is None or built[1].shape[0] != counts.shape[0] or seen - built[0] >= max(16, built[0] // 8):
            p = counts + self.PRIOR
            p /= p.sum(axis=1, keepdims=True)
            built = self.future[layer] = (seen, p @ np.linalg.inv(np.eye(len(p)) - self.GAMMA * p))
        return built[1]

    def _scores(self, layer: int) -> list[float]:
        scores = self.scores.get(layer)
        if scores is None:
            m, state = self._future(layer), self.state[layer]
            rows = m[state[0]] if len(state) == 1 else m[state].mean(axis=0)
            scores = self.scores[layer] = rows.tolist()
        return scores

    def expected_uses(self, key: Key) -> float:
        layer, e = key
        if layer not in self.state:
            return 0.0
        ahead = (self.order[layer] - self.now - 1) % self.n + 1  # layers until key's layer comes round
        scores = self._scores(layer)
        uses = scores[e] if e < len(scores) else 0.0
        return self.discount[ahead] * (uses + (key in self.expected))

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.expected_uses(k), self.last.get(k, 0)))


POLICIES = {"lru": LRU, "lfu": LFU, "predictive": Predictive}
