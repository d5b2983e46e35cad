"""CostModel: for an expert that is not in the cache, is it cheaper to fetch it or to run it on the CPU?

Fetch = expert bytes / link bandwidth + compute on the device; CPU = compute from host RAM (only the
tokens' activations cross the bus). Both are measured at start-up on this machine with the real
expert shapes, as a fixed cost plus a per-token cost, so the answer changes with the step size:
a decoded token's miss often runs best on the CPU, a prefill micro-batch's never does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch



def best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """Best-of-N seconds of fn() (synchronised on CUDA)."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class CostModel:
    link_bytes_per_s: float  # host store -> cache slot
    expert_bytes: int
    cpu_fixed: float  # seconds for one expert on the CPU: fixed + per_token * T
    cpu_per_token: float
    device_fixed: float
    device_per_token: float

    def fetch_seconds(self, tokens: int) -> float:
        return self.expert_bytes / self.link_bytes_per_s + self.device_fixed + self.device_per_token * tokens

    def cpu_seconds(self, tokens: int) -> float:
        return self.cpu_fixed + self.cpu_per_token * tokens

    def prefer_cpu(self, tokens: int) -> bool:
        return self.cpu_seconds(tokens) < self.fetch_seconds(tokens)

    @classmethod
    def calibrate(cls, host_expert, slot: torch.Tensor, slot_expert, device: torch.device, hidden: int,
                  dtype: torch.dtype) -> "CostModel":
        """Measure one copy and expert compute at 1 and 32 tokens of `dtype` activations, on both sides."""
        src = host_expert.buffer
        nbytes = src.numel() * src.element_size()
        copy = best_seconds(lambda: slot.copy_(src, non_blocking=True), device)
        timings = []
        for expert, dev in ((host_expert, torch.device("cpu")), (slot_expert, device)):
            t1 = best_seconds(lambda: expert(torch.randn(1, hidden, dtype=dtype, device=dev)), dev)
            t32 = best_seconds(lambda: expert(torch.randn(32, hidden, dtype=dtype, device=dev)), dev)
            per_token = max(0.0, (t32 - t1) / 31)
            timings += [max(0.0, t1 - per_token), per_token]
        return cls(nbytes / max(copy, 1e-9), nbytes, *timings)


def pinned_h2d_gbps(nbytes: int = 2**30, repeats: int = 5) -> float:
    """Measured host-to-device GB/s of one pinned copy_ of `nbytes`, timed with CUDA events (best of N).

    The figure the physical bounds are computed from: report achieved / measured, not / theoretical.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return best
