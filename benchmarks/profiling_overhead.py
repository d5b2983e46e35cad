"""What profiling costs, one run: decode tok/s with profiling on vs off, side by side in one process.

    python benchmarks/profiling_overhead.py [-n 256] [-r 30]

Two models are loaded from the same checkpoint with the same settings, one with --profile (spans,
per-step records, the routing trace) and one without, so each side is exactly what a user gets.
Runs alternate in ABBA order (whichever runs second in a pair measured ~2% slower here); the cost
is the median of the pairs' on/off ratios, each pair run back to back (this shared 2-core machine
drifts by more than the cost being measured). Decode speed is timed from the first streamed token
to the last. The off path's own cost is measured directly: recorder calls per token x seconds per
no-op call.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

import moestream
from moestream.model.sampling import SamplingParams
from moestream.profiling.recorder import NULL


def decode_tps(llm, prompt, n) -> float:
    stamps = []
    llm.reset()
    llm.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=n), lambda _: stamps.append(time.perf_counter()),
                     stop_ids=set())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("-r", type=int, default=30)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="moestream-prof-")
    offload = dict(expert_cache=3 * 2**20, expert_dir=work)  # offload on: copies are recorded too
    models = {"off": moestream.load(**offload), "on": moestream.load(profile=f"{work}/profile", **offload)}
    prompt = models["on"].tokenizer.encode_chat([{"role": "user", "content": "Good morrow, my lord. What news?"}])
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for mode in ("off", "on"):
        decode_tps(models[mode], prompt, 16)  # warm-up
    for i in range(args.r):
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):  # ABBA: neither side always runs second
            runs[mode].append(decode_tps(models[mode], prompt, args.n))
    best = {mode: statistics.median(v) for mode, v in runs.items()}
    # each pair ran back to back, so its ratio is free of the machine's drift over the whole run
    ratios = sorted(on / off for on, off in zip(runs["on"], runs["off"]))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    layers = models["on"].config.num_hidden_layers
    for llm in models.values():
        llm.close()

    calls_per_token = 10 * layers + 3  # per layer 6 marks + 4 spans; sampling's 2 + 1
    t0 = time.perf_counter()
    for _ in range(100_000):
        NULL.add(("x", NULL.mark(), NULL.mark(), 1))
    per_call = (time.perf_counter() - t0) / 300_000
    off_cost = calls_per_token * per_call * best["off"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"embedded model, expert cache 3 MiB, decode {args.n} tokens, {args.r} off/on pairs (ABBA), two loads")
    print("| profiling | decode tok/s (median) | cost |")
    print("|---|---|---|")
    print(f"| off | {best['off']:.1f} | {100 * off_cost:.2f}% (≈{calls_per_token} no-op calls x {1e9 * per_call:.0f} ns per token) |")
    print(f"| on | {best['on']:.1f} | {100 * (1 - statistics.median(ratios)):.1f}% median of the pairs' ratios "
          f"(interquartile {100 * (1 - q3):.1f}% to {100 * (1 - q1):.1f}%) |")


if __name__ == "__main__":
    main()
