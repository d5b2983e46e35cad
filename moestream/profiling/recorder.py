"""Recorder: spans and counters from every part of the runtime, for traces, summaries and plots.

Off by default: the parts hold `NULL` (a NullRecorder), whose `span` hands back one shared
do-nothing context manager, so an unprofiled run pays a method call per span and nothing else.
On, spans are complete events with microsecond timestamps on named tracks ("compute",
"H2D stream", "disk", "CPU experts"); on CUDA, device work is timed with CUDA events so the spans
show device time, not launch time.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch

TRACKS = ("compute", "H2D stream", "disk", "CPU experts", "sampling")


class _NoSpan:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()


class NullRecorder:
    """The recorder when profiling is off: every call does nothing."""

    enabled = False

    def span(self, name: str, track: str = "compute", **args):
        return _NO_SPAN

    def complete(self, name: str, start_us: float, end_us: float, track: str = "compute", **args) -> None:
        pass

    def counter(self, name: str, **values) -> None:
        pass

    def now(self) -> float:
        return 0.0


NULL = NullRecorder()


class Recorder(NullRecorder):
    enabled = True

    def __init__(self, device: torch.device | None = None):
        self.events: list[dict] = []
        self.origin = time.perf_counter()
        self.lock = threading.Lock()  # the copy worker records from its own thread
        self.cuda = device is not None and device.type == "cuda"
        self.pending_cuda: list[tuple] = []  # (name, track, args, start event, end event), resolved at export
        if self.cuda:
            self.base_event = torch.cuda.Event(enable_timing=True)
            self.base_event.record()
            self.base_us = self.now()

    def now(self) -> float:
        """Microseconds since the recorder started."""
        return (time.perf_counter() - self.origin) * 1e6

    @contextmanager
    def span(self, name: str, track: str = "compute", **args):
        if self.cuda and track == "compute":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.pending_cuda.append((name, track, args, start, end))
            return
        t0 = self.now()
        try:
            yield
        finally:
            self.complete(name, t0, self.now(), track, **args)

    def complete(self, name: str, start_us: float, end_us: float, track: str = "compute", **args) -> None:
        event = {"name": name, "cat": track, "ph": "X", "ts": start_us, "dur": max(0.0, end_us - start_us),
                 "pid": 1, "tid": TRACKS.index(track) + 1 if track in TRACKS else 9, "args": args}
        with self.lock:
            self.events.append(event)

    def counter(self, name: str, **values) -> None:
        event = {"name": name, "cat": "counter", "ph": "C", "ts": self.now(), "pid": 1, "tid": 0,
                 "args": {k: float(v) for k, v in values.items()}}
        with self.lock:
            self.events.append(event)

    def resolve_cuda(self) -> None:
        """Turn CUDA event pairs into spans on the host clock (after a synchronize)."""
        if not self.pending_cuda:
            return
        torch.cuda.synchronize()
        for name, track, args, start, end in self.pending_cuda:
            ts = self.base_us + self.base_event.elapsed_time(start) * 1e3
            self.complete(name, ts, ts + start.elapsed_time(end) * 1e3, track, **args)
        self.pending_cuda.clear()

    def chrome_trace(self) -> dict:
        """{"traceEvents": [...]} for ui.perfetto.dev / chrome://tracing, with named tracks."""
        self.resolve_cuda()
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "moestream"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": i + 1, "args": {"name": t}} for i, t in enumerate(TRACKS)]
        meta.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "counters"}})
        with self.lock:
            events = sorted(self.events, key=lambda e: (e["ts"], -e.get("dur", 0)))
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}
