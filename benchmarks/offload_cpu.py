"""Expert offload on the CPU, one run: an expert cache of 25% of the experts vs fully resident.

    python benchmarks/offload_cpu.py [-n 256] [--cache-fraction 0.25]

Prints, from one run on the same machine: decode tok/s offloaded / resident, expert hit rate,
prefetch recall and precision at lookahead distances 1 and 2, and then `bench replay` on the routing
recorded during the run: each policy's hit rate as a fraction of Belady's MIN.

On a CPU the "device" cache and the host store are the same RAM, so this measures the engine's
overheads and its cache behaviour, not PCIe; `--cpu-experts never` makes every miss go through the
cache (with `auto`, the measured cost model sends misses to the CPU path, which needs no copy here).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

import moestream
from moestream.analysis.oracles import belady, lookahead_oracle, simulate
from moestream.model.sampling import SamplingParams
from moestream.profiling.routing import load_trace

PROMPT = [{"role": "user", "content": "Good morrow, my lord. What news from the court?"}]


def decode_tps(llm, n: int, repeats: int, temperature: float) -> float:
    ids = llm.tokenizer.encode_chat(PROMPT)
    best = 0.0
    for _ in range(repeats):
        llm.reset()
        llm.generate_ids(ids, SamplingParams(temperature=temperature, seed=0, max_tokens=n), stop_ids=set())
        s = llm.stats()
        best = max(best, s.turn.generation_tps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=256, help="tokens to decode")
    ap.add_argument("-r", type=int, default=3, help="repetitions (best kept)")
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    ap.add_argument("--temp", type=float, default=0.8, help="sampling temperature (0 = greedy, whose routing repeats)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="moestream-bench-"))

    resident = moestream.load()
    c = resident.config
    n_experts = len(c.moe_layers) * c.num_local_experts
    slots = max(1, int(n_experts * args.cache_fraction))
    cache_bytes = slots * resident.plan.expert_bytes
    base = decode_tps(resident, args.n, args.r, args.temp)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: embedded ({len(c.moe_layers)} MoE layers x {c.num_local_experts} experts = {n_experts}); "
          f"expert cache {slots} slots ({100 * slots / n_experts:.0f}%); decode {args.n} tokens at temperature {args.temp} (seed 0), best of {args.r}")
    print("| run | decode tok/s | vs resident | hit rate | prefetch recall d1 / d2 | precision d1 / d2 | stall ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| resident | {base:.1f} | 1.00 | - | - | - | - |")
    trace = work / "routing.jsonl"
    for label, kw in (
        ("lru, no prefetch", dict(cache_policy="lru", prefetch=0, cpu_experts="never")),
        ("lru + prefetch 2", dict(cache_policy="lru", prefetch=2, cpu_experts="never")),
        ("predictive + prefetch 2", dict(cache_policy="predictive", prefetch=2, cpu_experts="never", record_routing=trace)),
        ("lru + prefetch 2, cpu-experts auto", dict(cache_policy="lru", prefetch=2, cpu_experts="auto")),
    ):
        llm = moestream.load(expert_cache=cache_bytes, expert_dir=work, **kw)
        tps = decode_tps(llm, args.n, args.r, args.temp)
        s = llm.stats()
        rec = " / ".join(f"{100 * s.experts.prefetch_recall.get(d, 0):.0f}%" for d in (1, 2)) if s.experts.prefetch_recall else "-"
        pre = " / ".join(f"{100 * s.experts.prefetch_precision.get(d, 0):.0f}%" for d in (1, 2)) if s.experts.prefetch_precision else "-"
        print(f"| {label} | {tps:.1f} | {tps / base:.2f} | {100 * s.experts.hit_rate:.1f}% | {rec} | {pre} | {1e3 * s.experts.stall_seconds:.1f} |")
        llm.close()

    t = load_trace(trace)
    accesses, layers = t.accesses(), t.meta["moe_layers"]
    print(f"\nreplay of the recorded routing ({t.tokens} tokens, {len(accesses)} expert accesses), {slots} slots, "
          "hit rate as a fraction of Belady's MIN:")
    horizons = (1, 2, 4, 8)
    print("| policy | global | per-layer |")
    print("|---|---|---|")
    splits = (("global", slots, None), ("per-layer", slots // len(layers), {x: x for x in layers}))
    bounds = {split: sum(belady(accesses, n, groups)) for split, n, groups in splits}
    rows: dict[str, list[str]] = {}
    for split, n, groups in splits:
        for policy in ("lru", "lfu", "predictive"):
            hits = sum(simulate(accesses, n, policy, layers, groups))
            rows.setdefault(policy, []).append(f"{hits / bounds[split]:.3f}")
        for h in horizons:
            hits = sum(lookahead_oracle(accesses, n, groups, h * len(layers)))
            rows.setdefault(f"oracle knowing the next {h} token(s)", []).append(f"{hits / bounds[split]:.3f}")
        rows.setdefault("Belady MIN hit rate", []).append(f"{100 * bounds[split] / len(accesses):.1f}%")
    for name, cells in rows.items():
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
