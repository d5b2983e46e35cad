"""--profile: a Perfetto trace that nests and adds up, a summary that agrees with llm.stats(), plots."""

import json
import subprocess
import sys

import pytest

import moestream
from moestream.model.sampling import SamplingParams


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    llm = moestream.load(profile=out, expert_cache=3 * 2**20, kv_gpu_mem=240 * 1000, ubatch=16, kv_block=16,
                         expert_dir=out / "experts")
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Good morrow, my lord. What news?"}])
    llm.generate_ids(prompt, SamplingParams(temperature=0.8, seed=1, max_tokens=80), stop_ids=set())
    stats = llm.stats()
    llm.close()
    return out, stats


def test_trace_is_valid_chrome_json_with_named_tracks(profiled):
    out, _ = profiled
    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"compute", "H2D stream", "CPU experts", "sampling"} <= names
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 for e in spans)
    assert {"embed", "layer", "attention", "router", "shared expert", "expert", "token", "prefill", "sample",
            "expert copy"} <= {
        e["name"] for e in spans}
    counters = [e for e in events if e["ph"] == "C"]
    assert counters and all(v >= 0 for e in counters for v in e["args"].values())
    assert {"device bytes", "expert cache", "bytes moved", "KV tokens"} <= {e["name"] for e in counters}


def test_token_spans_contain_their_layers_and_add_up(profiled):
    out, _ = profiled
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    tokens = [e for e in events if e["ph"] == "X" and e["name"] == "token"]
    layers = [e for e in events if e["ph"] == "X" and e["name"] == "layer"]
    assert len(tokens) >= 70
    n_layers = 8
    for tok in tokens:
        inside = [e for e in layers if tok["ts"] <= e["ts"] and e["ts"] + e["dur"] <= tok["ts"] + tok["dur"] + 1e-3]
        assert len(inside) == n_layers  # exactly one step's layers nest in each token span
    # the per-layer spans, with the embedding, the lm head and sampling, account for a token's measured
    # time (within 10%)
    parts = [e for e in events if e["ph"] == "X" and e["name"] in ("embed", "layer", "lm head", "sample")]
    total_tokens = sum(t["dur"] for t in tokens)
    in_tokens = sum(e["dur"] for t in tokens for e in parts
                    if t["ts"] <= e["ts"] and e["ts"] + e["dur"] <= t["ts"] + t["dur"] + 1e-3)
    assert 0.9 * total_tokens <= in_tokens <= total_tokens


def test_summary_agrees_with_stats(profiled):
    out, stats = profiled
    s = json.loads((out / "summary.json").read_text())
    assert s["stats"]["experts"]["hits"] == stats.experts.hits and s["stats"]["experts"]["misses"] == stats.experts.misses
    assert s["hit_rate"] == pytest.approx(stats.experts.hit_rate)
    assert s["tokens"]["decode"] == stats.turn.generated_tokens - 1 and s["tokens"]["prefill"] == stats.turn.prompt_tokens
    assert s["cpu_runs"] == stats.experts.cpu_runs
    assert s["kv_tokens"] == {"device": stats.kv.tokens_device, "host": stats.kv.tokens_host, "disk": stats.kv.tokens_disk}
    assert s["kv_tokens"]["host"] > 0
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert s["prefetch_recall"] and 0 <= s["stall_fraction"] < 1
    assert len(s["routing_counts"]) == 8 and sum(map(sum, s["routing_counts"])) > 0
    assert (out / "routing.jsonl").exists() and (out / "report.md").read_text().startswith("# moestream profile")


def test_report_renders_tables_and_plots(profiled):
    out, _ = profiled
    r = subprocess.run([sys.executable, "-m", "moestream", "report", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "decode latency" in r.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "moestream[plots]" in r.stdout
        return
    for name in ("latency", "hit_rate", "popularity", "bytes", "kv_tiers"):
        png = out / "plots" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 1000


def test_report_of_a_missing_profile_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moestream", "report", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "record one with --profile" in r.stderr and r.stderr.count("\n") == 1


def test_profiling_off_records_nothing():
    llm = moestream.load()
    assert not llm.rec.enabled and not llm.model.rec.enabled
    with llm.rec.span("x"):
        pass
    assert not hasattr(llm.rec, "events")


def test_bench_llama_bench_style_outputs(tmp_path):
    def bench(*args):
        r = subprocess.run([sys.executable, "-m", "moestream", "bench", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    md = bench("-p", "32", "-n", "8", "-r", "2")
    assert "| model | size | params | backend | test | t/s | expert hit % | GB/token | stall % |" in md
    assert "| pp32 |" in md and "| tg8 |" in md and " ± " in md
    rows = json.loads(bench("-p", "16", "-n", "4", "-pg", "16,4", "-d", "0,32", "-r", "2", "-o", "json",
                            "--expert-cache", "1MiB,3MiB", "--cache-policy", "lru,lfu", "--expert-dir", str(tmp_path)))
    assert len(rows) == 2 * 2 * 3 * 2  # caches x policies x tests x depths
    assert {r["test"] for r in rows} == {"pp16", "tg4", "pp16+tg4", "pp16 @ d32", "tg4 @ d32", "pp16+tg4 @ d32"}
    assert {(r["expert_cache"], r["cache_policy"]) for r in rows} == {("1MiB", "lru"), ("1MiB", "lfu"), ("3MiB", "lru"), ("3MiB", "lfu")}
    assert all(r["t/s"] > 0 and r["stddev"] >= 0 for r in rows)
    csv = bench("--synthetic", "tiny", "--layers", "2", "-p", "16", "-n", "4", "-r", "2", "-o", "csv")
    assert csv.splitlines()[0].startswith("model,size,params,backend,test,t/s")
    assert "synthetic-tiny-2L" in csv


def test_bench_bad_input_is_one_line():
    r = subprocess.run([sys.executable, "-m", "moestream", "bench", "-p", "lots"], capture_output=True, text=True)
    assert r.returncode == 1 and "needs comma-separated whole numbers" in r.stderr and r.stderr.count("\n") == 1


def test_cuda_event_spans_land_on_the_host_clock(monkeypatch):
    """The recorder's CUDA path (device-timed events instead of clock readings), run on the CPU with
    events stamped by the host clock: spans keep their durations and their place on the timeline."""
    import time

    import torch

    from moestream.profiling.recorder import Recorder

    class HostEvent:  # torch.cuda.Event's timing interface
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # milliseconds, as CUDA reports them

    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    rec = Recorder(torch.device("cuda"))
    starts = []
    for layer in range(2):
        t = rec.mark()
        starts.append((t.t - rec.origin) * 1e6)
        time.sleep(0.002)
        rec.add(("attention", t, rec.mark(), layer))
        with rec.span("kv host blocks", layer=layer):
            time.sleep(0.001)
        t = rec.mark()
        time.sleep(0.001)
        rec.add(("expert", t, rec.mark(), (layer, 3, "CPU experts")))
    events = [e for e in rec.chrome_trace()["traceEvents"] if e["ph"] == "X"]
    attention = sorted((e for e in events if e["name"] == "attention"), key=lambda e: e["ts"])
    assert [e["args"] for e in attention] == [{"layer": 0}, {"layer": 1}]
    for e, start in zip(attention, starts):
        assert 2000 <= e["dur"] < 2000 + 20_000 and abs(e["ts"] - start) < 1000
    kv = [e for e in events if e["name"] == "kv host blocks"]
    assert len(kv) == 2 and all(e["dur"] >= 1000 for e in kv)
    experts = [e for e in events if e["name"] == "expert"]
    assert {e["cat"] for e in experts} == {"CPU experts"} and experts[0]["args"] == {"layer": 0, "expert": 3}
    layers = sorted((e for e in events if e["name"] == "layer"), key=lambda e: e["ts"])
    assert len(layers) == 2 and all(e["dur"] >= 4000 for e in layers)
    assert layers[0]["ts"] + layers[0]["dur"] <= layers[1]["ts"]


def test_bench_sweep_writes_one_profile_per_configuration(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moestream", "bench", "-p", "16", "-n", "4", "-r", "1",
                        "--expert-cache", "1MiB,3MiB", "--expert-dir", str(tmp_path / "x"),
                        "--profile", str(tmp_path / "prof"), "--record-routing", str(tmp_path / "r.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for label in ("expert_cache=1MiB", "expert_cache=3MiB"):
        assert json.loads((tmp_path / "prof" / label / "trace.json").read_text())["traceEvents"]
        assert (tmp_path / f"r.{label}.jsonl").read_text().startswith('{"format": "moestream-routing/1"')


def test_dropped_models_are_freed(tmp_path):
    """Loading freezes what exists (gc.freeze) to keep full collections out of token steps; that must
    not keep a dropped model alive: no reference cycle holds a profiled one, and the next load
    reclaims one that a caller tied into a cycle."""
    import weakref

    llm = moestream.load(profile=tmp_path / "p", expert_cache=3 * 2**20, expert_dir=tmp_path / "x")
    llm.generate("Good morrow", max_tokens=2)
    ref = weakref.ref(llm)
    del llm
    assert ref() is None
    llm = moestream.load()
    llm.me = llm
    ref = weakref.ref(llm)
    del llm
    moestream.load()
    assert ref() is None
