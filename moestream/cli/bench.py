"""`moestream bench`: llama-bench-style measurements, and replay of routing traces.

    moestream bench -p 512 -n 128 -r 5                         # pp512 and tg128 on the embedded model
    moestream bench -pg 512,128 -d 4096 --expert-cache 1MiB,3MiB --cache-policy lru,lfu -o csv
    moestream bench --synthetic scout --layers 8 -p 512 -n 32  # real shapes, random weights (GPU)

Tests: pp<N> (prefill N tokens), tg<N> (decode N tokens), pp<N>+tg<M> (both, one rate), each at
depth -d (tokens already in the cache, untimed). Every valued runtime flag takes a comma list; one
row per combination and test, mean ± stddev over -r repetitions, plus expert hit %, GB moved per
token and stall %.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
from pathlib import Path

import click

from ..units import parse_size, positive_number
from ..errors import MoestreamError
from ..config import RuntimeConfig
from ..model.sampling import SamplingParams
from .app import cli, register, runtime_options


def _counts(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise MoestreamError(f"{what} {text!r} needs comma-separated whole numbers") from None
    if any(v < 0 for v in values):
        raise MoestreamError(f"{what} must not be negative")
    return values


def run_test(llm, n_prompt: int, n_gen: int, depth: int, seed: int) -> dict:
    """One repetition: returns tokens/s and the counter deltas of the timed part."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = llm.config.vocab_size
    prefix = torch.randint(0, vocab, (depth + 1,), generator=g).tolist()
    llm.reset()
    if depth:
        llm.generate_ids(prefix, SamplingParams(temperature=0, max_tokens=1), stop_ids=set())
    before = llm.stats()
    body = prefix + torch.randint(0, vocab, (n_prompt,), generator=g).tolist()
    llm.generate_ids(body, SamplingParams(temperature=0, max_tokens=n_gen + 1), stop_ids=set())
    s = llm.stats()
    t, e, e0 = s.turn, s.experts, before.experts
    seconds = (t.prompt_seconds if n_prompt else 0.0) + (t.generation_seconds if n_gen else 0.0)
    tokens = n_prompt + n_gen
    hits, misses = e.hits - e0.hits, e.misses - e0.misses
    moved = (e.bytes_host_to_device - e0.bytes_host_to_device) + (e.bytes_disk_to_host - e0.bytes_disk_to_host)
    return {"tps": tokens / seconds if seconds else 0.0, "hit": hits / (hits + misses) if hits + misses else None,
            "gb_per_token": moved / 1e9 / max(1, tokens),
            "stall": (e.stall_seconds - e0.stall_seconds) / seconds if seconds else 0.0}


def model_facts(llm) -> dict:
    import torch

    c, p = llm.config, llm.plan
    params = p.resident_bytes / torch.empty((), dtype=llm.dtype).element_size() + p.n_experts * c.expert_numel
    size = p.resident_bytes + p.n_experts * p.expert_bytes
    return {"model": llm.checkpoint.path.name, "size": f"{size / 2**30:.2f} GiB",
            "params": f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M",
            "backend": f"{llm.device.type} {str(llm.dtype).removeprefix('torch.')}"}


@cli.group(invoke_without_command=True)
@click.option("-p", "--n-prompt", default="512", show_default=True, help="Prompt tokens for pp tests (comma list).")
@click.option("-n", "--n-gen", default="128", show_default=True, help="Generated tokens for tg tests (comma list).")
@click.option("-pg", "pg", default="", help="pp,tg pairs measured together, e.g. 512,128.")
@click.option("-d", "--n-depth", default="0", show_default=True, help="Tokens already in the cache (comma list).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("-o", "--output", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
@click.option("--synthetic", type=click.Choice(["scout", "maverick", "tiny"]), default=None,
              help="Real shapes with random weights, no checkpoint (tiny: small shapes for smoke tests).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="With --synthetic: how many layers.")
@runtime_options(sweep=True)
@click.pass_context
def bench(ctx, n_prompt, n_gen, pg, n_depth, repetitions, output, synthetic, layers, sweeps):
    """llama-bench for moestream: pp / tg / pp+tg tests, parameter sweeps, mean ± stddev."""
    if ctx.invoked_subcommand is not None:
        return
    tests = [("pp", n, 0) for n in _counts(n_prompt, "-p") if n] + [("tg", 0, n) for n in _counts(n_gen, "-n") if n]
    if pg:
        pair = _counts(pg, "-pg")
        if len(pair) != 2:
            raise MoestreamError("-pg takes one pair: PROMPT,GEN (e.g. 512,128)")
        tests.append(("pp+tg", pair[0], pair[1]))
    if not tests:
        raise MoestreamError("no test to run: give -p, -n or -pg a positive count")
    depths = _counts(n_depth, "-d") or [0]
    if layers is not None and not synthetic:
        raise MoestreamError("--layers only applies to --synthetic models: add --synthetic scout|maverick|tiny, or drop --layers")
    longest = max(d + p + g for d in depths for _, p, g in tests) + 2  # the depth prefix and last sample take one each
    for combo in itertools.product(*sweeps.values()):  # every combination's flags checked before the first run
        runtime = RuntimeConfig.build(**dict(zip(sweeps, combo)))
        if runtime.ctx_size and runtime.ctx_size < longest:
            raise MoestreamError(f"-c {runtime.ctx_size} is too small for these tests: the longest needs {longest} tokens "
                                 f"(depth + prompt + generated + 2): use -c {longest} or more, or leave -c out")
    import torch

    from ..llm import LLM

    swept = {k: v for k, v in sweeps.items() if len(v) > 1}
    rows = []
    for combo in itertools.product(*sweeps.values()):
        values = dict(zip(sweeps, combo))
        if swept:  # one profile / routing trace per configuration, not the last one over the others
            label = ",".join(f"{k}={values[k]}" for k in swept).replace("/", "_")
            if values.get("profile"):
                values["profile"] = str(Path(values["profile"]) / label)
            if values.get("record_routing"):
                trace = Path(values["record_routing"])
                values["record_routing"] = str(trace.with_name(f"{trace.stem}.{label}{trace.suffix}"))
        checkpoint = None
        if synthetic:
            from ..model.synthetic import SyntheticCheckpoint

            dtype = {"auto": torch.bfloat16, "float32": torch.float32}.get(values.get("dtype", "auto"), torch.bfloat16)
            checkpoint = SyntheticCheckpoint(synthetic, layers, dtype)
            values["model"] = str(checkpoint.path)
        runtime = RuntimeConfig.build(**values)
        if not runtime.ctx_size:
            values["ctx_size"] = str(longest)
            runtime = RuntimeConfig.build(**values)
        llm = register(LLM(runtime, checkpoint=checkpoint))
        if hasattr(llm.experts, "place_all"):  # every expert resident: placed before any timing, as llama-bench's model is
            llm.experts.place_all()
        facts = model_facts(llm)
        for (kind, n_p, n_g), depth in itertools.product(tests, depths):
            name = {"pp": f"pp{n_p}", "tg": f"tg{n_g}", "pp+tg": f"pp{n_p}+tg{n_g}"}[kind] + (f" @ d{depth}" if depth else "")
            run_test(llm, min(n_p, 8), min(n_g, 2), depth, seed=0)  # warm-up
            reps = [run_test(llm, n_p, n_g, depth, seed=r + 1) for r in range(repetitions)]
            tps = [r["tps"] for r in reps]
            hits = [r["hit"] for r in reps if r["hit"] is not None]
            rows.append({**facts, **{k: values[k] for k in swept}, "test": name,
                         "t/s": statistics.fmean(tps), "stddev": statistics.stdev(tps) if len(tps) > 1 else 0.0,
                         "expert hit %": 100 * statistics.fmean(hits) if hits else None,
                         "GB/token": statistics.fmean(r["gb_per_token"] for r in reps),
                         "stall %": 100 * statistics.fmean(r["stall"] for r in reps)})
        llm.close()
    click.echo(render(rows, output, list(swept)))


def render(rows: list[dict], fmt: str, swept: list[str]) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    cols = ["model", "size", "params", "backend", *swept, "test", "t/s", "expert hit %", "GB/token", "stall %"]
    if fmt == "csv":
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=cols + ["stddev"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return out.getvalue().rstrip()

    def cell(row, col):
        v = row[col]
        if col == "t/s":
            return f"{v:.2f} ± {row['stddev']:.2f}"
        if v is None:
            return "-"
        return f"{v:.1f}" if col in ("expert hit %", "stall %") else f"{v:.3f}" if col == "GB/token" else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


@bench.command()
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--expert-cache", default=None, help="Cache size to simulate (e.g. 4GiB); or --slots.")
@click.option("--slots", type=int, default=None, help="Cache size in experts (default: 25% of all experts).")
@click.option("--link-gbps", type=float, default=50.0, show_default=True, help="Host-to-device GB/s.")
@click.option("--expert-ms", type=float, default=0.1, show_default=True, help="One expert, one token, on the device.")
@click.option("--layer-ms", type=float, default=0.3, show_default=True,
              help="One layer's attention + router + shared expert, one token.")
@click.option("--cpu-expert-ms", type=float, default=None, help="One expert on the CPU (omit: never use the CPU).")
def replay(trace, expert_cache, slots, link_gbps, expert_ms, layer_ms, cpu_expert_ms):
    """Replay a --record-routing TRACE through every cache policy and Belady's MIN."""
    from ..profiling.routing import load_trace

    link_gbps = positive_number(link_gbps, "--link-gbps")
    for value, flag in ((expert_ms, "--expert-ms"), (layer_ms, "--layer-ms"), (cpu_expert_ms, "--cpu-expert-ms")):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise MoestreamError(f"{flag} {value} is not a time: use a finite number of milliseconds, 0 or more")
    t = load_trace(trace)
    eb = t.meta["expert_bytes"]
    n_experts = len(t.meta["moe_layers"]) * t.meta["num_experts"]
    if slots is None and expert_cache:
        slots = parse_size(expert_cache, "--expert-cache") // eb
        if slots < 1:
            raise MoestreamError(f"--expert-cache {expert_cache} holds no expert of this trace ({eb} bytes each): "
                                 f"use --expert-cache {eb} or more")
    elif slots is None:
        slots = max(1, n_experts // 4)
    elif slots < 1:
        raise MoestreamError(f"--slots {slots}: the cache needs at least 1 slot")
    from ..analysis.replay import CostSettings, replay as run_replay

    cost = CostSettings(link_gbps, expert_ms, layer_ms, cpu_expert_ms)
    rows = run_replay(t, slots, cost)
    click.echo(f"trace: {trace} ({t.tokens} tokens, {len(t.meta['moe_layers'])} MoE layers x {t.meta['num_experts']} experts, "
               f"{eb / 2**20:.2f} MiB per expert); cache: {slots} slots ({100 * slots / n_experts:.0f}% of experts)")
    click.echo(f"cost model: link {link_gbps} GB/s, expert {expert_ms} ms, layer {layer_ms} ms, "
               f"CPU expert {'off' if cpu_expert_ms is None else f'{cpu_expert_ms} ms'}")
    click.echo("| policy | split | prefetch | hit rate | of MIN | MB moved / token | stall ms / token | projected tok/s |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r.policy} | {r.split} | {'yes' if r.prefetch else 'no'} | {100 * r.hit_rate:.1f}% | {r.of_min:.3f} | "
                   f"{r.bytes_per_token / 1e6:.2f} | {1e3 * r.stall_s / max(1, r.decode_tokens):.2f} | {r.tok_s:.1f} |")



