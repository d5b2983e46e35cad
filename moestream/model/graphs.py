"""A one-token step's fixed-shape parts as CUDA graphs: replayed with one launch each instead of
launched op by op.

On a GPU a decode step of a big model is mostly launch overhead: a layer's dense work is a few dozen
small kernels of a few microseconds each. Three parts of a layer have shapes that never change
from token to token, so each is captured once and replayed:
- "qkv": the attention norm, the qkv projection, RoPE and QK-norm or the NoPE temperature;
- "route": the output projection, the residual, the FFN norm and the router (a dense layer's
  "mlp" part does its whole MLP here instead);
- "shared": the shared expert;
and the "head": final norm and lm_head. What lies between stays eager, as it must: attention reads a
KV cache that grows by one key per step, and the routed experts are chosen on the host from the
router's answer (which to fetch, where to run it), between "route" and "shared", so that the
transfers start before the shared expert runs, as in the eager step.

A Part copies its arguments into static inputs and replays; its outputs are its own tensors,
overwritten by its next call, so whoever keeps one clones it. With capture=False (the CPU twin)
the same function runs on the same static inputs, uncaptured, and its results are copied into
outputs it keeps, as a replay overwrites them: how tests check on the CPU that the split step
computes the eager step's numbers and that nobody holds an output past the next step. Each captured
part is replayed once on random inputs and must give what the function gives eagerly, bit for bit,
before it is kept: a capture that recorded nothing (the wrong device or stream) or other kernels
is refused, not replayed. Parts are captured at load, before any step, so a failure leaves the eager
step and nothing half-done.
"""

from __future__ import annotations

from typing import Callable

import torch


class CaptureFailed(RuntimeError):
    """A part could not be captured as a CUDA graph (the step runs eagerly instead)."""


def _tensors(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


class Part:
    """One fixed-shape function of tensors, replayed as a CUDA graph (capture=True) or run directly
    on its static inputs (the CPU twin)."""

    def __init__(self, fn: Callable, args: tuple[torch.Tensor, ...], capture: bool, pool=None):
        self.fn = fn
        self.inputs = tuple(a.clone() for a in args)
        self.graph = self.outputs = None
        if capture:
            device = args[0].device
            stream = torch.cuda.Stream(device=device)
            with torch.cuda.device(device), torch.cuda.stream(stream):  # restored even if the capture fails
                stream.wait_stream(torch.cuda.default_stream(device))
                fn(*self.inputs)  # warm-up: cuBLAS handles and workspaces, lazy inits, out of the capture
                stream.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                    self.outputs = fn(*self.inputs)
                self._verify()

    def _verify(self) -> None:
        for x in self.inputs:
            x.copy_(torch.randn_like(x))
        self.graph.replay()
        replayed = [t.clone() for t in _tensors(self.outputs)]
        eager = _tensors(self.fn(*self.inputs))
        if not all(torch.equal(a, b) for a, b in zip(replayed, eager)):
            raise CaptureFailed("a replay differs from the eager call (an op ran outside the capture)")

    def __call__(self, *args: torch.Tensor):
        if len(args) != len(self.inputs):
            raise TypeError(f"a part takes {len(self.inputs)} tensors, not {len(args)}")
        for static, a in zip(self.inputs, args):
            if a.shape != static.shape or a.dtype != static.dtype:  # copy_ would cast or broadcast silently
                raise TypeError(f"a part's input is {a.dtype} {list(a.shape)}, captured as {static.dtype} "
                                f"{list(static.shape)}")
            static.copy_(a)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        out = self.fn(*self.inputs)
        if self.outputs is None:
            self.outputs = tuple(t.clone() for t in _tensors(out)) if isinstance(out, tuple) else out.clone()
        else:
            for kept, t in zip(_tensors(self.outputs), _tensors(out)):
                kept.copy_(t)
        return self.outputs


class StepGraphs:
    """The parts of one model's one-token step, by (layer, name) and "head", sharing one memory pool
    (they replay one after another, in the order they were captured)."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.parts: dict = {}

    def build(self, specs: list[tuple[object, Callable, tuple[torch.Tensor, ...]]]) -> None:
        """Capture every (key, fn, example args) in order; on a failure none is kept and CaptureFailed says why."""
        try:
            pool = torch.cuda.graph_pool_handle() if self.capture else None
            for key, fn, args in specs:
                self.parts[key] = Part(fn, args, self.capture, pool)
        except (RuntimeError, AssertionError) as e:  # CUDA's errors; AssertionError: a torch without CUDA
            self.parts.clear()
            if self.capture and torch.cuda.is_available():
                torch.cuda.synchronize()
            raise e if isinstance(e, CaptureFailed) else CaptureFailed(f"{type(e).__name__}: {e}".splitlines()[0]) from e

    @property
    def built(self) -> bool:
        return bool(self.parts)

    def __call__(self, key, *args: torch.Tensor):
        return self.parts[key](*args)
