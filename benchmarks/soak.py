"""Soak: 10,000 generated tokens in one process, resident and offloaded with spilled KV, one run.

    python benchmarks/soak.py [-n 10000] [--window 1000]

What it shows: that memory does not creep (RSS after the warm-up window stays within a band; the
README quotes the band) and that speed holds (tok/s per window of generated tokens). The embedded
model's context is 4,096 tokens, so the tokens are generated as a run of conversations of up to
3,000 tokens each, the way a long chat session restarts; each conversation starts from a fresh KV
cache (and an emptied KV disk file). The two configurations run one after the other, never at once.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import psutil
import torch

import moestream
from moestream.model.sampling import SamplingParams

CONVERSATION = 3000  # tokens generated per conversation (the embedded model's context is 4,096)


def soak(llm, n: int, window: int) -> list[tuple[float, int]]:
    """(tok/s, RSS bytes) for each window of `window` generated tokens."""
    proc = psutil.Process()
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Tell me a long tale of the court, my lord."}])
    rows, done, seed = [], 0, 0
    t_window, in_window = time.perf_counter(), 0

    def on_token(_):
        nonlocal done, in_window, t_window
        done += 1
        in_window += 1
        if in_window == window:
            now = time.perf_counter()
            rows.append((window / (now - t_window), proc.memory_info().rss))
            t_window, in_window = now, 0

    while done < n:
        llm.reset()
        params = SamplingParams(temperature=0.8, seed=seed, max_tokens=min(CONVERSATION, n - done + 1), ignore_eos=True)
        llm.generate_ids(prompt, params, on_token, stop_ids=set())
        seed += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="moestream-soak-")
    probe = moestream.load()
    eb = probe.plan.expert_bytes
    probe.close()
    configs = {
        "resident": {},
        "offloaded, KV spilled to host and disk": dict(
            expert_cache=32 * eb, cpu_mem=64 * eb, expert_dir=work, kv_gpu_mem="400KB", kv_cpu_mem="256KB",
            kv_disk=f"{work}/kv.bin", kv_block=64, ubatch=64),
    }
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"embedded model, {args.n} generated tokens per configuration (conversations of up to {CONVERSATION}), "
          f"T=0.8, windows of {args.window}")
    for name, kw in configs.items():
        llm = moestream.load(ctx_size=4096, **kw)
        rows = soak(llm, args.n, args.window)
        s = llm.stats()
        llm.close()
        warm = rows[1:]  # the first window warms up (allocator pools, the disk tier's staging buffer)
        base = warm[0][1]
        spread = (min(r for _, r in warm) / base - 1, max(r for _, r in warm) / base - 1)
        print(f"\n{name}: RSS after warm-up {base / 2**20:.1f} MiB, within {100 * spread[0]:+.2f}% / {100 * spread[1]:+.2f}% "
              f"(hit rate {100 * s.experts.hit_rate:.0f}%, KV on disk at the end {s.kv.tokens_disk} tokens per global layer)")
        print("| window | tok/s | RSS MiB |")
        print("|---|---|---|")
        for i, (tps, rss) in enumerate(rows):
            print(f"| {i * args.window + 1}-{(i + 1) * args.window} | {tps:.0f} | {rss / 2**20:.1f} |")


if __name__ == "__main__":
    main()
