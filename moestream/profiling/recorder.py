"""Recorder: spans and counters from every part of the runtime, for traces, summaries and plots.

Off by default: the parts hold `NULL` (a NullRecorder), whose methods do nothing. The hot path (every
layer of every token) uses two builtins, so that recording costs no Python frame:
    t = rec.mark()                                  # the clock (off: float(), which is 0.0)
    rec.add(("attention", t, rec.mark(), layer))    # keep a span (off: id(), which ignores it)
A span is (name, start, end, where): `where` is the layer (-1: none) or (layer, expert, track[, args]);
tracks are "compute" (the default), "H2D stream", "disk", "CPU experts", "sampling". `add` extends one
flat list with the four values, so a span leaves no object for Python's cyclic GC to scan (the
tuple is freed at once). Spans become Chrome trace events with microsecond timestamps at export.
On CUDA, `mark` records a CUDA event, so spans show device time, not launch time. Less frequent
events (prefill, KV spills, disk reads, counters) use `span`/`complete`/`counter`.
"""

from __future__ import annotations

import time

import torch

TRACKS = ("compute", "H2D stream", "disk", "CPU experts", "sampling")
LAYER_PARTS = ("attention", "router", "shared expert", "expert", "dense mlp")  # the spans inside a "layer"
SPAN_DEFAULTS = (-1, "compute", ())  # a span's optional expert, track, args


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
    mark = staticmethod(float)  # builtins: see the module's docstring
    add = staticmethod(id)

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
        self.events: list[tuple] = []  # (ph, name, track, ts µs, dur µs, args items): spans and counters
        self.spans: list = []  # the hot path's raw spans, four values each, converted at export
        self.origin = time.perf_counter()
        self.cuda = device is not None and device.type == "cuda"
        self.device = device
        self.pending_cuda: list[tuple] = []  # (name, track, args, start event, end event), resolved at export
        self.mark = self._cuda_mark if self.cuda else time.perf_counter
        self.add = self.spans.extend
        if self.cuda:
            self.base_event = torch.cuda.Event(enable_timing=True)
            self.base_event.record()
            self.base_us = self.now()

    def now(self) -> float:
        """Microseconds since the recorder started."""
        return (time.perf_counter() - self.origin) * 1e6

    @staticmethod
    def _cuda_mark():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span(self, name: str, track: str = "compute", **args):
        if self.cuda and track == "compute":
            return _CudaSpan(self, name, track, args)
        return _Span(self, name, track, args)

    def complete(self, name: str, start_us: float, end_us: float, track: str = "compute", **args) -> None:
        # tuples of plain values: appends are atomic under the GIL, and the cyclic GC stops scanning them
        self.events.append(("X", name, track, start_us, max(0.0, end_us - start_us), tuple(args.items())))

    def counter(self, name: str, **values) -> None:
        self.events.append(("C", name, "counter", self.now(), 0.0, tuple(values.items())))

    def _device_us(self, start, end) -> tuple[float, float]:
        """(ts, dur) in µs on the host clock for a pair of CUDA events (after a synchronize)."""
        return self.base_us + self.base_event.elapsed_time(start) * 1e3, start.elapsed_time(end) * 1e3

    def resolve_cuda(self) -> None:
        """Turn the context-manager spans' CUDA event pairs into spans on the host clock."""
        if not self.pending_cuda:
            return
        torch.cuda.synchronize()
        for name, track, args, start, end in self.pending_cuda:
            ts, dur = self._device_us(start, end)
            self.complete(name, ts, ts + dur, track, **args)
        self.pending_cuda.clear()

    def chrome_trace(self, extra: list[tuple] = ()) -> dict:
        """{"traceEvents": [...]} for ui.perfetto.dev / chrome://tracing, with named tracks; `extra`:
        more events in the recorder's tuple form (counters made at export)."""
        self.resolve_cuda()
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "moestream"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": i + 1, "args": {"name": t}} for i, t in enumerate(TRACKS)]
        meta.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "counters"}})
        events = []
        for ph, name, track, ts, dur, args in sorted(self._normalised() + list(extra), key=lambda e: (e[3], -e[4])):
            if ph == "X":
                tid = TRACKS.index(track) + 1 if track in TRACKS else len(TRACKS) + 1
                events.append({"name": name, "cat": track, "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": tid,
                               "args": dict(args)})
            else:
                events.append({"name": name, "cat": "counter", "ph": "C", "ts": ts, "pid": 1, "tid": 0,
                               "args": {k: float(v) for k, v in args}})
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def _normalised(self) -> list[tuple]:
        """Every event as (ph, name, track, ts µs, dur µs, args items): the hot path's raw spans converted,
        and a "layer" span around each layer's parts (derived here rather than timed on the hot path)."""
        if self.cuda:
            torch.cuda.synchronize()
        spans, raw = [], list(self.spans)
        for i in range(0, len(raw), 4):
            name, start, end, where = raw[i:i + 4]
            layer, *rest = where if isinstance(where, tuple) else (where,)
            expert, track, args = (*rest, *SPAN_DEFAULTS[len(rest):])
            if isinstance(start, float):
                ts, dur = (start - self.origin) * 1e6, (end - start) * 1e6
            else:
                ts, dur = self._device_us(start, end)
            spans.append(("X", name, track, ts, dur, _layer_args(layer, expert) + tuple(args)))
        return list(self.events) + spans + _layer_spans(spans)


def _layer_spans(spans: list[tuple]) -> list[tuple]:
    """One "layer" span per layer step, from its attention's start to the end of its last part
    (`spans`: the hot path's spans in the order they were recorded)."""
    out, current = [], None  # current: [layer args, start, end]
    for _, name, track, ts, dur, args in spans:
        if name not in LAYER_PARTS:
            if track in ("compute", "sampling") and current is not None:  # the lm head, the token: layers are done
                out.append(("X", "layer", "compute", current[1], current[2] - current[1], current[0]))
                current = None
            continue
        layer_args = args[:1]
        if name == "attention" or current is None or current[0] != layer_args:
            if current is not None:
                out.append(("X", "layer", "compute", current[1], current[2] - current[1], current[0]))
            current = [layer_args, ts, ts + dur]
        else:
            current[2] = max(current[2], ts + dur)
    if current is not None:
        out.append(("X", "layer", "compute", current[1], current[2] - current[1], current[0]))
    return out


def _layer_args(layer: int, expert: int) -> tuple:
    if layer < 0:
        return ()
    return (("layer", layer),) if expert < 0 else (("layer", layer), ("expert", expert))


class _Span:
    """A host-timed span for the less frequent events (a small object, no generator)."""

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
