"""`moestream plan`: the dry run. What sits where under these budgets, from config.json alone.

Exit status 0 when the plan fits, 1 when it does not (after the report, also with --json), so a
script can ask "does this fit?". Budgets are shown the way they were typed (80GiB stays GiB).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import click

from ..config import DEFAULT_CTX, DEFAULT_MODEL
from ..errors import MoestreamError
from ..model.config import ModelConfig, misused_model_path
from ..model.presets import HF_IDS, PRESETS
from ..units import fmt_bytes, fmt_in, fmt_size, is_binary, positive_number
from ..scheduler.plan import default_cpu_mem, default_gpu_mem, kv_token_bytes, largest_context, make_plan, resident_bytes
from .app import cli, runtime_options

DEFAULT_GPU = 80 * 2**30  # one H100 when --gpu-mem is not given and no GPU is visible
MAX_GPUS = 64  # beyond 8 nodes of 8 GPUs, launch lines are not advice


def distributed_commands(model_id: str, total_bytes: int, gpu_mem: int, ctx: int) -> dict | None:
    """The vLLM and SGLang launch lines for the same checkpoint on enough GPUs (expert + tensor
    parallel); None when GPUs of this size would need more than MAX_GPUS of them."""
    if gpu_mem <= 0:
        return None
    need = max(2, math.ceil(total_bytes / (0.9 * gpu_mem)))
    tp = min(8, 1 << (need - 1).bit_length())  # tensor parallel must divide 8 KV heads
    pp = math.ceil(need / tp)
    gpus = tp * pp
    if gpus > MAX_GPUS:
        return None
    vllm = f"vllm serve {model_id} --tensor-parallel-size {tp} --enable-expert-parallel --max-model-len {ctx}"
    sglang = f"python -m sglang.launch_server --model-path {model_id} --tp-size {tp} --ep-size {tp} --context-length {ctx}"
    if pp > 1:
        vllm += f" --pipeline-parallel-size {pp}"
        sglang += f" --pp-size {pp}"
    return {"gpus": gpus, "vllm": vllm, "sglang": sglang}


@cli.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Built-in real shapes (no checkpoint needed); otherwise -m DIR's config.json.")
@click.option("--link-gbps", type=float, default=50.0, show_default=True,
              help="Host-to-GPU GB/s for the decode ceiling (50: PCIe 5 x16, pinned).")
@click.option("--disk-gbps", type=float, default=7.0, show_default=True,
              help="Disk read GB/s for experts that live on disk (7: a PCIe 4 NVMe); their misses are read, then copied.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts (exit status 1 still means it does not fit).")
@runtime_options
def plan(preset, link_gbps, disk_gbps, as_json, runtime):
    """Dry run: where weights, experts and KV would sit, the largest context, the decode ceiling.

    Exits 0 when the plan fits and 1 when it does not (also with --json)."""
    link_gbps = positive_number(link_gbps, "--link-gbps")
    disk_gbps = positive_number(disk_gbps, "--disk-gbps")
    if preset:
        config, name, model_id = ModelConfig.from_dict(PRESETS[preset], source=f"preset {preset}"), f"Llama 4 {preset.title()} (preset)", HF_IDS[preset]
    else:
        path = Path(runtime.model)
        misused = misused_model_path(path)
        if misused:
            raise MoestreamError(misused)
        config, name = ModelConfig.from_file(path / "config.json"), str(path if path != DEFAULT_MODEL else "embedded model")
        model_id = str(path)
    max_ctx = config.max_position_embeddings
    if runtime.ctx_size > max_ctx:
        raise MoestreamError(f"context size {runtime.ctx_size} exceeds this model's maximum of {max_ctx} tokens: use -c {max_ctx} or less")
    import torch

    assumed = []
    gpu = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if runtime.gpu_mem is None:
        gpu_mem = default_gpu_mem(gpu) or DEFAULT_GPU
        assumed.append(f"--gpu-mem {fmt_bytes(gpu_mem)} ({'90% of the free GPU memory' if gpu.type == 'cuda' else 'one 80 GiB GPU assumed'})")
        runtime = replace(runtime, gpu_mem=gpu_mem)
    if runtime.cpu_mem is None:
        cpu_mem = default_cpu_mem()
        assumed.append(f"--cpu-mem {fmt_bytes(cpu_mem)} (80% of this machine's available RAM)")
        runtime = replace(runtime, cpu_mem=cpu_mem)
    from ..model.formats import FORMATS, expert_format, stored_expert_dtype

    dtype = torch.bfloat16
    fmt = expert_format(runtime.expert_dtype, stored_expert_dtype(config), dtype)  # the format the runtime places
    expert_dtype = fmt.name
    p = make_plan(config, runtime, torch.device("cpu"), dtype, fmt, strict=False)
    eb = p.expert_bytes
    fits_ctx = largest_context(config, runtime, torch.device("cpu"), dtype, fmt)
    per_token_kv = kv_token_bytes(config, p.kv.k_type, p.kv.v_type)
    gpu_layers = len(config.moe_layers) - len(p.cpu_layers)
    # all-miss ceiling: every routed expert of a token crosses the link; those that live on disk
    # (the store's share beyond --cpu-mem) are read from disk first, then copied
    per_token_bytes = len(config.moe_layers) * config.num_experts_per_tok * eb
    disk_share = p.disk_experts / p.n_experts if p.n_experts else 0.0
    from_disk = per_token_bytes * disk_share
    seconds = per_token_bytes / (link_gbps * 1e9) + from_disk / (disk_gbps * 1e9)
    ceiling = 1 / seconds if seconds else float("inf")
    all_experts = p.n_experts * eb
    kv_full = per_token_kv * (len(config.global_layers) * p.ctx_size
                              + (config.num_hidden_layers - len(config.global_layers)) * min(p.ctx_size, config.attention_chunk_size))
    # too big for one node: the resident part alone does not fit the GPU even with minimal KV
    floor = make_plan(config, replace(runtime, ctx_size=min(DEFAULT_CTX, max_ctx)), torch.device("cpu"), dtype, fmt, strict=False)
    weights_fit = p.resident_bytes + p.workspace_bytes <= runtime.gpu_mem
    one_node = weights_fit and not (floor.problems and fits_ctx == 0)
    experts_on_cpu = not p.problems and gpu_layers > 0 and p.cache_slots == 0  # fits, but no slot on the GPU

    gpu_binary, cpu_binary = is_binary(runtime.gpu_mem), is_binary(runtime.cpu_mem)  # the units the budgets were typed in
    advice = []
    if p.problems and not weights_fit:  # KV flags cannot help: the weights are the problem
        need = p.resident_bytes + p.workspace_bytes
        advice.append(f"more --gpu-mem: the resident weights and workspace alone need {fmt_in(need, gpu_binary, up=True)}"
                      + ("" if one_node else ", or several GPUs (below)"))
        if runtime.resident_dtype == "auto":
            itemsize = torch.empty((), dtype=dtype).element_size()
            smaller = resident_bytes(config, itemsize, "int8") + p.workspace_bytes
            advice.append(f"--resident-dtype int8 needs {fmt_in(smaller, gpu_binary, up=True)} for them"
                          + (" (enough here)" if smaller + p.kv_bytes <= runtime.gpu_mem else ""))
    elif p.problems:
        if runtime.kv_gpu_mem is None and config.global_layers:
            advice.append("--kv-gpu-mem SIZE to keep only a window of global-layer KV on the GPU (the rest in host RAM)")
        if p.kv.k_type not in ("q8_0",):
            advice.append("-ctk q8_0 -ctv q8_0 to halve the KV cache")
        if fits_ctx:
            advice.append(f"-c {fits_ctx} (the largest context that fits these budgets)")
    if experts_on_cpu:
        one_each = p.device_bytes + gpu_layers * eb
        advice.append(f"--gpu-mem {fmt_in(one_each, gpu_binary, up=True)} or more gives each MoE layer one expert-cache slot"
                      + (", or a smaller -c frees KV for slots" if p.kv_bytes >= eb else ""))
    if p.disk_experts and not p.problems:
        advice.append(f"{p.disk_experts} experts on disk: more --cpu-mem ({fmt_in(all_experts, cpu_binary)} holds them all) "
                      "avoids NVMe reads")
    if p.cache_slots < p.n_experts and expert_dtype in ("bf16", "f16", "f32", "fp8") and "int4" in FORMATS:
        smaller = FORMATS["int4"].nbytes(config.hidden_size, config.intermediate_size)
        advice.append(f"--expert-dtype int4 moves {eb / smaller:.1f}x fewer bytes per miss and holds as many more experts "
                      "in RAM (int8 / fp8: 2x fewer than bf16)")

    verdict = "does not fit" if p.problems else "fits, every routed expert on the CPU" if experts_on_cpu else "fits"
    report = {
        "model": name, "layers": config.num_hidden_layers, "moe_layers": len(config.moe_layers),
        "experts_per_layer": config.num_local_experts, "top_k": config.num_experts_per_tok, "expert_dtype": expert_dtype, "miss_dtype": runtime.miss_dtype,
        "expert_bytes": eb, "context": p.ctx_size, "max_context": max_ctx, "largest_context_that_fits": fits_ctx,
        "gpu": {"budget": runtime.gpu_mem, "budget_text": fmt_size(runtime.gpu_mem),
                "resident_bytes": p.resident_bytes, "kv_bytes": p.kv_bytes,
                "workspace_bytes": p.workspace_bytes, "expert_cache_slots": p.cache_slots,
                "expert_cache_slots_per_layer": p.cache_slots / gpu_layers if gpu_layers else 0,
                "expert_cache_bytes": p.cache_slots * eb, "total_bytes": p.device_bytes,
                "weights_fit": weights_fit},
        "host": {"budget": runtime.cpu_mem, "budget_text": fmt_size(runtime.cpu_mem),
                 "experts_in_ram": p.host_experts if not p.resident else 0,
                 "experts_on_disk": p.disk_experts, "expert_ram_bytes": (p.host_experts if not p.resident else 0) * eb,
                 "miss_replica_bytes": p.miss_bytes,
                 "expert_disk_bytes": p.disk_experts * eb},
        "kv": {"k_type": p.kv.k_type, "v_type": p.kv.v_type, "bytes_per_token_per_layer": per_token_kv,
               "global_layers": len(config.global_layers), "total_bytes_at_context": kv_full,
               "device_tokens_per_global_layer": p.kv.hot_tokens if p.kv.hot_tokens is not None else p.ctx_size,
               "host_tokens_per_global_layer": p.kv.host_tokens, "disk": str(p.kv.disk) if p.kv.disk else None},
        "decode_ceiling": {"link_gbps": link_gbps, "disk_gbps": disk_gbps, "bytes_per_token_all_miss": per_token_bytes,
                           "bytes_per_token_from_disk": from_disk, "tokens_per_s": ceiling},
        "fits": not p.problems, "verdict": verdict, "experts_run_on_cpu": experts_on_cpu,
        "problems": p.problems, "advice": advice, "assumed": assumed,
        "one_node": one_node, "units": {"gpu": "binary" if gpu_binary else "decimal", "host": "binary" if cpu_binary else "decimal"},
    }
    if not one_node:
        report["distributed"] = distributed_commands(model_id, p.resident_bytes + all_experts + kv_full, runtime.gpu_mem, p.ctx_size)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render(report)
    if p.problems:
        sys.exit(1)


def render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    g, h, kv = r["gpu"], r["host"], r["kv"]
    on_gpu = lambda n: fmt_in(n, r["units"]["gpu"] == "binary")  # noqa: E731  (each budget in the units typed)
    on_host = lambda n: fmt_in(n, r["units"]["host"] == "binary")  # noqa: E731
    con = Console(highlight=False)
    con.print(f"[bold]{r['model']}[/bold] · {r['layers']} layers ({r['moe_layers']} MoE x {r['experts_per_layer']} experts, "
              f"top-{r['top_k']}) · {r['expert_dtype']} experts of {on_gpu(r['expert_bytes'])} · -c {r['context']}")
    for a in r["assumed"]:
        con.print(f"[dim]assumed: {a}[/dim]")
    t = Table(title="placement", show_header=True, header_style="bold")
    t.add_column("where")
    t.add_column("what")
    t.add_column("bytes", justify="right")
    t.add_row("GPU", "resident weights (attention, routers, norms, shared experts, embeddings)", on_gpu(g["resident_bytes"]))
    t.add_row("GPU", f"KV cache ({kv['k_type']}/{kv['v_type']}, {kv['device_tokens_per_global_layer']} tokens per global layer)", on_gpu(g["kv_bytes"]))
    t.add_row("GPU", "workspace", on_gpu(g["workspace_bytes"]))
    t.add_row("GPU", f"expert cache: {g['expert_cache_slots']} slots ({g['expert_cache_slots_per_layer']:.1f} per MoE layer)", on_gpu(g["expert_cache_bytes"]))
    t.add_row("GPU", f"[bold]total[/bold] of --gpu-mem {g['budget_text']}", on_gpu(g["total_bytes"]))
    t.add_row("host RAM", f"{h['experts_in_ram']} experts (store) of --cpu-mem {h['budget_text']}",
              on_host(h["expert_ram_bytes"]))
    if h["miss_replica_bytes"]:
        t.add_row("host RAM", f"{r['miss_dtype']} miss replicas of every offloaded expert", on_host(h["miss_replica_bytes"]))
    t.add_row("disk", f"{h['experts_on_disk']} experts (repacked file)", on_host(h["expert_disk_bytes"]))
    if kv["host_tokens_per_global_layer"] is not None or kv["device_tokens_per_global_layer"] < r["context"]:
        host_tokens = kv["host_tokens_per_global_layer"]
        t.add_row("host RAM", f"spilled KV ({'up to ' + str(host_tokens) if host_tokens is not None else 'the rest of the'} "
                  "tokens per global layer)", "")
    con.print(t)
    d = r["decode_ceiling"]
    con.print(f"KV at -c {r['context']}: {on_gpu(kv['total_bytes_at_context'])} ({kv['bytes_per_token_per_layer']} B per token per layer, "
              f"{kv['global_layers']} global layers grow with the context)")
    con.print(f"largest context that fits: [bold]{r['largest_context_that_fits']}[/bold] tokens (model maximum {r['max_context']})")
    if r["experts_run_on_cpu"]:
        con.print("decode: no routed expert crosses the link (every one runs on the CPU), so the link sets no ceiling")
    else:
        disk = (f", {fmt_in(d['bytes_per_token_from_disk'], False)} of them read from disk at {d['disk_gbps']:g} GB/s first"
                if d["bytes_per_token_from_disk"] else "")
        con.print(f"all-miss decode ceiling at {d['link_gbps']:g} GB/s: [bold]{d['tokens_per_s']:.2f} tok/s[/bold] "
                  f"({fmt_in(d['bytes_per_token_all_miss'], False)} of experts per token{disk}); cache hits and CPU-run "
                  "experts go beyond it")
    if r["experts_run_on_cpu"]:
        con.print("[yellow]runs, but no expert-cache slot fits on the GPU: every routed expert would run on the CPU[/yellow]")
    elif r["fits"]:
        con.print("[green]fits[/green]")
    else:
        con.print("[red]does not fit:[/red]")
        for problem in r["problems"]:
            con.print(f"  - {problem}", markup=False)
    for a in r["advice"]:
        con.print(f"  try: {a}", markup=False)
    if "distributed" in r:
        dist = r["distributed"]
        con.print(f"[bold]at this --resident-dtype it cannot run on one GPU of {g['budget_text']}[/bold]: the resident "
                  f"weights alone need {on_gpu(g['resident_bytes'])}." + (f" On {dist['gpus']} GPUs with an existing distributed engine:" if dist
                                                       else f" GPUs of this size would need more than {MAX_GPUS} of them."))
        if dist:
            con.print(f"  {dist['vllm']}", markup=False)
            con.print(f"  {dist['sglang']}", markup=False)
