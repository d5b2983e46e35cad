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

A Part copies its arguments into static inputs and replays; its outputs are the graph's own tensors,
overwritten by its next replay, so whoever keeps one clones it. With capture=False (the CPU twin)
the same function runs on the same static inputs, uncaptured: how tests check on the CPU that the
split step computes the eager step's numbers. Parts are captured before the first step that needs
them touches the cache (`build`), so a capture that fails leaves no half-written step behind.
"""

from __future__ import annotations

from typing import Callable

import torch


class CaptureFailed(RuntimeError):
    """A part could not be captured as a CUDA graph (the step runs eagerly instead)."""


class Part:
    """One fixed-shape function of tensors, replayed as a CUDA graph (capture=True) or run directly
    on its static inputs (the CPU twin)."""

    def __init__(self, fn: Callable, args: tuple[torch.Tensor, ...], capture: bool, pool=None):
        self.fn = fn
        self.inputs = tuple(a.clone() for a in args)
        self.graph = None
        if capture:
            side = torch.cuda.Stream(device=args[0].device)
            side.wait_stream(torch.cuda.current_stream(args[0].device))
            with torch.cuda.stream(side):  # warm-up: cuBLAS handles and workspaces, lazy inits, out of the capture
                fn(*self.inputs)
            torch.cuda.current_stream(args[0].device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the expert transfer threads' own CUDA work goes on during a capture
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor):
        for static, a in zip(self.inputs, args):
            static.copy_(a)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
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
        except Exception as e:  # any capture error: the eager step still works
            self.parts.clear()
            raise CaptureFailed(f"{type(e).__name__}: {e}".splitlines()[0]) from e

    @property
    def built(self) -> bool:
        return bool(self.parts)

    def __call__(self, key, *args: torch.Tensor):
        return self.parts[key](*args)
