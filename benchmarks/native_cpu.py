"""The C kernels of one-row float32 steps (model/native.py) against torch, one run. Prints markdown.

    python benchmarks/native_cpu.py [--threads 2] [--reps 7] [--tokens 128]

bandwidth  memory read (a sum over 256 MB) beside one-row float32 products over a 64 MB matrix
           [16384, 1024]: torch's F.linear vs the C kernel, GB/s of weights read (best of --reps).
decode     the embedded model decoding --tokens tokens after a 32-token prompt, with the kernels and
           with torch alone (MOESTREAM_NATIVE=0's path), alternating, in one process: tokens/s
           (median of --reps), torch ops dispatched per token and the largest logit difference.
The machine's other core should be idle: nothing else is timed beside it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import moestream
from formats_cpu import best_of  # this folder's: a warm call, then the fastest of reps
from moestream.model import native


class OpCount(TorchDispatchMode):
    """Counts the aten ops a block of code dispatches."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def bandwidth(reps: int) -> None:
    big = torch.randn(64 << 20)
    w, x = torch.randn(16384, 1024), torch.randn(1, 1024)
    gbs = lambda t, nbytes: f"{nbytes / t / 1e9:.1f}"  # noqa: E731
    print("| what | GB/s |\n|---|---|")
    print(f"| memory read (sum over 256 MB) | {gbs(best_of(big.sum, reps), big.nbytes)} |")
    print(f"| one row x [16384, 1024] float32, torch F.linear | {gbs(best_of(lambda: F.linear(x, w), reps), w.nbytes)} |")
    print(f"| the same, C kernel (native.linear) | {gbs(best_of(lambda: native.linear(x, w), reps), w.nbytes)} |")


def decode(reps: int, tokens: int) -> None:
    llm = moestream.load()
    gen, library = llm.generator, native._library
    prompt = list(range(5, 37))
    ways = {"C kernels": library, "torch alone": lambda: None}
    rates = {name: [] for name in ways}
    logits, ops = {}, {}
    try:
        for rep in range(reps):
            for name, lib in ways.items():
                native._library = lib
                seq = llm.new_sequence()
                gen.step(seq, prompt)
                for _ in range(8):
                    gen.decode_one(seq, 7)
                t = time.perf_counter()
                for _ in range(tokens):
                    gen.decode_one(seq, 7)
                rates[name].append(tokens / (time.perf_counter() - t))
                if rep == 0:
                    with OpCount() as count:
                        logits[name] = gen.decode_one(seq, 7)
                    ops[name] = sum(count.ops.values())
                llm.drop(seq)
    finally:
        native._library = library
        llm.close()
    diff = (logits["C kernels"] - logits["torch alone"]).abs().max().item()
    print(f"\nEmbedded model, tg{tokens} after a 32-token prompt, {torch.get_num_threads()} threads, "
          f"median of {reps} (alternating):\n")
    print("| decode step | tok/s | ms/token | torch ops dispatched per token |\n|---|---|---|---|")
    for name in ways:
        rate = statistics.median(rates[name])
        print(f"| {name} | {rate:.0f} | {1e3 / rate:.2f} | {ops[name]} |")
    base = statistics.median(rates["torch alone"])
    print(f"\nC kernels / torch alone: {statistics.median(rates['C kernels']) / base:.2f}x; "
          f"largest logit difference {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"C kernels: {native.status()}\n")
    if native.status() != "on":
        raise SystemExit("the C kernels are not built here, nothing to compare")
    bandwidth(a.reps)
    decode(a.reps, a.tokens)


if __name__ == "__main__":
    main()
