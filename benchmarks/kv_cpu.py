"""Long context on the CPU with the KV cache spilled, one run: decode speed and memory vs all-resident.

    python benchmarks/kv_cpu.py [--context 4000] [-n 64]

The embedded model at (nearly) its full 4,096-token context = 64 chunks of 64: a held-out
conversation is prefilled in micro-batches, then tokens are decoded. Runs side by side:
all KV resident; global-layer KV spilled to host RAM past a 256-token device window; and the same
with host RAM capped so that most blocks go to a disk file. Prints decode tok/s relative to
resident, the KV bytes the cache accounts for per tier against the prediction
(bytes per token x tokens, from the shapes), and the process RSS growth over the prefill.
"""

from __future__ import annotations

import argparse
import gc
import platform
import tempfile
from pathlib import Path

import psutil
import torch

import moestream
from moestream.data.shakespeare import held_out_ids
from moestream.model.sampling import SamplingParams
from moestream.scheduler.plan import kv_token_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4000, help="prompt tokens")
    ap.add_argument("-n", type=int, default=64, help="tokens to decode")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="moestream-kv-"))
    probe = moestream.load()
    c = probe.config
    prompt = held_out_ids(probe.tokenizer, args.context)
    per_token = kv_token_bytes(c, "f32", "f32")
    n_global, n_rope = len(c.global_layers), c.num_hidden_layers - len(c.global_layers)
    ring = n_rope * c.attention_chunk_size * per_token
    window = 256
    runs = {
        "all KV resident": {},
        f"spill to host past {window} tokens": dict(kv_gpu_mem=ring + n_global * window * per_token, kv_block=64, ubatch=128),
        "spill to host (512 tokens) + disk": dict(kv_gpu_mem=ring + n_global * window * per_token, kv_block=64, ubatch=128,
                                                  kv_cpu_mem=n_global * 512 * per_token, kv_disk=work / "kv.bin"),
    }
    tokens = len(prompt) + args.n
    predicted = per_token * (n_global * tokens + n_rope * c.attention_chunk_size)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"embedded model, prompt {len(prompt)} tokens ({len(prompt) // c.attention_chunk_size} chunks), decode {args.n}; "
          f"KV {per_token} B per token per layer; predicted KV at {tokens} tokens: {predicted / 2**20:.2f} MiB")
    print("| run | prefill tok/s | decode tok/s | vs resident | KV tokens device / host / disk | KV accounted (MiB) | "
          "vs predicted | RSS growth (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    proc = psutil.Process()
    for label, kw in runs.items():
        llm = moestream.load(ctx_size=4096, **kw)
        llm.generate_ids(prompt[:300], SamplingParams(temperature=0, max_tokens=4), stop_ids=set())  # warm-up
        llm.reset()
        gc.collect()
        rss0 = proc.memory_info().rss
        llm.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=args.n), stop_ids=set())
        rss = proc.memory_info().rss - rss0
        s = llm.stats()
        disk_bytes = n_global * s.kv.tokens_disk * per_token
        accounted = s.memory.kv_bytes + s.kv.host_bytes + disk_bytes
        base = base or s.turn.generation_tps
        print(f"| {label} | {s.turn.prompt_tps:.0f} | {s.turn.generation_tps:.1f} | {s.turn.generation_tps / base:.2f} | "
              f"{s.kv.tokens_device} / {s.kv.tokens_host} / {s.kv.tokens_disk} | {accounted / 2**20:.2f} | "
              f"{accounted / predicted:.2f} | {rss / 2**20:.1f} |")
        llm.close()
    print("(KV accounted: device buffers + host buffers + disk blocks, by the cache's own counts; capacities are "
          "allocated by doubling, so a buffer can hold up to 2x what it uses; with a disk tier the host buffers include "
          "the staging buffer its blocks are read into, up to 64 MiB: here every disk block fits in it.)")


if __name__ == "__main__":
    main()
