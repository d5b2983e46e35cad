"""Sizes and counts as people type them, and bytes as people read them: the one parser every
command uses, and the formatting that echoes a budget back in the units it was typed in.

Sizes: "40GiB" (x2^30), "40GB" (x10^9), "512MiB", "1.5GiB", plain bytes; exact arithmetic, so a value
that is not a whole number of bytes is refused, and a fraction ("0.9") is named for what it is.
Counts (context lengths): "32k" = 32,000, "32K" = 32,768, "1M" = 1,048,576, as in vLLM (lowercase =
powers of 1000, uppercase = powers of 1024).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from .errors import MoestreamError

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


def fmt_bytes(n: float, up: bool = False) -> str:
    """"1.50 GiB"; with up=True rounded up, so a minimum quoted back to the user is enough."""
    return fmt_in(n, binary=True, up=up)
