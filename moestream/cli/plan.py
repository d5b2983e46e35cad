"""`moestream plan`: the dry run. What sits where under these budgets, from config.json alone."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import click
import psutil
import torch
from rich.console import Console
from rich.table import Table

from ..config import DEFAULT_CTX, DEFAULT_MODEL
from ..errors import MoestreamError
from ..model.config import ModelConfig
from ..scheduler.plan import (EXPERT_DTYPE_BYTES, HF_IDS, PRESETS, fmt_bytes, kv_token_bytes, largest_context,
                              make_plan)
from .main import cli, runtime_options

DEFAULT_GPU = 80 * 2**30  # one H100 when --gpu-mem is not given and no GPU is visible


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def distributed_commands(model_id: str, total_bytes: int, gpu_mem: int, ctx: int) -> dict:
    """The vLLM and SGLang launch lines for the same checkpoint on enough GPUs (expert + tensor parallel)."""
    need = max(2, math.ceil(total_bytes / (0.9 * gpu_mem)))
    tp = min(8, 1 << (need - 1).bit_length())  # tensor parallel must divide 8 KV heads
    pp = math.ceil(need / tp)
    gpus = tp * pp
    vllm = f"vllm serve {model_id} --tensor-parallel-size {tp} --enable-expert-parallel --max-model-len {ctx}"
    sglang = f"python -m sglang.launch_server --model-path {model_id} --tp-size {tp} --ep-size {tp} --context-length {ctx}"
    if pp > 1:
        vllm += f" --pipeline-parallel-size {pp}"
        sglang += f" --pp-size {pp}"
    return {"gpus": gpus, "vllm": vllm, "sglang": sglang}


@cli.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Built-in real shapes (no checkpoint needed); otherwise -m DIR's config.json.")
@click.option("--expert-dtype", type=click.Choice(sorted(EXPERT_DTYPE_BYTES)), default="bf16", show_default=True,
              help="Precision of routed experts to plan for (int4: group-128 scales).")
@click.option("--link-gbps", type=float, default=50.0, show_default=True, help="Host-to-GPU bandwidth for the ceiling.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@runtime_options
def plan(preset, expert_dtype, link_gbps, as_json, runtime):
    """Dry run: where weights, experts and KV would sit, the largest context, the decode ceiling."""
    if preset:
        config, name, model_id = ModelConfig.from_dict(PRESETS[preset], source=f"preset {preset}"), f"Llama 4 {preset.title()} (preset)", HF_IDS[preset]
    else:
        path = Path(runtime.model)
        config, name = ModelConfig.from_file(path / "config.json"), str(path if path != DEFAULT_MODEL else "embedded model")
        model_id = str(path)
    max_ctx = config.max_position_embeddings
    if runtime.ctx_size > max_ctx:
        raise MoestreamError(f"context size {runtime.ctx_size} exceeds this model's maximum of {max_ctx} tokens: use -c {max_ctx} or less")
    assumed = []
    gpu = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if runtime.gpu_mem is None:
        gpu_mem = int(torch.cuda.mem_get_info()[0] * 0.9) if gpu.type == "cuda" else DEFAULT_GPU
        assumed.append(f"--gpu-mem {fmt_bytes(gpu_mem)} ({'90% of the free GPU memory' if gpu.type == 'cuda' else 'one 80 GiB GPU assumed'})")
        runtime = replace(runtime, gpu_mem=gpu_mem)
    if runtime.cpu_mem is None:
        cpu_mem = int(psutil.virtual_memory().available * 0.8)
        assumed.append(f"--cpu-mem {fmt_bytes(cpu_mem)} (80% of this machine's available RAM)")
        runtime = replace(runtime, cpu_mem=cpu_mem)
    dtype = torch.bfloat16
    eb = int(config.expert_numel * EXPERT_DTYPE_BYTES[expert_dtype])
    p = make_plan(config, runtime, torch.device("cpu"), dtype, eb, strict=False)
    fits_ctx = largest_context(config, runtime, torch.device("cpu"), dtype, eb)
    per_token_kv = kv_token_bytes(config, p.kv.k_type, p.kv.v_type)
    gpu_layers = len(config.moe_layers) - len(p.cpu_layers)
    per_token_bytes = len(config.moe_layers) * config.num_experts_per_tok * eb
    ceiling = link_gbps * 1e9 / per_token_bytes if per_token_bytes else float("inf")
    all_experts = p.n_experts * eb
    kv_full = per_token_kv * (len(config.global_layers) * p.ctx_size
                              + (config.num_hidden_layers - len(config.global_layers)) * min(p.ctx_size, config.attention_chunk_size))
    # too big for one node: the resident part alone does not fit the GPU even with minimal KV
    floor = make_plan(config, replace(runtime, ctx_size=min(DEFAULT_CTX, max_ctx)), torch.device("cpu"), dtype, eb, strict=False)
    one_node = p.resident_bytes + p.workspace_bytes <= runtime.gpu_mem and not (floor.problems and fits_ctx == 0)
    advice = []
    if p.problems:
        if runtime.kv_gpu_mem is None and config.global_layers:
            advice.append("--kv-gpu-mem SIZE to keep only a window of global-layer KV on the GPU (the rest in host RAM)")
        if p.kv.k_type not in ("q8_0",):
            advice.append("-ctk q8_0 -ctv q8_0 to halve the KV cache")
        if fits_ctx:
            advice.append(f"-c {fits_ctx} (the largest context that fits these budgets)")
    if p.disk_experts and not p.problems:
        advice.append(f"{p.disk_experts} experts on disk: more --cpu-mem ({gb(all_experts)} holds them all) avoids NVMe reads")
    if expert_dtype == "bf16" and p.cache_slots < p.n_experts:
        advice.append("--expert-dtype fp8 halves the bytes each miss moves (needs an fp8 checkpoint)")

    report = {
        "model": name, "layers": config.num_hidden_layers, "moe_layers": len(config.moe_layers),
        "experts_per_layer": config.num_local_experts, "top_k": config.num_experts_per_tok, "expert_dtype": expert_dtype,
        "expert_bytes": eb, "context": p.ctx_size, "max_context": max_ctx, "largest_context_that_fits": fits_ctx,
        "gpu": {"budget": runtime.gpu_mem, "resident_bytes": p.resident_bytes, "kv_bytes": p.kv_bytes,
                "workspace_bytes": p.workspace_bytes, "expert_cache_slots": p.cache_slots,
                "expert_cache_slots_per_layer": p.cache_slots / gpu_layers if gpu_layers else 0,
                "expert_cache_bytes": p.cache_slots * eb, "total_bytes": p.device_bytes},
        "host": {"budget": runtime.cpu_mem, "experts_in_ram": p.host_experts if not p.resident else 0,
                 "experts_on_disk": p.disk_experts, "expert_ram_bytes": (p.host_experts if not p.resident else 0) * eb,
                 "expert_disk_bytes": p.disk_experts * eb},
        "kv": {"k_type": p.kv.k_type, "v_type": p.kv.v_type, "bytes_per_token_per_layer": per_token_kv,
               "global_layers": len(config.global_layers), "total_bytes_at_context": kv_full,
               "device_tokens_per_global_layer": p.kv.hot_tokens if p.kv.hot_tokens is not None else p.ctx_size,
               "host_tokens_per_global_layer": p.kv.host_tokens, "disk": str(p.kv.disk) if p.kv.disk else None},
        "decode_ceiling": {"link_gbps": link_gbps, "bytes_per_token_all_miss": per_token_bytes, "tokens_per_s": ceiling},
        "fits": not p.problems, "problems": p.problems, "advice": advice, "assumed": assumed,
        "one_node": one_node,
    }
    if not one_node:
        report["distributed"] = distributed_commands(model_id, p.resident_bytes + all_experts + kv_full, runtime.gpu_mem, p.ctx_size)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    render(report)


def render(r: dict) -> None:
    con = Console(highlight=False)
    con.print(f"[bold]{r['model']}[/bold] · {r['layers']} layers ({r['moe_layers']} MoE x {r['experts_per_layer']} experts, "
              f"top-{r['top_k']}) · {r['expert_dtype']} experts of {gb(r['expert_bytes'])} · -c {r['context']}")
    for a in r["assumed"]:
        con.print(f"[dim]assumed: {a}[/dim]")
    g, h, kv = r["gpu"], r["host"], r["kv"]
    t = Table(title="placement", show_header=True, header_style="bold")
    t.add_column("where")
    t.add_column("what")
    t.add_column("bytes", justify="right")
    t.add_row("GPU", "resident weights (attention, routers, norms, shared experts, embeddings)", gb(g["resident_bytes"]))
    t.add_row("GPU", f"KV cache ({kv['k_type']}/{kv['v_type']}, {kv['device_tokens_per_global_layer']} tokens per global layer)", gb(g["kv_bytes"]))
    t.add_row("GPU", "workspace", gb(g["workspace_bytes"]))
    t.add_row("GPU", f"expert cache: {g['expert_cache_slots']} slots ({g['expert_cache_slots_per_layer']:.1f} per MoE layer)", gb(g["expert_cache_bytes"]))
    t.add_row("GPU", f"[bold]total[/bold] of --gpu-mem {gb(g['budget'])}", gb(g["total_bytes"]))
    t.add_row("host RAM", f"{h['experts_in_ram']} experts (store)", gb(h["expert_ram_bytes"]))
    t.add_row("disk", f"{h['experts_on_disk']} experts (repacked file)", gb(h["expert_disk_bytes"]))
    if kv["host_tokens_per_global_layer"] is not None or kv["device_tokens_per_global_layer"] < r["context"]:
        host_tokens = kv["host_tokens_per_global_layer"]
        t.add_row("host RAM", f"spilled KV ({'up to ' + str(host_tokens) if host_tokens is not None else 'the rest of the'} "
                  "tokens per global layer)", "")
    con.print(t)
    d = r["decode_ceiling"]
    con.print(f"KV at -c {r['context']}: {gb(kv['total_bytes_at_context'])} ({kv['bytes_per_token_per_layer']} B per token per layer, "
              f"{kv['global_layers']} global layers grow with the context)")
    con.print(f"largest context that fits: [bold]{r['largest_context_that_fits']}[/bold] tokens (model maximum {r['max_context']})")
    con.print(f"all-miss decode ceiling at {d['link_gbps']:g} GB/s: [bold]{d['tokens_per_s']:.2f} tok/s[/bold] "
              f"({gb(d['bytes_per_token_all_miss'])} of experts per token); cache hits and CPU-run experts go beyond it")
    if r["fits"]:
        con.print("[green]fits[/green]")
    else:
        con.print("[red]does not fit:[/red]")
        for problem in r["problems"]:
            con.print(f"  - {problem}")
    for a in r["advice"]:
        con.print(f"  try: {a}")
    if "distributed" in r:
        dist = r["distributed"]
        con.print(f"[bold]this cannot run on one GPU of {gb(r['gpu']['budget'])}[/bold]: the resident weights alone need "
                  f"{gb(r['gpu']['resident_bytes'])}. On {dist['gpus']} GPUs with an existing distributed engine:")
        con.print(f"  {dist['vllm']}", markup=False)
        con.print(f"  {dist['sglang']}", markup=False)
