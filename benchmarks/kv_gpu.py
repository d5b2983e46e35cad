"""Scout-shaped global attention at 1M tokens with the KV spilled to pinned host RAM, on one GPU.

    python benchmarks/kv_gpu.py [--context 1M] [--layers 2] [--window 8192]

Needs CUDA (it exits with a message elsewhere). For each global (NoPE) layer: 8 KV heads x 128,
bf16 or q8_0, the newest `--window` tokens on the device and the rest in pinned host RAM. Times a
decode step's attention over all tiers, (a) streaming the host blocks to the device and (b) letting
the CPU attend to them, against the bound = spilled bytes / measured pinned H2D bandwidth (goal:
<= 1.2x streaming, < 1.0x with the CPU's part). Prints the largest context host RAM could hold.
"""

from __future__ import annotations

import argparse
import sys
import time

import psutil
import torch

from moestream.cache.kv import GlobalKV, KVCounters, KVLayout, KVPair, kv_type_bytes
from moestream.profiling.recorder import NULL
from moestream.units import parse_count
from moestream.offload.cost import pinned_h2d_gbps

HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128


def layer_at(ctx: int, window: int, kv_type: str) -> GlobalKV:
    """A global layer already holding `ctx` tokens: `window` on the device, the rest in pinned RAM."""
    layout = KVLayout(kv_type, kv_type, block=256, hot_tokens=window + 16, max_tokens=ctx + 16)  # no spill while timing
    layer = GlobalKV(3, KV_HEADS, HEAD_DIM, "cuda", torch.bfloat16, layout, NULL, None, KVCounters())
    spilled = ctx - window
    layer.host = KVPair(spilled, KV_HEADS, HEAD_DIM, kv_type, kv_type, "cpu", pin=True)
    chunk = 1 << 16
    for i in range(0, spilled, chunk):  # fill in pieces: one full random copy would double RAM
        n = min(chunk, spilled - i)
        layer.host.write(i, torch.randn(n, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16),
                         torch.randn(n, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16))
    layer.n_host = spilled
    layer.hot = KVPair(window + 16, KV_HEADS, HEAD_DIM, kv_type, kv_type, "cuda")
    layer.hot.write(0, torch.randn(window, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
                    torch.randn(window, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"))
    layer.n_hot, layer.n = window, ctx
    return layer


def step_seconds(layer: GlobalKV, on_cpu: bool, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        q = torch.randn(1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(1, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        layer.counters.host_on_cpu, layer.counters.host_trials = on_cpu, {}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        layer.attend(q, k, k, layer.n, torch.tensor([layer.n], device="cuda"))
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        # undo the appended token so every repeat sees the same context
        layer.n -= 1
        layer.n_hot -= 1
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", default="1M")
    ap.add_argument("--layers", type=int, default=2, help="global layers to time (Scout has 12)")
    ap.add_argument("--window", type=int, default=8192)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kv_gpu.py needs a CUDA GPU; on a CPU machine run benchmarks/kv_cpu.py")
    ctx = parse_count(args.context)
    bw = pinned_h2d_gbps()
    print(f"device: {torch.cuda.get_device_name()}; pinned H2D {bw:.1f} GB/s; context {ctx}, window {args.window}; "
          f"{args.layers} global layers timed (x6 for Scout's 12)")
    print("| KV type | spilled MB per layer | bound ms (bytes / H2D) | streamed ms | vs bound | CPU-attended ms | vs bound |")
    print("|---|---|---|---|---|---|---|")
    for kv_type in ("bf16", "q8_0"):
        layers = [layer_at(ctx, args.window, kv_type) for _ in range(args.layers)]
        spilled = (ctx - args.window) * KV_HEADS * 2 * kv_type_bytes(kv_type, HEAD_DIM)
        bound = spilled / (bw * 1e9)
        streamed = sum(step_seconds(layer, on_cpu=False) for layer in layers) / len(layers)
        cpu = sum(step_seconds(layer, on_cpu=True) for layer in layers) / len(layers)
        print(f"| {kv_type} | {spilled / 1e6:.0f} | {1e3 * bound:.1f} | {1e3 * streamed:.1f} | {streamed / bound:.2f} | "
              f"{1e3 * cpu:.1f} | {cpu / bound:.2f} |")
        del layers
    per_token = 12 * KV_HEADS * 2 * kv_type_bytes("q8_0", HEAD_DIM)
    free = psutil.virtual_memory().available
    print(f"largest context host RAM holds now (q8_0, 12 global layers): {int(free * 0.9 / per_token):,} tokens")


if __name__ == "__main__":
    main()
