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


@dataclass
class RuntimeConfig:
    model: Path = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    ctx_size: int = 0  # tokens; 0 = the model's max_position_embeddings
    threads: int = 0  # CPU threads for torch; 0 = torch's default

    @classmethod
    def build(cls, path=None, device="auto", dtype="auto", ctx_size=0, threads=0) -> "RuntimeConfig":
        return cls(
            model=Path(path) if path else DEFAULT_MODEL,
            device=device,
            dtype=dtype,
            ctx_size=parse_count(ctx_size) if ctx_size else 0,
            threads=int(threads or 0),
        )
