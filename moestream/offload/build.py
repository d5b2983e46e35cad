"""The builder: from a placement (how many cache slots, how many experts in host RAM, which layers run
on the CPU) and the offload settings, assemble the expert source the model's seam talks to.

Every expert resident when the budget holds them all; otherwise the store (host RAM, then disk),
the device cache with its policy, the transfer engine, the prefetcher (the next layers' routers)
and the cost model, wired together by their constructors into OffloadedExperts.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model.experts import ExpertSource
from ..model.formats import FORMATS, ExpertFormat
from ..profiling.recorder import NULL
from .cache import ExpertCache
from .cost import CostModel
from .engine import OffloadedExperts
from .prefetch import Prefetcher
from .resident import ResidentExperts
from .store import ExpertStore
from .transfer import TransferEngine


def build_experts(checkpoint, settings, fmt: ExpertFormat, *, resident: bool, slots: int, host_experts: int,
                  cpu_layers: frozenset[int], routers: dict[int, torch.Tensor], device: torch.device, dtype: torch.dtype,
                  rec=NULL,
                  guess_log: list | None = None, progress: Callable[[int, int], None] | None = None) -> ExpertSource:
    """settings: the RuntimeConfig (cache_policy, cache_split, prefetch, cpu_experts, miss_dtype, expert_dir, repack);
    fmt: the experts' format (stored, moved and multiplied in it); dtype: the activations' dtype;
    routers: each MoE layer's router (for the prefetcher); progress(bytes_now, bytes_total) while
    experts are placed in host RAM / on disk."""
    if resident:
        return ResidentExperts(checkpoint, fmt, device, dtype)
    c = checkpoint.config
    gpu_layers = [layer for layer in c.moe_layers if layer not in cpu_layers]
    # CPU-run layers first, so a short --cpu-mem keeps the experts the CPU reads in RAM
    keys = [(layer, e) for layer in sorted(cpu_layers) + gpu_layers for e in range(c.num_local_experts)]
    total = len(keys) * fmt.nbytes(c.hidden_size, c.intermediate_size)
    store = ExpertStore(checkpoint, keys, host_experts, fmt, pin=device.type == "cuda", expert_dir=settings.expert_dir,
                        repack=settings.repack, progress=(lambda n: progress(n, total)) if progress else None)
    cache = ExpertCache(slots, fmt, c.hidden_size, c.intermediate_size, device, settings.cache_policy,
                        settings.cache_split, gpu_layers)
    prefetcher = None
    if settings.prefetch > 0 and cache.slots > 0:
        prefetcher = Prefetcher(c.moe_layers, {layer: routers[layer] for layer in gpu_layers}, c.num_experts_per_tok,
                                settings.prefetch)
    replicas = None
    if settings.miss_dtype != "off" and gpu_layers:  # every expert that can miss, in host RAM, packed once into a file
        missable = [k for k in keys if k[0] not in cpu_layers]
        replicas = ExpertStore(checkpoint, missable, len(missable), FORMATS[settings.miss_dtype],
                               pin=False, expert_dir=settings.expert_dir, repack=settings.repack, role="miss")
    cost = None
    if settings.cpu_experts == "auto" and cache.slots > 0 and store.host_keys:
        cost = CostModel.calibrate(store.host_experts[0], cache.pool[0], cache.slot_experts[0], device, c.hidden_size, dtype)
    return OffloadedExperts(store, cache, TransferEngine(store, cache, device, rec), prefetcher, cost,
                            settings.cpu_experts, cpu_layers, guess_log, replicas)
