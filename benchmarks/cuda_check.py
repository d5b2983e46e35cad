"""The CUDA paths, checked for the numbers on one GPU: run this first when a GPU is lent.

    python benchmarks/cuda_check.py [--device cpu]

Needs CUDA (`--device cpu` runs the same checks on the CPU, to check the script itself). On the embedded model, each line compares logits
(a prompt over several chunks, then the same tokens decoded one at a time through the KV cache):
- CUDA fp32, fully resident, against the CPU fp32 run (different kernels: within 1e-3);
- CUDA offloaded (expert cache of 1, 8 and 32 slots; LRU / predictive; prefetch on and off; disk
  tier forced; misses on the CPU) against CUDA resident in the same dtype: bit-exact when the CPU
  path is not mixed in, within 1e-4 (fp32) when it is;
- CUDA with the global-layer KV spilled to pinned host RAM and to disk, against CUDA resident;
- the runtime's own device-byte accounting against torch.cuda.max_memory_allocated under --gpu-mem;
- decode with the one-token step replayed as CUDA graphs (the default) against --enforce-eager:
  captured, bit-exact, resident and offloaded, and both speeds (tok/s, one after the other);
- a profiled run: CUDA-event spans present and nested in their token span.
Prints one line per check and a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import moestream
from moestream.model.sampling import SamplingParams

PROMPT = [{"role": "user", "content": "Good morrow, my lord. What news from the court? Speak, and tell me all."}]
failures: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        failures.append(name)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def close(a: torch.Tensor, b: torch.Tensor, dtype: str, tol: float = 1e-4) -> tuple[bool, str]:
    """fp32: max |diff| within tol; bf16 (whose logits differ by ~0.1-0.5 between kernel orders on
    this model): the same top-1 token at >= 95% of positions."""
    if dtype == "float32":
        return diff(a, b) < tol, f"max |diff| {diff(a, b):.2e} (allowed {tol:g})"
    same = (a.float().argmax(-1).cpu() == b.float().argmax(-1).cpu()).float().mean().item()
    return same >= 0.95, f"same top-1 token at {100 * same:.1f}% of positions, max |diff| {diff(a, b):.2e}"


def graphs_check(dev: str, ids: list[int], eb: int, work: Path) -> None:
    """CUDA graphs on (default) vs --enforce-eager: the same decoded logits, bit for bit, and each one's
    tok/s over 64 greedy tokens (float32 and bf16 resident, bf16 offloaded)."""
    for dtype, label, extra in (("float32", "resident", {}), ("bfloat16", "resident", {}),
                                ("bfloat16", "offloaded 8 slots", dict(expert_cache=8 * eb // 2, expert_dir=work,
                                                                       cpu_experts="never"))):
        runs = {}
        for eager in (False, True):
            llm = moestream.load(device=dev, dtype=dtype, cuda_graphs=not eager, **extra)
            graphed = llm.model.graphs is not None
            stepped = llm.decode_logits(ids)
            params = SamplingParams(temperature=0, max_tokens=64)
            llm.generate_ids(ids[:32], params, stop_ids=set())  # warm
            llm.reset()
            llm.generate_ids(ids[:32], params, stop_ids=set())
            runs[eager] = (stepped, llm.stats().turn.generation_tps, graphed, llm.graph_note)
            llm.close()
        (a, tps_graphs, graphed, note), (b, tps_eager, _, _) = runs[False], runs[True]
        name = f"{dev} {dtype} {label}"
        if dev.startswith("cuda"):
            check(f"{name}: CUDA graphs captured", graphed, note or "every part captured and verified")
        check(f"{name}: CUDA graphs vs --enforce-eager", diff(a, b) == 0.0,
              f"max |diff| {diff(a, b):.2e} (bit-exact expected); decode {tps_graphs:.1f} tok/s with graphs, "
              f"{tps_eager:.1f} without ({tps_graphs / max(tps_eager, 1e-9):.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    dev = ap.parse_args().device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("cuda_check.py needs a CUDA GPU (or --device cpu)")
    work = Path(tempfile.mkdtemp(prefix="moestream-cuda-"))
    cpu = moestream.load(device="cpu", dtype="float32")
    ids = cpu.tokenizer.encode_chat(PROMPT) * 6  # several 64-token chunks
    ref_cpu = cpu.logits(ids)
    eb = cpu.plan.expert_bytes

    for dtype in ("float32", "bfloat16"):
        gpu = moestream.load(device=dev, dtype=dtype)
        whole, stepped = gpu.logits(ids), gpu.decode_logits(ids)
        if dtype == "float32":
            check(f"{dev} fp32 vs cpu fp32", diff(whole, ref_cpu) < 1e-3, f"max |diff| {diff(whole, ref_cpu):.2e}")
        check(f"{dev} {dtype}: decode vs whole prompt", *close(whole, stepped, dtype, 1e-3))
        for slots, policy, prefetch, extra in ((1, "lru", 0, {}), (8, "predictive", 1, {}), (32, "predictive", 2, {}),
                                              (8, "lru", 1, {"cpu_mem": 0}), (8, "predictive", 1, {"cpu_experts": "always"})):
            kw = dict(device=dev, dtype=dtype, expert_cache=slots * (eb if dtype == "float32" else eb // 2),
                      cache_policy=policy, prefetch=prefetch, expert_dir=work, **{"cpu_experts": "never", **extra})
            llm = moestream.load(**kw)
            d1, d2 = diff(llm.logits(ids), whole), diff(llm.decode_logits(ids), stepped)
            label = f"{dev} {dtype} offload {slots} slots {policy} prefetch {prefetch} {extra or ''}".strip()
            if extra.get("cpu_experts") == "always":  # CPU kernels mixed in: close, not identical
                ok1, why1 = close(llm.logits(ids), whole, dtype)
                ok2, why2 = close(llm.decode_logits(ids), stepped, dtype)
                check(label, ok1 and ok2, f"{why1}; decoded: {why2}")
            else:
                check(label, max(d1, d2) == 0.0, f"max |diff| vs resident {max(d1, d2):.2e} (bit-exact expected)")
            llm.close()
        scale = 1 if dtype == "float32" else 2  # bytes per KV element: 4 or 2
        for tier, extra in (("host", {}), ("host+disk", {"kv_cpu_mem": 40_000 // scale, "kv_disk": str(work / "kv.bin")})):
            llm = moestream.load(device=dev, dtype=dtype, kv_gpu_mem=240_000 // scale, kv_block=16, ubatch=16, **extra)
            ok1, why1 = close(llm.logits(ids), whole, dtype)
            ok2, why2 = close(llm.decode_logits(ids), stepped, dtype)
            s = llm.stats()
            spilled = s.kv.spilled_to_host_bytes > 0 and (tier == "host" or s.kv.spilled_to_disk_bytes > 0)
            check(f"{dev} {dtype} KV spilled to {tier}", ok1 and ok2 and spilled,
                  f"{why1}; decoded: {why2}; spilled {s.kv.spilled_to_host_bytes} B to host, "
                  f"{s.kv.spilled_to_disk_bytes} B to disk")
            llm.close()
        gpu.close()

    graphs_check(dev, ids, eb, work)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    budget = 24 * 2**20  # below the embedded model's bf16 total: the expert cache must shrink to fit
    llm = moestream.load(device=dev, dtype="bfloat16", gpu_mem=budget, expert_dir=work)
    llm.generate_ids(ids, SamplingParams(temperature=0.8, seed=0, max_tokens=64), stop_ids=set())
    s = llm.stats()
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    check("device bytes under --gpu-mem", s.memory.device_bytes <= budget and peak <= budget and not llm.plan.resident,
          f"accounted {s.memory.device_bytes / 2**20:.1f} MiB, max_memory_allocated {peak / 2**20:.1f} MiB"
          f"{'' if cuda else ' (not measured on the CPU)'}, budget {budget / 2**20:.0f} MiB, {s.experts.slots} cache slots")
    llm.close()

    prof = work / "profile"
    llm = moestream.load(device=dev, expert_cache=8 * eb // 2, expert_dir=work, profile=prof)
    llm.generate_ids(ids[:40], SamplingParams(temperature=0, max_tokens=16), stop_ids=set())
    llm.close()
    events = [e for e in json.loads((prof / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    tokens = [e for e in events if e["name"] == "token"]
    layers = [e for e in events if e["name"] == "layer"]
    nested = all(sum(t["ts"] <= e["ts"] and e["ts"] + e["dur"] <= t["ts"] + t["dur"] + 1 for e in layers)
                 == llm.config.num_hidden_layers for t in tokens)
    check(f"profile on {dev}: layer spans nest in token spans", bool(tokens) and nested,
          f"{len(tokens)} tokens, {len(layers)} layer spans")

    print(f"\n{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}: "
          f"{'all checks passed' if not failures else f'{len(failures)} failed: ' + ', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
