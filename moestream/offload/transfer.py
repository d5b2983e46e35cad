"""TransferEngine: copies experts from the ExpertStore into ExpertCache slots without blocking compute.

On CUDA: host-tier copies are issued on dedicated copy streams from pinned memory (demand fetches on
a high-priority stream, so they never queue behind speculative prefetches) and finish with an
event; compute waits on that event only when it needs that very expert. Disk-tier experts are
read by a worker thread into a pinned staging buffer first.
On CPU (tests, CI): the same engine with the compute device = CPU. A host-tier "copy" is a memcpy
on the calling thread (a hop to another thread costs more than copying a few hundred KB, and on a
small machine a second Python thread holding the GIL stalls compute); disk-tier reads go to the
worker thread, so queueing, priority and waiting all run in tests.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from concurrent.futures import Future

import torch

from ..profiling.recorder import NULL
from .cache import ExpertCache
from .store import ExpertStore

DEMAND, PREFETCH = 0, 1  # worker priorities: lower runs first


class Ticket:
    """One copy in flight into one cache slot."""

    __slots__ = ("future", "event", "prefetch", "span")

    def __init__(self, future: Future | None = None, event=None, prefetch: bool = False, span=None):
        self.future, self.event, self.prefetch, self.span = future, event, prefetch, span

    def wait(self) -> float:
        """Make compute wait for the copy; returns the seconds the host was blocked."""
        t0 = time.perf_counter()
        if self.future is not None:
            result = self.future.result()
            if self.span is not None:  # (recorder, name, track, args): the worker timed it, we record it
                rec, name, track, args = self.span
                self.span = None
                start, end = result
                rec.complete(name, (start - rec.origin) * 1e6, (end - rec.origin) * 1e6, track, **args)
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
        return time.perf_counter() - t0


def clocked(fn, *args) -> tuple[float, float]:
    """Run fn(*args) and return its start and end on the perf_counter clock."""
    start = time.perf_counter()
    fn(*args)
    return start, time.perf_counter()


class CopyWorker:
    """One background thread running jobs by priority (demand before prefetch), FIFO within one."""

    def __init__(self):
        self.jobs: queue.PriorityQueue = queue.PriorityQueue()
        self.order = itertools.count()
        self.thread = threading.Thread(target=self._run, name="moestream-copy", daemon=True)
        self.thread.start()

    def submit(self, priority: int, fn, *args) -> Future:
        future: Future = Future()
        self.jobs.put((priority, next(self.order), fn, args, future))
        return future

    def _run(self) -> None:
        while True:
            _, _, fn, args, future = self.jobs.get()
            if fn is None:
                return
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the ticket
                future.set_exception(e)

    def close(self) -> None:
        self.jobs.put((-1, -1, None, (), None))
        self.thread.join()


class TransferEngine:
    def __init__(self, store: ExpertStore, cache: ExpertCache, device: torch.device, rec=NULL):
        self.store, self.cache, self.device = store, cache, device
        self.cuda = device.type == "cuda"
        self.worker = CopyWorker()
        self._stop = weakref.finalize(self, self.worker.close)  # also at interpreter exit
        self.bytes_host_to_device = 0
        self.bytes_disk_to_host = 0
        self.rec = rec  # profiling recorder: copies get spans on their own tracks
        if self.cuda:
            self.demand_stream = torch.cuda.Stream(device, priority=-1)
            self.prefetch_stream = torch.cuda.Stream(device)
            self.staging = torch.empty(store.nbytes, dtype=torch.uint8, pin_memory=True)

    def fetch(self, key, slot: int, prefetch: bool = False) -> Ticket:
        dst = self.cache.pool[slot]
        nbytes = dst.numel() * dst.element_size()
        self.bytes_host_to_device += nbytes
        on_disk = self.store.tier(key) == "disk"
        if on_disk:
            self.bytes_disk_to_host += nbytes
        priority = PREFETCH if prefetch else DEMAND
        if not self.cuda:
            # on this thread: a host-tier memcpy (a hop to the worker costs more than the copy), or a
            # disk read that needs torch ops (see ExpertStore.reads_with_torch)
            if not on_disk or self.store.reads_with_torch:
                start = time.perf_counter()
                if on_disk:
                    self.store.read_into(key, dst)
                else:
                    dst.copy_(self.store.host[self.store.host_index[key]])
                if self.rec.enabled:
                    name, track = ("expert read", "disk") if on_disk else ("expert copy", "H2D stream")
                    self.rec.add((name, start, time.perf_counter(), (*key, track, (("prefetch", prefetch),))))
                return Ticket(prefetch=prefetch)
            job, span = (self.store.read_into, key, dst), None
            if self.rec.enabled:  # the worker only reads the clock; the span is recorded when waited on
                job, span = (clocked, *job), (self.rec, "expert read", "disk",
                                             {"layer": key[0], "expert": key[1], "prefetch": prefetch})
            return Ticket(future=self.worker.submit(priority, *job), prefetch=prefetch, span=span)

        if self.rec.enabled:
            self.rec.counter("expert copies in flight", prefetch=int(prefetch), demand=int(not prefetch))
        stream = self.prefetch_stream if prefetch else self.demand_stream
        ready = torch.cuda.Event()
        ready.record()  # the slot's previous occupant may still be read by queued compute
        done = torch.cuda.Event()
        if not on_disk:
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                dst.copy_(self.store.host[self.store.host_index[key]], non_blocking=True)
                done.record(stream)
            return Ticket(event=done, prefetch=prefetch)

        def from_disk():
            self.store.read_into(key, self.staging)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                dst.copy_(self.staging, non_blocking=True)
                done.record(stream)
            done.synchronize()  # the staging buffer is reused by the next read

        return Ticket(future=self.worker.submit(priority, from_disk), event=done, prefetch=prefetch)

    def read_to_host(self, key):
        """A disk-tier expert read into a fresh host buffer (to run on the CPU), on this thread."""
        buffer = torch.empty(self.store.nbytes, dtype=torch.uint8)
        self.bytes_disk_to_host += self.store.read_into(key, buffer)
        return self.store.fmt.expert(buffer, self.store.hidden, self.store.inter)

    def snapshot(self) -> dict:
        return {"bytes_host_to_device": self.bytes_host_to_device, "bytes_disk_to_host": self.bytes_disk_to_host}

    def close(self) -> None:
        self._stop()
