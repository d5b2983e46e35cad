"""GET /metrics: the runtime's counters in Prometheus' text format (version 0.0.4).

Made from two snapshots, never from the parts: llm.stats() (experts, memory, load) and the batcher's
BatchStats (requests, tokens, the running sequences' KV). Names follow vLLM's and llama.cpp's
servers: `moestream_` then what is counted, `_total` for counters, units in the name.
"""

from __future__ import annotations

import os

import psutil

from ..scheduler.batch import BatchStats
from ..stats import Stats


def render(stats: Stats, batch: BatchStats) -> str:
    """One exposition: HELP and TYPE before each family, one sample per line."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            tag = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"{name}{tag} {float(value):.17g}" if isinstance(value, float) else f"{name}{tag} {value}")

    e, m = stats.experts, stats.memory
    family("moestream_requests_running", "gauge", "Requests holding a sequence (prefilling or decoding).",
           [({}, batch.running)])
    family("moestream_requests_queued", "gauge", "Requests waiting for a place in the batch.", [({}, batch.queued)])
    family("moestream_requests_total", "counter", "Requests admitted to the batch.", [({}, batch.requests)])
    family("moestream_requests_finished_total", "counter", "Requests finished, by why.",
           [({"reason": reason}, n) for reason, n in batch.finished.items()])
    family("moestream_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [({}, batch.prompt_tokens)])
    family("moestream_tokens_generated_total", "counter", "Tokens sampled (stop tokens included).",
           [({}, batch.generated_tokens)])
    family("moestream_prefill_steps_total", "counter", "Prefill micro-batches (-ub) run.", [({}, batch.prefill_steps)])
    family("moestream_decode_steps_total", "counter", "Batched decode steps run.", [({}, batch.decode_steps)])
    family("moestream_decode_tokens_total", "counter",
           "Tokens fed by decode steps (over decode steps: the mean batch).", [({}, batch.decode_tokens)])

    family("moestream_expert_hits_total", "counter", "Wanted experts found in the device cache.", [({}, e.hits)])
    family("moestream_expert_misses_total", "counter", "Wanted experts not in the device cache.", [({}, e.misses)])
    family("moestream_expert_fetches_total", "counter", "Demand copies into the expert cache.", [({}, e.fetches)])
    family("moestream_expert_prefetches_total", "counter", "Speculative expert copies, by outcome.",
           [({"outcome": "issued"}, e.prefetch_issued), ({"outcome": "hit"}, e.prefetch_hits),
            ({"outcome": "wasted"}, e.prefetch_wasted)])
    family("moestream_expert_bytes_total", "counter", "Expert bytes moved, by link.",
           [({"link": "host_to_device"}, e.bytes_host_to_device), ({"link": "disk_to_host"}, e.bytes_disk_to_host)])
    family("moestream_expert_stall_seconds_total", "counter", "Host time blocked on expert copies and disk reads.",
           [({}, float(e.stall_seconds))])
    family("moestream_expert_cpu_runs_total", "counter", "Expert runs on the CPU instead of a fetch.", [({}, e.cpu_runs)])
    family("moestream_expert_cpu_seconds_total", "counter", "Time spent running experts on the CPU.",
           [({}, float(e.cpu_seconds))])
    family("moestream_expert_cache_slots", "gauge", "Expert-cache slots on the device.", [({}, e.slots)])

    family("moestream_kv_tokens", "gauge", "KV tokens of the running sequences, by tier (of one global layer).",
           [({"tier": "device"}, batch.kv_tokens_device), ({"tier": "host"}, batch.kv_tokens_host),
            ({"tier": "disk"}, batch.kv_tokens_disk)])
    family("moestream_kv_bytes", "gauge", "KV bytes of the running sequences, by tier.",
           [({"tier": "device"}, batch.kv_device_bytes), ({"tier": "host"}, batch.kv_host_bytes)])
    family("moestream_device_bytes", "gauge", "Compute-device bytes, by part.",
           [({"part": "resident"}, m.resident_bytes), ({"part": "experts"}, m.expert_bytes),
            ({"part": "kv"}, batch.kv_device_bytes)])
    family("moestream_load_seconds", "gauge", "Seconds the model took to load.", [({}, float(stats.load_seconds))])
    family("process_resident_memory_bytes", "gauge", "Resident memory of the server process.",
           [({}, psutil.Process(os.getpid()).memory_info().rss)])
    return "\n".join(lines) + "\n"
