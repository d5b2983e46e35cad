"""Profile: what `--profile DIR` writes, and the plots `moestream report DIR` draws.

DIR/trace.json     Chrome / Perfetto trace: spans per layer (attention, router, shared expert,
                   routed experts on the device or the CPU), expert copies on the "H2D stream" and
                   "disk" tracks, KV spills, sampling; counters for device bytes, cache occupancy,
                   bytes moved, KV tokens per tier.
DIR/summary.json   per-token latency percentiles, prefill / decode tok/s, hit rate, prefetch recall
                   and precision, bytes per token by link, stall fraction, CPU-run experts, KV per
                   tier, peak memory, the full llm.stats() snapshot, and per-step series.
DIR/routing.jsonl  the routing trace (format in profiling/routing.py).
DIR/report.md      the summary as markdown.

torch is imported where a Profile records, not at the top: `moestream report` only reads JSON.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import MoestreamError
from ..files import atomic_write, refuse_foreign

PLOTS_HINT = "pip install 'moestream[plots]' (matplotlib) to draw the plots"


class Profile:
    """Collects one record per step of a run (the generation loop calls `step`) and writes the files.

    rec: the run's Recorder (the parts were built with it); experts: the expert source, whose
    snapshot a step reads; resident_bytes: the resident weights (for the device-bytes counter)."""

    def __init__(self, directory: Path, rec, experts, resident_bytes: int = 0):
        import torch

        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoestreamError(f"cannot create the profile directory {self.dir}: {e.strerror}") from None
        for name in PROFILE_FILES:  # refused now, not after the run
            refuse_foreign(self.dir / name, **_ours(name))
        self.rec, self.experts, self.resident_bytes = rec, experts, resident_bytes
        if rec.cuda:
            torch.cuda.reset_peak_memory_stats(rec.device)
        self.raw_steps: list[tuple] = []  # (kind, tokens, seconds, µs, counters): per-step records, raw
        self.first = self._counters(None)

    COUNTERS = ("stall", "cpu", "hits", "misses", "h2d", "disk", "pos", "occupied", "kv_device", "kv_host", "kv_disk")

    def _counters(self, seq) -> tuple:
        """The raw counters a step records, in COUNTERS order (a tuple: this runs every token)."""
        e = self.experts.snapshot()
        tiers = seq.cache.tokens_by_tier() if seq is not None else {"device": 0, "host": 0, "disk": 0}
        return (e.stall_seconds, e.cpu_seconds, e.hits, e.misses, e.bytes_host_to_device, e.bytes_disk_to_host,
                len(seq.ids) if seq is not None else 0, e.resident if e.slots else 0,
                tiers["device"], tiers["host"], tiers["disk"])

    def step(self, kind: str, tokens: int, seconds: float, seq) -> None:
        """After a prefill or a decoded token of `seq`: its time and the raw counters (deltas come at export)."""
        self.raw_steps.append((kind, tokens, seconds, (time.perf_counter() - self.rec.origin) * 1e6, self._counters(seq)))
        if kind == "prefill" or len(self.raw_steps) % 16 == 0:  # memory changes slowly: sample it
            self.rec.counter("device bytes", resident=self.resident_bytes, experts=self.experts.snapshot().device_bytes,
                             kv=seq.cache.nbytes)

    @property
    def steps(self) -> list[dict]:
        """One record per step: its kind, tokens, time, position, counter deltas and KV per tier."""
        out, last = [], dict(zip(self.COUNTERS, self.first))
        for kind, tokens, seconds, _, raw in self.raw_steps:
            now = dict(zip(self.COUNTERS, raw))
            out.append({
                "kind": kind, "tokens": tokens, "ms": 1e3 * seconds, "pos": now["pos"],
                "stall_ms": 1e3 * (now["stall"] - last["stall"]), "cpu_expert_ms": 1e3 * (now["cpu"] - last["cpu"]),
                "hits": now["hits"] - last["hits"], "misses": now["misses"] - last["misses"],
                "bytes_host_to_device": now["h2d"] - last["h2d"], "bytes_disk_to_host": now["disk"] - last["disk"],
                "kv_device": now["kv_device"], "kv_host": now["kv_host"], "kv_disk": now["kv_disk"],
            })
            last = now
        return out

    def _trace_counters(self) -> list[tuple]:
        """Counter events from the per-step records (made at export, off the token path)."""
        events = []
        for *_, ts, raw in self.raw_steps:
            now = dict(zip(self.COUNTERS, raw))
            events.append(("C", "expert cache", "counter", ts, 0.0, (("occupied", now["occupied"]),)))
            events.append(("C", "bytes moved", "counter", ts, 0.0, (("host_to_device", now["h2d"]), ("disk_to_host", now["disk"]))))
            events.append(("C", "KV tokens", "counter", ts, 0.0,
                           (("device", now["kv_device"]), ("host", now["kv_host"]), ("disk", now["kv_disk"]))))
        return events

    def summary(self, s, facts: dict) -> dict:
        """s: the run's llm.stats(); facts: model, device, dtype, runtime settings, model config."""
        import torch

        steps = self.steps
        decode = [x for x in steps if x["kind"] == "decode"]
        prefill = [x for x in steps if x["kind"] == "prefill"]
        lat = sorted(x["ms"] for x in decode)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

        decode_s = sum(x["ms"] for x in decode) / 1e3
        prefill_s = sum(x["ms"] for x in prefill) / 1e3
        n_decode, n_prefill = len(decode), sum(x["tokens"] for x in prefill)
        routing = self.dir / "routing.jsonl"
        e, kv = s.experts, s.kv
        return {
            "model": facts["model"], "device": facts["device"], "dtype": facts["dtype"],
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(facts["runtime"]).items()},
            "tokens": {"prefill": n_prefill, "decode": n_decode},
            "prefill_tps": n_prefill / prefill_s if prefill_s else 0.0,
            "decode_tps": n_decode / decode_s if decode_s else 0.0,
            "latency_ms": {"mean": statistics.fmean(lat) if lat else 0.0, "p50": pct(0.5), "p90": pct(0.9),
                           "p99": pct(0.99), "max": lat[-1] if lat else 0.0},
            "hit_rate": e.hit_rate,
            "prefetch_recall": e.prefetch_recall, "prefetch_precision": e.prefetch_precision,
            "bytes_per_token": {
                "host_to_device": sum(x["bytes_host_to_device"] for x in decode) / max(1, n_decode),
                "disk_to_host": sum(x["bytes_disk_to_host"] for x in decode) / max(1, n_decode)},
            "stall_fraction": sum(x["stall_ms"] for x in decode) / 1e3 / decode_s if decode_s else 0.0,
            "cpu_runs": e.cpu_runs, "cpu_expert_seconds": e.cpu_seconds,
            "kv_tokens": {"device": kv.tokens_device, "host": kv.tokens_host, "disk": kv.tokens_disk},
            "peak_memory": {
                "cuda_bytes": torch.cuda.max_memory_allocated(self.rec.device) if self.rec.cuda else None,
                "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
            "stats": s.as_dict(),
            "series": steps,
            "routing_counts": routing_counts(routing, facts["config"]) if routing.exists() else None,
        }

    def write(self, stats, facts: dict) -> None:
        summary = self.summary(stats, facts)
        texts = {"trace.json": json.dumps(self.rec.chrome_trace(extra=self._trace_counters())),
                 "summary.json": json.dumps(summary, indent=1), "report.md": markdown(summary)}
        for name, text in texts.items():
            atomic_write(self.dir / name, text, **_ours(name))


# what each file of a profile starts with: a file there that does not is someone else's, never replaced
PROFILE_FILES = {"trace.json": (b'{"traceEvents"', "a moestream trace"),
                 "summary.json": (b'{\n "model"', "a moestream profile summary"),
                 "report.md": (b"# moestream profile", "a moestream profile report")}


def _ours(name: str) -> dict:
    head, what = PROFILE_FILES[name]

    def ours(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(len(head)) == head

    return dict(ours=ours, what=what, fix="choose another --profile DIR")


def routing_counts(path: Path, config) -> list[list[int]]:
    """Tokens per (MoE layer, expert) in a routing trace: the popularity heatmap's data."""
    index = {layer: i for i, layer in enumerate(config.moe_layers)}
    counts = [[0] * config.num_local_experts for _ in config.moe_layers]
    with open(path, encoding="utf-8") as f:
        next(f, None)
        for line in f:
            rec = json.loads(line)
            row = counts[index[rec["layer"]]]
            for token in rec["experts"]:
                for e in token:
                    row[e] += 1
    return counts


NUMBER, TEXT, MAYBE_NUMBER, NUMBERS = "a number", "a string", "a number or null", "an object of numbers"
SUMMARY = {  # what summary_rows and plots read, and what each must be
    "model": TEXT, "device": TEXT, "dtype": TEXT,
    "tokens": {"prefill": NUMBER, "decode": NUMBER}, "prefill_tps": NUMBER, "decode_tps": NUMBER,
    "latency_ms": {"mean": NUMBER, "p50": NUMBER, "p90": NUMBER, "p99": NUMBER},
    "hit_rate": NUMBER, "prefetch_recall": NUMBERS, "prefetch_precision": NUMBERS,
    "bytes_per_token": {"host_to_device": NUMBER, "disk_to_host": NUMBER}, "stall_fraction": NUMBER,
    "cpu_runs": NUMBER, "cpu_expert_seconds": NUMBER, "kv_tokens": {"device": NUMBER, "host": NUMBER, "disk": NUMBER},
    "peak_memory": {"cuda_bytes": MAYBE_NUMBER, "host_rss_bytes": NUMBER},
}
STEP = {"kind": TEXT, **{k: NUMBER for k in ("ms", "pos", "stall_ms", "cpu_expert_ms", "hits", "misses", "bytes_host_to_device",
                                            "bytes_disk_to_host", "kv_device", "kv_host", "kv_disk")}}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _problem(value, schema, where: str) -> str | None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where or 'the file'} is not a JSON object"
        for key, sub in schema.items():
            if key not in value:
                return f"{where}{key} is missing"
            found = _problem(value[key], sub, f"{where}{key}.")
            if found:
                return found
        return None
    ok = {NUMBER: _is_number(value), TEXT: isinstance(value, str), MAYBE_NUMBER: value is None or _is_number(value),
          NUMBERS: isinstance(value, dict) and all(_is_number(v) for v in value.values())}[schema]
    return None if ok else f"{where.rstrip('.')} is not {schema}"


def summary_problem(s) -> str | None:
    """What makes a summary.json unreadable for `moestream report` (hand-edited, another tool's,
    another version's), or None."""
    found = _problem(s, SUMMARY, "")
    if found:
        return found
    if set(s["prefetch_precision"]) < set(s["prefetch_recall"]):
        return "prefetch_precision lacks a distance that prefetch_recall has"
    series = s.get("series", [])
    if not isinstance(series, list):
        return "series is not a list"
    for i, step in enumerate(series):
        found = _problem(step, STEP, f"series[{i}].")
        if found:
            return found
    counts = s.get("routing_counts")
    if counts is not None and not (isinstance(counts, list)
                                   and all(isinstance(r, list) and all(map(_is_number, r)) for r in counts)
                                   and len({len(r) for r in counts}) <= 1):
        return "routing_counts is not a table of numbers"
    return None


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) lines of a summary: what report.md and `moestream report` both show."""
    lat = s["latency_ms"]
    rows = [
        ("model", f"{s['model']} ({s['device']}, {s['dtype']})"),
        ("tokens", f"{s['tokens']['prefill']} prefilled, {s['tokens']['decode']} decoded"),
        ("prefill", f"{s['prefill_tps']:.1f} tok/s"),
        ("decode", f"{s['decode_tps']:.1f} tok/s"),
        ("decode latency (ms)", f"mean {lat['mean']:.2f} · p50 {lat['p50']:.2f} · p90 {lat['p90']:.2f} · p99 {lat['p99']:.2f}"),
        ("expert hit rate", f"{100 * s['hit_rate']:.1f}%"),
        ("prefetch recall / precision", ", ".join(f"d{d}: {100 * r:.0f}% / {100 * s['prefetch_precision'][d]:.0f}%"
                                                  for d, r in s["prefetch_recall"].items()) or "-"),
        ("bytes per decoded token", f"host→device {s['bytes_per_token']['host_to_device'] / 1e6:.2f} MB · "
                                    f"disk→host {s['bytes_per_token']['disk_to_host'] / 1e6:.2f} MB"),
        ("stall", f"{100 * s['stall_fraction']:.1f}% of decode time"),
        ("experts run on the CPU", f"{s['cpu_runs']} ({s['cpu_expert_seconds']:.3f} s)"),
        ("KV tokens (device / host / disk)", " / ".join(str(s["kv_tokens"][t]) for t in ("device", "host", "disk"))),
    ]
    peak = s["peak_memory"]
    rows.append(("peak memory", (f"cuda {peak['cuda_bytes'] / 2**20:.0f} MiB · " if peak["cuda_bytes"] else "")
                 + f"host RSS {peak['host_rss_bytes'] / 2**20:.0f} MiB"))
    return rows


def markdown(s: dict) -> str:
    out = ["# moestream profile", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(s)]
    out += ["", "Open `trace.json` in https://ui.perfetto.dev; `moestream report DIR` draws the plots.", ""]
    return "\n".join(out)


def plots(summary: dict, out: Path) -> list[Path]:
    """PNG plots of a summary (needs matplotlib); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    decode = [x for x in summary.get("series", []) if x["kind"] == "decode"]
    idx = list(range(len(decode)))
    files = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    stall = [x["stall_ms"] for x in decode]
    cpu = [x["cpu_expert_ms"] for x in decode]
    compute = [max(0.0, x["ms"] - a - b) for x, a, b in zip(decode, stall, cpu)]
    ax.stackplot(idx, compute, stall, cpu, labels=["compute", "waiting on transfers", "experts on the CPU"])
    ax.set(xlabel="decoded token", ylabel="ms", title="per-token latency")
    ax.legend(loc="upper right", fontsize=8)
    save(fig, "latency.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    window, rates = 16, []
    for i in idx:
        w = decode[max(0, i - window + 1):i + 1]
        n = sum(x["hits"] + x["misses"] for x in w)
        rates.append(100 * sum(x["hits"] for x in w) / n if n else 0)
    ax.plot(idx, rates)
    ax.set(xlabel="decoded token", ylabel="%", ylim=(0, 100), title=f"expert-cache hit rate (last {window} tokens)")
    save(fig, "hit_rate.png")

    if summary.get("routing_counts"):
        fig, ax = plt.subplots(figsize=(8, 4))
        im = ax.imshow(summary["routing_counts"], aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", title="expert popularity (tokens routed)")
        fig.colorbar(im, ax=ax)
        save(fig, "popularity.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(idx, [x["bytes_host_to_device"] / 1e6 for x in decode], label="host→device", width=1.0)
    ax.bar(idx, [x["bytes_disk_to_host"] / 1e6 for x in decode], label="disk→host", width=1.0, alpha=0.7)
    ax.set(xlabel="decoded token", ylabel="MB", title="bytes moved per token")
    ax.legend(fontsize=8)
    save(fig, "bytes.png")

    steps = summary.get("series", [])
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.stackplot([x["pos"] for x in steps], [x["kv_device"] for x in steps], [x["kv_host"] for x in steps],
                 [x["kv_disk"] for x in steps], labels=["device", "host", "disk"])
    ax.set(xlabel="context length (tokens)", ylabel="tokens per global layer", title="KV cache tiers")
    ax.legend(loc="upper left", fontsize=8)
    save(fig, "kv_tiers.png")
    return files
