"""OffloadedExperts: what `experts.prepare / get` means when experts do not all fit the device.

For each MoE layer step, in order:
1. score the prefetcher's earlier guesses for this layer, let the cache policy learn the routing;
2. decide every wanted expert: a cache hit (waiting only for its own copy if it is still in flight),
   a fetch into a slot (demand priority), or - for --cpu-moe layers, a full cache, or when the
   cost model says so - a run on the CPU from host RAM; with miss replicas (--miss-dtype), a decoded
   token's miss runs at once from its low-bit replica on the CPU while the full expert is fetched
   into a slot for next time (HOBBIT's trade: a little accuracy for no stall);
3. for a single-token step, guess the next layers' experts and start their copies (prefetch
   priority), never evicting an expert this layer needs or one just prefetched;
then `get` hands the model a callable expert: device weights, or a CPU twin that moves only the
tokens' activations across the bus.
"""

from __future__ import annotations

import time

import torch

from ..model.experts import ExpertCounters, ExpertStats
from ..model.formats import Expert
from .cache import ExpertCache
from .cost import CostModel
from .prefetch import Prefetcher
from .store import ExpertStore
from .transfer import Ticket, TransferEngine


class CPUExpert:
    """Runs an expert from host RAM: only the tokens' activations move between devices."""

    __slots__ = ("expert", "counters")
    on_cpu = True

    def __init__(self, expert: Expert, counters: ExpertCounters):
        self.expert, self.counters = expert, counters

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.expert(x.to("cpu")).to(x.device)
        self.counters.cpu_seconds += time.perf_counter() - t0
        return y


class OffloadedExperts:
    """guess_log: the routing trace's buffer, when one is recorded: the prefetcher's guess for each
    layer is appended right after the model's routing record of that layer."""

    def __init__(self, store: ExpertStore, cache: ExpertCache, transfer: TransferEngine,
                 prefetcher: Prefetcher | None, cost: CostModel | None, cpu_experts: str, cpu_layers: frozenset[int],
                 guess_log: list | None = None, replicas: ExpertStore | None = None):
        self.store, self.cache, self.transfer = store, cache, transfer
        self.prefetcher, self.cost = prefetcher, cost
        self.cpu_experts, self.cpu_layers = cpu_experts, cpu_layers
        self.guess_log = guess_log if prefetcher is not None else None
        self.replicas = replicas
        self.counters = ExpertCounters()
        self.inflight: dict[tuple[int, int], Ticket] = {}
        self.unused_prefetch: set[tuple[int, int]] = set()  # prefetched, not yet wanted
        # the current layer step's decisions, one container per kind
        self.slot_for: dict[int, int] = {}  # expert -> its cache slot
        self.on_cpu: dict[int, CPUExpert] = {}  # expert -> its run on the CPU
        self.deferred: set[int] = set()  # experts that wait for a slot this step frees
        self.not_yet_computed: set[tuple[int, int]] = set()  # this step's experts not yet handed to the model
        self.gets = 0

    # --- the seam the model calls ----------------------------------------------------------------
    def prepare(self, layer: int, wanted: list[int], h: torch.Tensor) -> list[int]:
        """Decide and start everything this layer step needs; returns the order to compute in
        (deferred fetches last, so the experts computed before them free their slots)."""
        c, tokens = self.counters, h.shape[0]
        if self.prefetcher is not None:
            if self.guess_log is not None:  # the routing trace records the guess that was made for this layer
                self.guess_log.append(self.prefetcher.next_guess.get(layer))
            self.prefetcher.score(layer, wanted)
        if layer not in self.cpu_layers:
            self.cache.policy.observe(layer, wanted)
        protect = self.not_yet_computed = {(layer, e) for e in wanted}
        self.slot_for, self.on_cpu, self.deferred = {}, {}, set()
        for e in wanted:
            key = (layer, e)
            if layer in self.cpu_layers:
                self.on_cpu[e] = self._run_on_cpu(key)
                continue
            slot = self.cache.lookup(key)
            if slot is not None:
                c.hits += 1
                if key in self.unused_prefetch:
                    self.unused_prefetch.discard(key)
                    c.prefetch_hits += 1
                self.cache.policy.touch(key)
                self.slot_for[e] = slot
                continue
            c.misses += 1
            if self.replicas is not None and tokens == 1 and key not in self.inflight:
                self.on_cpu[e] = self._run_replica(key, protect)
                continue
            if self.cpu_experts == "always" or (
                self.cpu_experts == "auto" and self.cost is not None and self.cost.prefer_cpu(tokens)
            ):
                self.on_cpu[e] = self._run_on_cpu(key)
                continue
            slot = self._claim(key, protect)
            if slot is None:  # every slot holds an expert this step needs
                if self.cpu_experts == "never":  # wait until earlier experts of this step are done with their slots
                    self.deferred.add(e)
                else:
                    self.on_cpu[e] = self._run_on_cpu(key)
                continue
            self._demand_fetch(key, slot)
            self.slot_for[e] = slot
        if self.prefetcher is not None and tokens == 1:
            self._prefetch(layer, h, protect)
        return sorted(wanted, key=lambda e: e in self.deferred)

    def get(self, layer: int, e: int):
        self.gets += 1
        key = (layer, e)
        self.not_yet_computed.discard(key)
        if e in self.on_cpu:
            return self.on_cpu[e]
        if e in self.deferred:  # the experts already computed this step may give up their slots now
            self.slot_for[e] = self._claim(key, self.not_yet_computed | {key})
            self._demand_fetch(key, self.slot_for[e])
        ticket = self.inflight.pop(key, None)
        if ticket is not None:
            self.counters.stall_seconds += self._wait(key, ticket)
        return self.cache.slot_experts[self.slot_for[e]]

    def snapshot(self) -> ExpertStats:
        """The counters of every part, as one group of llm.stats()."""
        prefetch = self.prefetcher.snapshot() if self.prefetcher is not None else {}
        return ExpertStats(format=self.store.fmt.name, bytes_per_expert=self.store.nbytes, gets=self.gets,
                           **vars(self.counters), **self.cache.snapshot(),
                           **self.transfer.snapshot(), **self.store.snapshot(),
                           replica_bytes=self.replicas.host_bytes if self.replicas is not None else 0,
                           prefetch_recall={d: v["recall"] for d, v in prefetch.items()},
                           prefetch_precision={d: v["precision"] for d, v in prefetch.items()})

    # --- helpers -----------------------------------------------------------------------------------
    def _claim(self, key, protect: set) -> int | None:
        slot, victim = self.cache.assign(key, protect)
        if victim is not None:
            old = self.inflight.pop(victim, None)
            if old is not None:  # its copy must land before the slot is overwritten
                self._wait(key, old)  # (a failed one leaves the slot, now key's, empty)
            if victim in self.unused_prefetch:
                self.unused_prefetch.discard(victim)
                self.counters.prefetch_wasted += 1
        return slot

    def _fetch(self, key, slot: int, prefetch: bool = False) -> None:
        try:
            self.inflight[key] = self.transfer.fetch(key, slot, prefetch)
        except Exception:  # a read that failed on this thread (the copy is over): key's slot holds nothing
            self.cache.release(key)
            raise

    def _demand_fetch(self, key, slot: int) -> None:
        """Start a wanted expert's copy into its slot, counted, and tell the policy it was used."""
        self._fetch(key, slot)
        self.counters.fetches += 1
        self.cache.policy.touch(key)

    def _wait(self, key, ticket: Ticket) -> float:
        """Wait for a copy into key's slot. One that failed (a corrupt expert file) leaves the slot
        empty, so the cache never hands out a half-read expert, even if the caller carries on."""
        try:
            return ticket.wait()
        except Exception:
            self.cache.release(key)
            raise

    def _run_replica(self, key, protect: set) -> CPUExpert:
        """The miss runs from its replica now; the full expert's copy starts, not waited for."""
        self.counters.cpu_runs += 1
        self.counters.replica_runs += 1
        slot = self._claim(key, protect)
        if slot is not None:
            self._demand_fetch(key, slot)
        return CPUExpert(self.replicas.host_expert(key), self.counters)

    def _run_on_cpu(self, key) -> CPUExpert:
        self.counters.cpu_runs += 1
        if self.store.tier(key) == "host":
            return CPUExpert(self.store.host_expert(key), self.counters)
        return CPUExpert(self.transfer.read_to_host(key), self.counters)

    def _prefetch(self, layer: int, h: torch.Tensor, protect: set) -> None:
        guesses = self.prefetcher.predict(layer, h)
        self.cache.policy.predicted({(t, e): d for t, d, experts in guesses for e in experts})
        protect = set(protect) | {(t, e) for t, _, experts in guesses for e in experts}
        for target, _, experts in guesses:
            if target in self.cpu_layers:
                continue
            for e in experts:
                key = (target, e)
                if self.cache.lookup(key) is not None:
                    continue
                slot = self._claim(key, protect)
                if slot is None:
                    return
                self._fetch(key, slot, prefetch=True)
                self.unused_prefetch.add(key)
                self.counters.prefetch_issued += 1
                self.cache.policy.touch(key)

    def close(self) -> None:
        for key, ticket in self.inflight.items():
            try:
                ticket.wait()
            except Exception:  # a failed copy is never used; closing still finishes
                self.cache.release(key)
        self.inflight.clear()
        self.transfer.close()
