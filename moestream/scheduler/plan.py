"""Plan: what sits where, worked out from the model's shapes and the budgets before any weight is read.

Compute-device bytes = resident weights (attention, norms, routers, shared/dense MLPs, embeddings,
lm_head, and a multimodal checkpoint's vision tower and projector unless --no-vision) + KV reserved for the context + a workspace for activations + expert-cache slots.
Routed experts live in the ExpertStore: host RAM up to --cpu-mem, the rest on disk. When the
budget holds every expert, the cache *is* the model: experts are read straight from the
checkpoint into their slots once and never move again.

torch and the KV cache are imported inside the functions that need them: `moestream plan --help`
(which lists the presets below) must not pay seconds for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DEFAULT_CTX, RuntimeConfig
from ..errors import MoestreamError
from ..model.config import ModelConfig
from ..units import fmt_bytes, fmt_in, fmt_size, is_binary

if TYPE_CHECKING:
    from ..cache.kv import KVLayout
    from ..model.vision import VisionConfig

WORKSPACE_TOKENS = 512  # activations are reserved for a step of this many tokens


def resident_bytes(c: ModelConfig, itemsize: int, resident_dtype: str = "auto") -> int:
    """Everything but the routed experts, from the shapes alone. With --resident-dtype int8 the
    attention, shared-expert, dense-MLP and lm_head matrices [N, K] take N*K bytes + a 2-byte scale
    per row (model/formats.py Int8Linear); with int4, N*K/2 bytes + a 2-byte scale and zero point per
    group of inputs (Int4Linear); embeddings, norms and routers stay at the compute dtype."""
    from ..model.formats import Int4Linear, Int8Linear

    D = c.hidden_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    quantized = {"int8": Int8Linear, "int4": Int4Linear}.get(resident_dtype)

    def matrix(n: int, k: int) -> int:
        return quantized.nbytes_for(n, k) if quantized else n * k * itemsize

    # the embedding table and the final norm; the lm_head is the table itself when tied, unless quantized
    head = matrix(c.vocab_size, D) if quantized or not c.tie_word_embeddings else 0
    n = (c.vocab_size * D + D) * itemsize + head
    for i in range(c.num_hidden_layers):
        n += matrix(q + 2 * kv, D) + matrix(D, q) + 2 * D * itemsize
        F = c.intermediate_size if c.is_moe(i) else c.intermediate_size_mlp
        n += matrix(2 * F, D) + matrix(D, F) + (c.num_local_experts * D * itemsize if c.is_moe(i) else 0)
    return n


def kv_token_bytes(c: ModelConfig, k_type: str, v_type: str) -> int:
    """Keys + values of one token in one layer, in the cache types."""
    from ..cache.kv import kv_type_bytes

    return int(c.num_key_value_heads * (kv_type_bytes(k_type, c.head_dim) + kv_type_bytes(v_type, c.head_dim)))


def kv_bytes(c: ModelConfig, ctx: int, per_token: int, hot_tokens: int | None = None) -> int:
    """Device bytes of the KV cache at `ctx` tokens: one chunk per RoPE layer, and per global layer
    every token (or the hot window when KV spills)."""
    ring = min(ctx, c.attention_chunk_size) * per_token * (c.num_hidden_layers - len(c.global_layers))
    held = ctx if hot_tokens is None else min(ctx, hot_tokens)
    return ring + len(c.global_layers) * held * per_token


def kv_layout(c: ModelConfig, rt: RuntimeConfig, dtype, ctx: int, problem=None):
    """KV storage types and, under --kv-gpu-mem / --kv-cpu-mem, the tokens each tier holds (a KVLayout)."""
    import torch

    from ..cache.kv import KVLayout, kv_type_for

    problem = problem or _raise
    auto = kv_type_for(dtype)
    k_type = auto if rt.cache_type_k == "auto" else rt.cache_type_k
    v_type = auto if rt.cache_type_v == "auto" else rt.cache_type_v
    layout = KVLayout(k_type, v_type, block=rt.kv_block, disk=rt.kv_disk, max_tokens=ctx)
    n_global = len(c.global_layers)
    if rt.kv_gpu_mem is None or n_global == 0:
        return layout
    per_token = kv_token_bytes(c, k_type, v_type)
    ring = kv_bytes(c, ctx, per_token, hot_tokens=0)
    window = min(ctx, rt.ubatch + rt.kv_block)  # a step's tokens plus one block must fit on the device
    minimum = ring + n_global * window * per_token
    if rt.kv_gpu_mem < minimum:
        need = fmt_in(minimum, is_binary(rt.kv_gpu_mem), up=True)  # in the units the budget was typed in
        problem(
            f"--kv-gpu-mem {fmt_size(rt.kv_gpu_mem)} is below the {need} the KV cache needs on "
            f"the device (one chunk per RoPE layer + {window} tokens per global layer): use --kv-gpu-mem "
            f"{need} or more, or a smaller -ub / --kv-block"
        )
        return layout
    layout.hot_tokens = (rt.kv_gpu_mem - ring) // (n_global * per_token)
    if rt.kv_cpu_mem is not None:
        block_bytes = n_global * rt.kv_block * per_token
        layout.host_tokens = rt.kv_cpu_mem // block_bytes * rt.kv_block
        fits = layout.hot_tokens + layout.host_tokens
        if rt.kv_disk is None and ctx > fits:
            problem(
                f"a context of {ctx} tokens does not fit the KV budgets: at most {fits} tokens fit in "
                f"--kv-gpu-mem {fmt_size(rt.kv_gpu_mem)} + --kv-cpu-mem {fmt_size(rt.kv_cpu_mem)}; use -c {fits}, "
                "raise the budgets, or add --kv-disk PATH"
            )
    return layout


def workspace_bytes(c: ModelConfig, itemsize: int) -> int:
    widest = max(2 * c.intermediate_size, 2 * c.intermediate_size_mlp,
                 (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim)
    return WORKSPACE_TOKENS * (4 * c.vocab_size + 4 * widest * itemsize)


@dataclass
class Plan:
    ctx_size: int
    expert_bytes: int  # one packed routed expert in its format (what host RAM, disk and the link hold per expert)
    expert_format: str  # --expert-dtype resolved: bf16, fp8, int8, int4, int2, ...
    n_experts: int  # routed experts in all MoE layers
    resident_bytes: int
    kv_bytes: int
    workspace_bytes: int
    kv: KVLayout  # KV storage types and tier sizes
    cache_slots: int  # expert-cache slots on the compute device
    cpu_layers: frozenset[int]  # MoE layers whose experts always run on the CPU (--cpu-moe / --n-cpu-moe)
    host_experts: int  # experts the store keeps in host RAM; the rest are on disk
    resident: bool  # every GPU-side expert has a slot: no store, no copies after first use
    gpu_mem: int | None
    problems: list[str]  # why it cannot run (only with strict=False)
    vision: VisionConfig | None = None  # the vision tower to load (a multimodal checkpoint, not --no-vision)
    vision_bytes: int = 0  # its weights on the compute device: part of resident_bytes
    miss_bytes: int = 0  # host RAM of the miss replicas (--miss-dtype), taken from --cpu-mem before the experts

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.workspace_bytes + self.cache_slots * self.expert_bytes

    @property
    def disk_experts(self) -> int:
        return 0 if self.resident else self.n_experts - self.host_experts


def default_gpu_mem(device) -> int | None:
    """On CUDA, 90% of the free device memory (vLLM's default utilisation); on CPU, no limit."""
    if device.type != "cuda":
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.9)


def default_cpu_mem() -> int:
    """80% of the available host RAM: what the expert store may fill when --cpu-mem is not given."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def _raise(message: str):
    raise MoestreamError(message)


def vision_of(c: ModelConfig, rt: RuntimeConfig) -> VisionConfig | None:
    """The vision tower a run places: a multimodal checkpoint's (config.json's vision_config), unless
    --no-vision. Read here, with the shapes, so `plan` counts what `load` holds."""
    if not (c.is_multimodal and rt.vision):
        return None
    from ..model.vision import VisionConfig

    return VisionConfig.of_checkpoint(Path(rt.model) / "config.json")


def make_plan(c: ModelConfig, rt: RuntimeConfig, device, dtype, fmt, strict: bool = True) -> Plan:
    """Placement from shapes and budgets. strict: a budget that cannot work raises MoestreamError;
    otherwise (the `plan` command) the reasons are collected in plan.problems and the plan goes on.
    fmt: the experts' ExpertFormat (model/formats.py): the same bytes per expert the runtime places.
    A flag that makes no sense for this model (--prefetch past its last MoE layer) always raises."""
    import torch

    problems: list[str] = []
    farthest = max(1, len(c.moe_layers) - 1)  # the default --prefetch 1 is fine even with one MoE layer
    if rt.prefetch > farthest:
        _raise(f"--prefetch {rt.prefetch} looks further ahead than this model's {len(c.moe_layers)} MoE layers allow: "
               f"use --prefetch {farthest} or less (0 = off)")

    def problem(message: str) -> None:
        if strict:
            _raise(message)
        problems.append(message)

    itemsize = torch.empty((), dtype=dtype).element_size()
    ctx = rt.ctx_size or min(c.max_position_embeddings, DEFAULT_CTX)
    eb = fmt.nbytes(c.hidden_size, c.intermediate_size)
    n_experts = len(c.moe_layers) * c.num_local_experts
    cpu_layers = frozenset(c.moe_layers if rt.cpu_moe else [i for i in c.moe_layers if i < rt.n_cpu_moe])
    gpu_side = n_experts - len(cpu_layers) * c.num_local_experts
    layout = kv_layout(c, rt, dtype, ctx, problem)
    per_token = kv_token_bytes(c, layout.k_type, layout.v_type)
    res, kv, ws = resident_bytes(c, itemsize, rt.resident_dtype), kv_bytes(c, ctx, per_token, layout.hot_tokens), workspace_bytes(c, itemsize)
    vision = vision_of(c, rt)
    vb = vision.resident_bytes(dtype) if vision is not None else 0
    res += vb
    fixed = res + kv + ws
    gpu_mem = rt.gpu_mem if rt.gpu_mem is not None else default_gpu_mem(device)
    need_slot = rt.cpu_experts == "never" and gpu_side > 0
    minimum = fixed + (eb if need_slot else 0)
    if gpu_mem is not None and gpu_mem < minimum:
        spare = gpu_mem - (minimum - kv)  # what is left for KV
        largest = 0
        if spare > 0:  # the largest context whose device KV fits (device KV grows with the context)
            lo, hi = 0, ctx
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if kv_bytes(c, mid, per_token, layout.hot_tokens) <= spare else (lo, mid - 1)
            largest = lo
        f = lambda n, up=False: fmt_in(n, is_binary(gpu_mem), up)  # noqa: E731  (in the units the budget was typed in)
        problem(
            f"--gpu-mem {fmt_size(gpu_mem)} is below the {f(minimum)} this model needs at -c {ctx} "
            f"(resident weights {f(res)}" + (f", of which the vision tower {f(vb)}" if vb else "")
            + f" + KV {f(kv)} + workspace {f(ws)}"
            + (f" + one expert slot {f(eb)}" if need_slot else "")
            + f"): use --gpu-mem {f(minimum, up=True)} or more"
            + (f", or -c {largest} (the largest context that fits)" if largest > 0 else "")
            + (", or --kv-gpu-mem to spill KV to host RAM" if rt.kv_gpu_mem is None and c.global_layers and spare > 0 else "")
            + (", or --no-vision (text only)" if vb else "")
        )
    if rt.expert_cache is not None:
        slots = rt.expert_cache // eb
        if gpu_mem is not None and fixed + slots * eb > gpu_mem:
            problem(
                f"--expert-cache {fmt_size(rt.expert_cache)} does not fit in --gpu-mem {fmt_size(gpu_mem)} "
                f"beside {fmt_in(fixed, is_binary(gpu_mem))} of resident weights, KV and workspace: use --expert-cache "
                f"{fmt_in(max(0, gpu_mem - fixed) // eb * eb, is_binary(gpu_mem))} or less"
            )
    elif gpu_mem is None:
        slots = gpu_side
    else:
        slots = (gpu_mem - fixed) // eb
    slots = max(0, min(slots, gpu_side))
    if need_slot and slots < 1:
        problem(f"--expert-cache must hold at least one expert ({fmt_bytes(eb)}) with --cpu-experts never")
    if rt.cache_split == "per-layer" and need_slot and slots < len(c.moe_layers) - len(cpu_layers):
        problem(
            f"--cache-split per-layer needs one slot per MoE layer ({len(c.moe_layers) - len(cpu_layers)} x "
            f"{fmt_bytes(eb)}) with --cpu-experts never: raise --expert-cache"
        )
    resident = slots >= gpu_side and not cpu_layers
    miss_bytes = 0
    if rt.miss_dtype != "off" and not resident:  # a replica of every expert that can miss, in host RAM first
        from ..model.formats import FORMATS

        miss_bytes = gpu_side * FORMATS[rt.miss_dtype].nbytes(c.hidden_size, c.intermediate_size)
    cpu_mem = rt.cpu_mem if rt.cpu_mem is not None else default_cpu_mem()
    host = min(n_experts, max(0, cpu_mem - miss_bytes) // eb)
    return Plan(ctx, eb, fmt.name, n_experts, res, kv, ws, layout, slots, cpu_layers, host, resident, gpu_mem, problems,
                vision=vision, vision_bytes=vb, miss_bytes=miss_bytes)


def largest_context(c: ModelConfig, rt: RuntimeConfig, device, dtype, fmt) -> int:
    """The longest -c whose plan has no problem under these budgets (0 if none)."""
    from dataclasses import replace

    def fits(ctx: int) -> bool:
        return not make_plan(c, replace(rt, ctx_size=ctx), device, dtype, fmt, strict=False).problems

    lo, hi = 0, c.max_position_embeddings
    if fits(hi):
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
