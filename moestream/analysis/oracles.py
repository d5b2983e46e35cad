"""Offline bounds on a recorded expert-access sequence: Belady's MIN (optimal for demand fetch),
eviction oracles that see the next few tokens' routing exactly, and any online policy simulated on
the same capacity, so a policy's hit rate can be read as a fraction of the best possible.
"""

from __future__ import annotations

from collections import defaultdict

from ..offload.policies import POLICIES, Key


def _next_uses(accesses: list[Key]) -> list[int]:
    """For each access, the index of the next access to the same key (never again: farther than any)."""
    n = len(accesses)
    next_use, seen = [n] * n, {}
    for i in range(n - 1, -1, -1):
        next_use[i] = seen.get(accesses[i], n + i)
        seen[accesses[i]] = i
    return next_use


def belady(accesses: list[Key], slots: int, groups: dict[int, int] | None = None) -> list[bool]:
    """Hit (True) or miss of every access under Belady's MIN: on a miss with a full cache, evict the
    resident used farthest ahead.

    `groups` maps layer -> slot-group id for a per-layer split (each group has `slots` slots);
    None = one global pool. Optimal among all demand-fetch policies with the same capacity.
    """
    next_use = _next_uses(accesses)
    resident: dict[int, dict[Key, int]] = defaultdict(dict)  # group -> key -> its next use
    hits = []
    for i, key in enumerate(accesses):
        g = groups[key[0]] if groups else 0
        cache = resident[g]
        hits.append(key in cache)
        if not hits[-1] and len(cache) >= slots:
            if slots == 0:
                continue
            del cache[max(cache, key=cache.get)]
        if slots:
            cache[key] = next_use[i]
    return hits


def simulate(accesses: list[Key], slots: int, policy: str, moe_layers: list[int],
             groups: dict[int, int] | None = None, predictions: list[dict[Key, int]] | None = None) -> list[bool]:
    """Hit or miss of every access under an online policy (demand fetch, same capacity as MIN)."""
    pol = POLICIES[policy](moe_layers)
    resident: dict[int, set[Key]] = defaultdict(set)
    hits = []
    for i, key in enumerate(accesses):
        pol.observe(key[0], [key[1]])
        if predictions is not None:
            pol.predicted(predictions[i])
        g = groups[key[0]] if groups else 0
        cache = resident[g]
        hits.append(key in cache)
        if not hits[-1] and slots:
            if len(cache) >= slots:
                victim = pol.victim(list(cache))
                cache.discard(victim)
                pol.forget(victim)
            cache.add(key)
        pol.touch(key)
    return hits


def lookahead_oracle(accesses: list[Key], slots: int, groups: dict[int, int] | None, horizon: int) -> list[bool]:
    """Hit or miss of every access under an eviction rule that sees the next `horizon` accesses exactly
    (MIN within them) and ranks the rest by use so far (LFU): what an online policy could reach with a
    perfect predictor of the next few tokens' routing. A demand-fetch policy, so MIN bounds it too."""
    if slots == 0:
        return [False] * len(accesses)
    next_use = _next_uses(accesses)
    resident, count, hits = {}, {}, []
    for i, key in enumerate(accesses):
        cache = resident.setdefault(groups[key[0]] if groups else 0, {})
        hits.append(key in cache)
        if not hits[-1] and len(cache) >= slots:
            def farthest(k):
                return (0, cache[k]) if cache[k] - i <= horizon else (1, -count[k])
            del cache[max(cache, key=farthest)]
        cache[key] = next_use[i]
        count[key] = count.get(key, 0) + 1
    return hits
