"""Recorder: spans and counters from every part of the runtime, for traces, summaries and plots.

Off by default: the parts hold `NULL` (a NullRecorder), whose `span` hands back one shared
do-nothing context manager, so an unprofiled run pays a method call per span and nothing else.
On, spans are complete events with microsecond timestamps on named tracks ("compute",
"H2D stream", "disk", "CPU experts"); on CUDA, device work is timed with CUDA events so the spans
show device time, not launch time.
"""

from __future__ import annotations

import time

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

    # the model's hot path: `t = rec.mark(); ...; rec.done("attention", t, layer)`, no objects made
    def mark(self):
        return 0.0

    def done(self, name: str, start, layer: int = -1, expert: int = -1, track: str = "compute") -> None:
        pass


NULL = NullRecorder()


class Recorder(NullRecorder):
    enabled = True

    def __init__(self, device: torch.device | None = None):
        self.events: list[dict] = []
        self.origin = time.perf_counter()
        self.cuda = device is not None and device.type == "cuda"
        self.pending_cuda: list[tuple] = []  # (name, track, args, start event, end event), resolved at export
        if self.cuda:
            self.base_event = torch.cuda.Event(enable_timing=True)
            self.base_event.record()
            self.base_us = self.now()

    def now(self) -> float:
        """Microseconds since the recorder started."""
        return (time.perf_counter() - self.origin) * 1e6

    def span(self, name: str, track: str = "compute", **args):
        if self.cuda and track == "compute":
            return _CudaSpan(self, name, track, args)
        return _Span(self, name, track, args)

    def mark(self):
        """A start point: the raw perf_counter, or a recorded CUDA event when device time is measured."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def done(self, name: str, start, layer: int = -1, expert: int = -1, track: str = "compute") -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending_cuda.append((name, track, _layer_args(layer, expert), start, end))
            return
        # raw clock values, converted at export: the hot path only reads the clock and appends
        self.events.append(("R", name, track, start, time.perf_counter(), layer, expert))

    def complete(self, name: str, start_us: float, end_us: float, track: str = "compute", **args) -> None:
        # tuples of plain values: appends are atomic under the GIL, and the cyclic GC stops scanning them
        self.events.append(("X", name, track, start_us, max(0.0, end_us - start_us), tuple(args.items())))

    def counter(self, name: str, **values) -> None:
        self.events.append(("C", name, "counter", self.now(), 0.0, tuple(values.items())))

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
        events = []
        for ph, name, track, ts, dur, args in sorted(self._normalised(), key=lambda e: (e[3], -e[4])):
            if ph == "X":
                tid = TRACKS.index(track) + 1 if track in TRACKS else len(TRACKS) + 1
                events.append({"name": name, "cat": track, "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": tid,
                               "args": dict(args)})
            else:
                events.append({"name": name, "cat": "counter", "ph": "C", "ts": ts, "pid": 1, "tid": 0,
                               "args": {k: float(v) for k, v in args}})
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def _normalised(self) -> list[tuple]:
        """Every event as (ph, name, track, ts µs, dur µs, args items); raw hot-path spans converted."""
        out = []
        for e in list(self.events):
            if e[0] == "R":
                _, name, track, start, end, layer, expert = e
                ts = (start - self.origin) * 1e6
                out.append(("X", name, track, ts, (end - start) * 1e6, tuple(_layer_args(layer, expert).items())))
            else:
                out.append(e)
        return out


def _layer_args(layer: int, expert: int) -> dict:
    if layer < 0:
        return {}
    return {"layer": layer} if expert < 0 else {"layer": layer, "expert": expert}


class _Span:
    """A host-timed span: cheaper than a generator-based context manager on the hot path."""

    __slots__ = ("rec", "name", "track", "args", "t0")

    def __init__(self, rec: Recorder, name: str, track: str, args: dict):
        self.rec, self.name, self.track, self.args = rec, name, track, args

    def __enter__(self):
        self.t0 = self.rec.now()
        return self

    def __exit__(self, *exc):
        rec = self.rec
        rec.events.append(("X", self.name, self.track, self.t0, rec.now() - self.t0, tuple(self.args.items())))
        return False


class _CudaSpan(_Span):
    """Device-timed: a pair of CUDA events, turned into host-clock times at export."""

    __slots__ = ("start", "end")

    def __enter__(self):
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.start.record()
        return self

    def __exit__(self, *exc):
        self.end.record()
        self.rec.pending_cuda.append((self.name, self.track, self.args, self.start, self.end))
        return False
