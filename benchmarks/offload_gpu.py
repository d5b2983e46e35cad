"""Scout-shaped expert streaming on one GPU, one run: the transfer engine against the PCIe bound.

    python benchmarks/offload_gpu.py [--layers 8] [--tokens 64] [--slots 4] [--prefetch 1]

Needs CUDA (it exits with a message elsewhere). Synthetic layers with Scout's exact expert shapes
(D=5120, F=8192, 16 experts, bf16: 251.7 MB per expert) and experts in pinned host RAM; random
routers; one token at a time. Prints, measured side by side:
- pinned host->device GB/s (a 1 GiB copy timed with CUDA events);
- achieved expert-stream GB/s during decode, as a fraction of it (goal >= 0.9);
- decode tok/s vs the all-miss ceiling at the measured bandwidth (goal >= 1.0 with prefetch);
- the same layers moved the way HF accelerate's device_map offload moves them (every expert of a
  layer copied each forward, from pageable memory), and our speed-up over it (goal >= 20x);
- torch.cuda.max_memory_allocated vs the planned device bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from moestream.offload.cache import ExpertCache
from moestream.offload.engine import OffloadedExperts
from moestream.offload.store import ExpertStore
from moestream.offload.transfer import TransferEngine
from moestream.offload.cost import pinned_h2d_gbps
from moestream.offload.prefetch import Prefetcher

D, FF, E = 5120, 8192, 16


class SyntheticCheckpoint:
    """Stands in for a Checkpoint: every expert a copy of one random template (fast to fill)."""

    def __init__(self, layers: int):
        self.config = SimpleNamespace(hidden_size=D, intermediate_size=FF, expert_numel=3 * D * FF,
                                      moe_layers=list(range(layers)), num_local_experts=E)
        self.path = SimpleNamespace(name="synthetic-scout")
        self.template = (torch.randn(3 * D * FF) * 0.01).to(torch.bfloat16)

    def read_expert_into(self, layer, e, out):
        out.copy_(self.template)

    def fingerprint(self):
        return "synthetic"


def decode(engine, routers, layers: int, tokens: int) -> float:
    h = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):
        for layer in range(layers):
            x = F.rms_norm(h.float(), (D,)).to(torch.bfloat16)
            logits = x @ routers[layer].t()
            e = int(logits.argmax())
            engine.prepare(layer, [e], x)
            h = h + engine.get(layer, e)(x * torch.sigmoid(logits[0, e]))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def accelerate_style(store: ExpertStore, routers, layers: int, tokens: int) -> float:
    """What device_map offload does per forward: copy the whole layer's experts (pageable) to the GPU."""
    pageable = [store.host[i * E:(i + 1) * E].clone() for i in range(min(layers, 2))]  # not pinned
    on_gpu = torch.empty(E, 3 * D * FF, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):
        for layer in range(layers):
            on_gpu.copy_(pageable[layer % len(pageable)])
            x = F.rms_norm(h.float(), (D,)).to(torch.bfloat16)
            e = int((x @ routers[layer].t()).argmax())
            w = on_gpu[e]
            gate, up = (x @ w[:D * 2 * FF].view(D, 2 * FF)).chunk(2, dim=-1)
            h = h + (F.silu(gate) * up) @ w[D * 2 * FF:].view(FF, D)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4, help="expert-cache slots on the GPU")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--baseline-tokens", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("offload_gpu.py needs a CUDA GPU; on a CPU machine run benchmarks/offload_cpu.py")
    torch.manual_seed(0)
    bw = pinned_h2d_gbps()
    ckpt = SyntheticCheckpoint(args.layers)
    keys = [(layer, e) for layer in range(args.layers) for e in range(E)]
    store = ExpertStore(ckpt, keys, len(keys), torch.bfloat16, pin=True, expert_dir=None)
    eb = store.numel * 2
    routers = {layer: torch.randn(E, D, device="cuda", dtype=torch.bfloat16) for layer in range(args.layers)}
    ceiling = bw * 1e9 / (args.layers * eb)
    print(f"device: {torch.cuda.get_device_name()}; pinned H2D {bw:.1f} GB/s; {args.layers} layers x {E} experts x "
          f"{eb / 1e6:.1f} MB; all-miss ceiling {ceiling:.2f} tok/s")
    print("| run | tok/s | vs all-miss ceiling | expert stream GB/s | of pinned H2D | hit rate |")
    print("|---|---|---|---|---|---|")
    ours = 0.0
    for label, prefetch in (("no prefetch", 0), (f"prefetch {args.prefetch}", args.prefetch)):
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
        cache = ExpertCache(args.slots, D, FF, torch.device("cuda"), torch.bfloat16, "lru", "global", list(range(args.layers)))
        transfer = TransferEngine(store, cache, torch.device("cuda"))
        pf = Prefetcher(list(range(args.layers)), routers, 1, prefetch) if prefetch else None
        engine = OffloadedExperts(store, cache, transfer, pf, None, "never", frozenset())
        decode(engine, routers, args.layers, 2)  # warm-up
        moved0 = transfer.bytes_host_to_device
        seconds = decode(engine, routers, args.layers, args.tokens)
        moved = transfer.bytes_host_to_device - moved0
        c = engine.counters
        hit = c.hits / max(1, c.hits + c.misses)
        gbps = moved / seconds / 1e9
        ours = args.tokens / seconds
        print(f"| {label} | {args.tokens / seconds:.2f} | {args.tokens / seconds / ceiling:.2f} | {gbps:.1f} | "
              f"{gbps / bw:.2f} | {100 * hit:.0f}% |")
        peak = torch.cuda.max_memory_allocated() - base_alloc
        print(f"|   device memory | peak {peak / 2**30:.2f} GiB allocated vs cache pool {cache.nbytes / 2**30:.2f} GiB |")
        engine.close()
        del cache
    seconds = accelerate_style(store, routers, args.layers, args.baseline_tokens)
    acc = args.baseline_tokens / seconds
    print(f"| accelerate-style (whole layer moved per forward, pageable) | {acc:.3f} | {acc / ceiling:.2f} | - | - | - |")
    print(f"speed-up of the prefetching engine over accelerate-style offload: {ours / acc:.1f}x")

if __name__ == "__main__":
    main()
