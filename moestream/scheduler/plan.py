"""Plan: what sits where, worked out from the model's shapes and the budgets before any weight is read.

Compute-device bytes = resident weights (attention, norms, routers, shared/dense MLPs, embeddings,
lm_head) + KV reserved for the context + a workspace for activations + expert-cache slots.
Routed experts live in the ExpertStore: host RAM up to --cpu-mem, the rest on disk. When the
budget holds every expert, the cache *is* the model: experts are read straight from the
checkpoint into their slots once and never move again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil
import torch

from ..config import DEFAULT_CTX, RuntimeConfig
from ..errors import MoestreamError
from ..model.config import ModelConfig

WORKSPACE_TOKENS = 512  # activations are reserved for a step of this many tokens


def fmt_bytes(n: float, up: bool = False) -> str:
    """"1.50 GiB"; with up=True rounded up, so a minimum quoted back to the user is enough."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = math.ceil(n / scale * 100) / 100 if up else n / scale
            return f"{value:.2f} {unit}"
    return f"{int(n)} B"


def resident_bytes(c: ModelConfig, itemsize: int) -> int:
    """Everything but the routed experts, from the shapes alone."""
    D = c.hidden_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    n = c.vocab_size * D * (1 if c.tie_word_embeddings else 2) + D
    for i in range(c.num_hidden_layers):
        n += (q + 2 * kv) * D + D * q + 2 * D
        n += c.num_local_experts * D + 3 * c.intermediate_size * D if c.is_moe(i) else 3 * c.intermediate_size_mlp * D
    return n * itemsize


def kv_bytes(c: ModelConfig, ctx: int, itemsize: int) -> int:
    """Keys + values for `ctx` tokens: chunked layers hold one chunk at most, global layers all."""
    per_token = 2 * c.num_key_value_heads * c.head_dim * itemsize
    return sum(per_token * (ctx if not c.uses_rope(i) else min(ctx, c.attention_chunk_size))
               for i in range(c.num_hidden_layers))


def workspace_bytes(c: ModelConfig, itemsize: int) -> int:
    widest = max(2 * c.intermediate_size, 2 * c.intermediate_size_mlp,
                 (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim)
    return WORKSPACE_TOKENS * (4 * c.vocab_size + 4 * widest * itemsize)


@dataclass
class Plan:
    ctx_size: int
    expert_bytes: int  # one packed routed expert at the compute dtype
    n_experts: int  # routed experts in all MoE layers
    resident_bytes: int
    kv_bytes: int
    workspace_bytes: int
    cache_slots: int  # expert-cache slots on the compute device
    cpu_layers: frozenset[int]  # MoE layers whose experts always run on the CPU (--cpu-moe / --n-cpu-moe)
    host_experts: int  # experts the store keeps in host RAM; the rest are on disk
    resident: bool  # every GPU-side expert has a slot: no store, no copies after first use
    gpu_mem: int | None

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.workspace_bytes + self.cache_slots * self.expert_bytes

    @property
    def disk_experts(self) -> int:
        return 0 if self.resident else self.n_experts - self.host_experts


def default_gpu_mem(device: torch.device) -> int | None:
    """On CUDA, 90% of the free device memory (vLLM's default utilisation); on CPU, no limit."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.9)


def make_plan(c: ModelConfig, rt: RuntimeConfig, device: torch.device, dtype: torch.dtype) -> Plan:
    itemsize = torch.empty((), dtype=dtype).element_size()
    ctx = rt.ctx_size or min(c.max_position_embeddings, DEFAULT_CTX)
    eb = c.expert_numel * itemsize
    n_experts = len(c.moe_layers) * c.num_local_experts
    cpu_layers = frozenset(c.moe_layers if rt.cpu_moe else [i for i in c.moe_layers if i < rt.n_cpu_moe])
    gpu_side = n_experts - len(cpu_layers) * c.num_local_experts
    res, kv, ws = resident_bytes(c, itemsize), kv_bytes(c, ctx, itemsize), workspace_bytes(c, itemsize)
    fixed = res + kv + ws
    gpu_mem = rt.gpu_mem if rt.gpu_mem is not None else default_gpu_mem(device)
    need_slot = rt.cpu_experts == "never" and gpu_side > 0
    minimum = fixed + (eb if need_slot else 0)
    if gpu_mem is not None and gpu_mem < minimum:
        raise MoestreamError(
            f"--gpu-mem {fmt_bytes(gpu_mem)} is below the {fmt_bytes(minimum)} this model needs at -c {ctx} "
            f"(resident weights {fmt_bytes(res)} + KV {fmt_bytes(kv)} + workspace {fmt_bytes(ws)}"
            + (f" + one expert slot {fmt_bytes(eb)}" if need_slot else "")
            + f"): use --gpu-mem {fmt_bytes(minimum, up=True)} or more, or a smaller -c"
        )
    if rt.expert_cache is not None:
        slots = rt.expert_cache // eb
        if gpu_mem is not None and fixed + slots * eb > gpu_mem:
            raise MoestreamError(
                f"--expert-cache {fmt_bytes(rt.expert_cache)} does not fit in --gpu-mem {fmt_bytes(gpu_mem)} "
                f"beside {fmt_bytes(fixed)} of resident weights, KV and workspace: use --expert-cache "
                f"{fmt_bytes((gpu_mem - fixed) // eb * eb)} or less"
            )
    elif gpu_mem is None:
        slots = gpu_side
    else:
        slots = (gpu_mem - fixed) // eb
    slots = min(slots, gpu_side)
    if need_slot and slots < 1:
        raise MoestreamError(f"--expert-cache must hold at least one expert ({fmt_bytes(eb)}) with --cpu-experts never")
    if rt.cache_split == "per-layer" and need_slot and slots < len(c.moe_layers) - len(cpu_layers):
        raise MoestreamError(
            f"--cache-split per-layer needs one slot per MoE layer ({len(c.moe_layers) - len(cpu_layers)} x "
            f"{fmt_bytes(eb)}) with --cpu-experts never: raise --expert-cache"
        )
    resident = slots >= gpu_side and not cpu_layers
    if rt.cpu_mem is not None:
        host = min(n_experts, rt.cpu_mem // eb)
    else:
        host = min(n_experts, int(psutil.virtual_memory().available * 0.8) // eb)
    return Plan(ctx, eb, n_experts, res, kv, ws, slots, cpu_layers, host, resident, gpu_mem)
