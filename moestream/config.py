"""RuntimeConfig: every setting of a run in one dataclass, built once from flags or load(**kwargs).

Also the one parser for sizes ("40GiB", "40GB", "512MiB", plain bytes) and context lengths
("32k" = 32,000, "32K" = 32,768, "1M" = 1,048,576 as in vLLM: lowercase = powers of 1000,
uppercase = powers of 1024), used by every command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoestreamError

DEFAULT_MODEL = Path(__file__).parent / "data" / "default"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "K": 2**10, "M": 2**20}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from "40GiB" (x2^30), "40GB" (x10^9), "512MiB", "1.5GiB" or plain bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise MoestreamError(f"{what} must not be negative (got {text})")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise MoestreamError(f"{what} {text!r} is not a size: use e.g. 40GiB, 40GB, 512MiB or plain bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_count(text: str | int, what: str = "context size") -> int:
    """Tokens from "4096", "32k" (32,000), "32K" (32,768), "1M" (1,048,576), "1m" (1,000,000)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise MoestreamError(f"{what} must be positive (got {text})")
        return text
    m = re.match(r"^\s*(\d+(?:\.\d*)?)\s*([kKmM]?)\s*$", str(text))
    if m is None:
        raise MoestreamError(f"{what} {text!r} is not a token count: use e.g. 4096, 32k, 128K or 1M")
    n = int(float(m.group(1)) * _COUNT_UNITS[m.group(2)])
    if n <= 0:
        raise MoestreamError(f"{what} must be positive (got {text!r})")
    return n


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoestreamError(f"device {device!r} is not a device: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoestreamError("device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """"auto" = the checkpoint's dtype on CUDA, float32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if dtype == "auto":
        return checkpoint_dtype if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MoestreamError(f"dtype {dtype!r} is not known: use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


CPU_EXPERTS = ("auto", "never", "always")
CACHE_POLICIES = ("lru", "lfu", "predictive")
CACHE_SPLITS = ("auto", "global", "per-layer")
DEFAULT_CTX = 8192  # the context when -c is not given (capped by the model's maximum)


KV_CACHE_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")


def _positive(value, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise MoestreamError(f"{what} {value!r} is not a whole number") from None
    if n <= 0:
        raise MoestreamError(f"{what} must be positive (got {value})")
    return n


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise MoestreamError(f"{what} {value!r} is not one of {', '.join(choices)}")
    return value


@dataclass
class RuntimeConfig:
    """Everything a run needs to know; sizes are bytes, None = "no limit / work it out"."""

    model: Path = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    ctx_size: int = 0  # tokens; 0 = min(model maximum, DEFAULT_CTX)
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    # --- expert offload (placement and budgets) ---
    gpu_mem: int | None = None  # compute-device budget: resident weights + expert cache + KV
    cpu_mem: int | None = None  # host RAM for the expert store; the rest of the experts go to disk
    expert_cache: int | None = None  # bytes of expert-cache slots (default: what gpu_mem leaves)
    cpu_experts: str = "auto"  # compute a missing expert on the CPU: auto (cost model) | never | always
    cache_policy: str = "predictive"  # closest to Belady's MIN on recorded traces (README)
    cache_split: str = "auto"  # per-layer shares when every layer gets a slot (measured better), else global
    prefetch: int = 1  # lookahead in MoE layers for speculative prefetch; 0 = off
    cpu_moe: bool = False  # llama.cpp --cpu-moe: every layer's routed experts stay on (and run on) the CPU
    n_cpu_moe: int = 0  # llama.cpp --n-cpu-moe N: the first N layers' experts stay on the CPU
    expert_dir: Path | None = None  # where the repacked disk-tier expert file lives (default: ~/.cache/moestream)
    repack: bool = True  # False: disk-tier experts are read straight from the checkpoint files
    record_routing: Path | None = None  # write every token's (layer, expert, score) as JSONL
    # --- KV cache tiers ---
    kv_gpu_mem: int | None = None  # device bytes for KV (chunk rings + global hot windows); None = all on device
    kv_cpu_mem: int | None = None  # host RAM for spilled KV blocks; None = no limit
    kv_disk: Path | None = None  # spill file beyond --kv-cpu-mem
    ubatch: int = 512  # prefill micro-batch (tokens per forward step)
    cache_type_k: str = "auto"  # f32 | f16 | bf16 | q8_0; auto = the compute dtype
    cache_type_v: str = "auto"
    kv_block: int = 256  # tokens per spilled KV block
    profile: Path | None = None  # write trace.json, summary.json, routing.jsonl, report.md here

    @classmethod
    def build(cls, path=None, device="auto", dtype="auto", ctx_size=0, threads=0, gpu_mem=None, cpu_mem=None,
              expert_cache=None, cpu_experts="auto", cache_policy="predictive", cache_split="auto", prefetch=1,
              cpu_moe=False, n_cpu_moe=0, expert_dir=None, repack=True, record_routing=None, kv_gpu_mem=None,
              kv_cpu_mem=None, kv_disk=None, ubatch=512, cache_type_k="auto", cache_type_v="auto",
              kv_block=256, profile=None) -> "RuntimeConfig":
        """Parse and check every setting once (sizes, counts, choices); raises MoestreamError."""
        size = lambda v, what: parse_size(v, what) if v is not None else None  # noqa: E731
        try:
            if int(prefetch) < 0 or int(n_cpu_moe) < 0:
                raise MoestreamError("--prefetch and --n-cpu-moe must not be negative")
        except ValueError:
            raise MoestreamError(f"--prefetch {prefetch!r} / --n-cpu-moe {n_cpu_moe!r}: whole numbers, please") from None
        return cls(
            model=Path(path) if path else DEFAULT_MODEL,
            device=device,
            dtype=dtype,
            ctx_size=parse_count(ctx_size) if ctx_size and str(ctx_size) != "0" else 0,
            threads=_positive(threads, "-t/--threads") if threads and str(threads) != "0" else 0,
            gpu_mem=size(gpu_mem, "--gpu-mem"),
            cpu_mem=size(cpu_mem, "--cpu-mem"),
            expert_cache=size(expert_cache, "--expert-cache"),
            cpu_experts=_choice(cpu_experts, CPU_EXPERTS, "--cpu-experts"),
            cache_policy=_choice(cache_policy, CACHE_POLICIES, "--cache-policy"),
            cache_split=_choice(cache_split, CACHE_SPLITS, "--cache-split"),
            prefetch=int(prefetch),
            cpu_moe=bool(cpu_moe),
            n_cpu_moe=int(n_cpu_moe),
            expert_dir=Path(expert_dir) if expert_dir else None,
            repack=bool(repack),
            record_routing=Path(record_routing) if record_routing else None,
            kv_gpu_mem=size(kv_gpu_mem, "--kv-gpu-mem"),
            kv_cpu_mem=size(kv_cpu_mem, "--kv-cpu-mem"),
            kv_disk=Path(kv_disk) if kv_disk else None,
            ubatch=_positive(ubatch, "-ub/--ubatch-size"),
            cache_type_k=_choice(cache_type_k, KV_CACHE_TYPES, "-ctk/--cache-type-k"),
            cache_type_v=_choice(cache_type_v, KV_CACHE_TYPES, "-ctv/--cache-type-v"),
            kv_block=_positive(kv_block, "--kv-block"),
            profile=Path(profile) if profile else None,
        )
