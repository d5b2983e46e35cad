"""RuntimeConfig: every setting of a run in one dataclass, built once from flags or load(**kwargs).

Also the one parser for sizes ("40GiB", "40GB", "512MiB", plain bytes) and context lengths
("32k" = 32,000, "32K" = 32,768, "1M" = 1,048,576 as in vLLM: lowercase = powers of 1000,
uppercase = powers of 1024), used by every command.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from .errors import MoestreamError

DEFAULT_MODEL = Path(__file__).parent / "data" / "default"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$", re.ASCII)
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "K": 2**10, "M": 2**20}


class Size(int):
    """A byte count that remembers how it was typed, so a budget is shown back in the user's units
    ("--gpu-mem 80GiB" is never echoed as "85.90 GB"): `text` is the typed spelling, `binary` whether
    its unit was a power of 1024 (None for plain bytes)."""

    text: str
    binary: bool | None

    def __new__(cls, n: int, text: str, binary: bool | None):
        self = super().__new__(cls, n)
        self.text, self.binary = text, binary
        return self

    def __reduce__(self):  # copy / deepcopy (dataclasses.asdict) keep the spelling
        return (Size, (int(self), self.text, self.binary))


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from "40GiB" (x2^30), "40GB" (x10^9), "512MiB", "1.5GiB", "0.5KB" or plain bytes.

    Exact arithmetic (no float): a value that is not a whole number of bytes ("1.5", "1.0001KB")
    is refused, and so is a fraction like "0.9", which vLLM users mean as a share of the GPU."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise MoestreamError(f"{what} must not be negative (got {text})")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise MoestreamError(f"{what} {text!r} is not a size: use e.g. 40GiB, 40GB, 512MiB or plain bytes")
    number = Fraction(m.group(1))
    n = number * _SIZE_UNITS[unit]
    if n.denominator != 1:
        if unit in ("", "b") and number < 1:
            raise MoestreamError(f"{what} {str(text).strip()} looks like a fraction of the memory; budgets are bytes "
                                 "with a unit: use e.g. 40GiB or 512MiB")
        raise MoestreamError(f"{what} {str(text).strip()} is not a whole number of bytes: use bytes with a unit, "
                             "e.g. 40GiB, 1.5GiB or 512MiB")
    typed = f"{m.group(1)} {_UNIT_SPELLING[unit]}" if _UNIT_SPELLING[unit] else m.group(1)
    return Size(int(n), typed, None if unit in ("", "b") else "i" in unit)


def parse_count(text: str | int, what: str = "context size") -> int:
    """Tokens from "4096", "32k" (32,000), "32K" (32,768), "1M" (1,048,576), "1m" (1,000,000)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise MoestreamError(f"{what} must be positive (got {text})")
        return text
    m = re.match(r"^\s*(\d+(?:\.\d*)?)\s*([kKmM]?)\s*$", str(text), re.ASCII)
    if m is None:
        raise MoestreamError(f"{what} {text!r} is not a token count: use e.g. 4096, 32k, 128K or 1M")
    n = Fraction(m.group(1)) * _COUNT_UNITS[m.group(2)]
    if n.denominator != 1:
        raise MoestreamError(f"{what} {str(text).strip()} is not a whole number of tokens: use e.g. 4096, 32k or 128K")
    if n <= 0:
        raise MoestreamError(f"{what} must be positive (got {text!r})")
    return int(n)


_UNIT_SPELLING = {"": "", "b": "B", "k": "kB", "kb": "kB", "m": "MB", "mb": "MB", "g": "GB", "gb": "GB", "t": "TB",
                  "tb": "TB", "kib": "KiB", "mib": "MiB", "gib": "GiB", "tib": "TiB"}
_BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_DECIMAL_UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def fmt_size(n: int) -> str:
    """A budget the way it was most likely typed: 80GiB reads back as "80 GiB", 80GB as "80 GB",
    1.5GiB as "1.5 GiB" (a Size says it exactly; for other counts, a guess:). In each unit family the largest unit that holds n exactly to two decimals;
    of the two, the one with fewer decimals (then the larger unit). Else GiB-style, rounded."""
    if isinstance(n, Size) and n.binary is not None:
        return n.text
    best = None
    for family in (_BINARY_UNITS, _DECIMAL_UNITS):
        for unit, scale in family:
            if n >= scale and n * 100 % scale == 0:
                hundredths = n * 100 // scale
                text = f"{hundredths // 100}.{hundredths % 100:02d}".rstrip("0").rstrip(".")
                key = (len(text.partition(".")[2]), -scale)
                if best is None or key < best[0]:
                    best = (key, f"{text} {unit}")
                break
    return best[1] if best else fmt_in(n, binary=True)


def is_binary(n: int) -> bool:
    """Whether a budget was given in GiB-style units (or nothing exact): its figures are shown in the
    same family, so "--gpu-mem 72GB" is never compared with "70.37 GiB"."""
    if isinstance(n, Size) and n.binary is not None:
        return n.binary
    return fmt_size(n).endswith("iB") or fmt_size(n).endswith(" B")


def fmt_in(n: float, binary: bool, up: bool = False) -> str:
    """n bytes in one unit family, the unit by magnitude: "20.74 GiB" or "22.27 GB"; with up=True
    rounded up, so a minimum quoted back to the user is enough."""
    units = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if binary else (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))
    for unit, scale in units:
        if abs(n) >= scale:
            value = math.ceil(n / scale * 100) / 100 if up else n / scale
            return f"{value:.2f} {unit}"
    return f"{math.ceil(n) if up else int(n)} B"


def positive_number(value, what: str) -> float:
    """A positive finite float (a bandwidth, a time): nan, inf, 0 and negatives give one line."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise MoestreamError(f"{what} {value} is not a positive finite number")
    return x


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset / cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str):
    """torch is imported here, not at the top: `moestream --help` must not pay for it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoestreamError(f"device {device!r} is not a device: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoestreamError("device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return dev


DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "f16": "float16"}  # --dtype spelling -> torch dtype name


def resolve_dtype(dtype: str, device, checkpoint_dtype):
    """"auto" = the checkpoint's dtype on CUDA, float32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    import torch

    if dtype == "auto":
        return checkpoint_dtype if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MoestreamError(f"dtype {dtype!r} is not known: use auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPES[dtype])


CPU_EXPERTS = ("auto", "never", "always")
CACHE_POLICIES = ("lru", "lfu", "predictive")
CACHE_SPLITS = ("auto", "global", "per-layer")
DEFAULT_CTX = 8192  # the context when -c is not given (capped by the model's maximum)


KV_CACHE_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")


def _whole(value, what: str) -> int:
    if isinstance(value, bool):
        raise MoestreamError(f"{what} {value!r} is not a whole number")
    try:
        return int(str(value).strip())
    except ValueError:
        raise MoestreamError(f"{what} {value!r} is not a whole number") from None


def _positive(value, what: str) -> int:
    n = _whole(value, what)
    if n <= 0:
        raise MoestreamError(f"{what} must be positive (got {value})")
    return n


def _threads(value) -> int:
    """-t N: 0 = torch's default, else 1..the CPUs this process may use (more crashes torch)."""
    n, cpus = _whole(value, "-t/--threads"), usable_cpus()
    if not 0 <= n <= cpus:
        raise MoestreamError(f"-t/--threads {value} is out of range: this process may use {cpus} CPU"
                             f"{'s' if cpus > 1 else ''}, so use -t 1 to -t {cpus} (or 0 for torch's default)")
    return n


def _not_negative(value, what: str) -> int:
    n = _whole(value, what)
    if n < 0:
        raise MoestreamError(f"{what} must not be negative (got {value})")
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
        return cls(
            model=Path(path) if path else DEFAULT_MODEL,
            device=device,
            dtype=dtype,
            ctx_size=parse_count(ctx_size) if ctx_size and str(ctx_size) != "0" else 0,
            threads=_threads(threads),
            gpu_mem=size(gpu_mem, "--gpu-mem"),
            cpu_mem=size(cpu_mem, "--cpu-mem"),
            expert_cache=size(expert_cache, "--expert-cache"),
            cpu_experts=_choice(cpu_experts, CPU_EXPERTS, "--cpu-experts"),
            cache_policy=_choice(cache_policy, CACHE_POLICIES, "--cache-policy"),
            cache_split=_choice(cache_split, CACHE_SPLITS, "--cache-split"),
            prefetch=_not_negative(prefetch, "--prefetch"),
            cpu_moe=bool(cpu_moe),
            n_cpu_moe=_not_negative(n_cpu_moe, "--n-cpu-moe"),
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
