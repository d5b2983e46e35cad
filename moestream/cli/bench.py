"""`moestream bench`: measurements that print ratios from one run."""

from __future__ import annotations

import click

from ..config import parse_size
from .main import cli


@cli.group()
def bench():
    """Benchmarks (replay of routing traces; more to come)."""


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
    from ..scheduler.replay import CostSettings, replay as run_replay
    from ..scheduler.routing import load_trace

    t = load_trace(trace)
    eb = t.meta["expert_bytes"]
    n_experts = len(t.meta["moe_layers"]) * t.meta["num_experts"]
    if slots is None:
        slots = parse_size(expert_cache, "--expert-cache") // eb if expert_cache else max(1, n_experts // 4)
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
