"""Host memory for the weights a decode step streams: on 2 MiB pages where Linux gives them.

A decoded token reads every resident weight once, and through 4 KiB pages two Scout layers (1.3 GB)
are 330,000 page translations a token: the walks cost about a tenth of a one-row product's bandwidth
(Scout's matrices at 2 threads on the EPYC VM: 24 GB/s on 4 KiB pages, 27 on 2 MiB ones). llama.cpp
gets them from the page cache of its mmapped GGUF. Linux's transparent huge pages back a range
marked MADV_HUGEPAGE on its first touch (the distributions' default setting, `madvise`), so a weight
is allocated untouched, marked, then filled. Where the kernel gives none (THP `never`, not Linux)
this is plain memory and nothing else changes: the bytes and the numbers are the same either way.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import torch

PAGE = 2 << 20
MIN_BYTES = 4 * PAGE  # smaller tensors have few pages to translate
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise, or None where there are no transparent huge pages to ask for."""
    if platform.system() != "Linux":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty; on the CPU its whole 2 MiB pages marked for huge pages before anything touches them
    (torch aligns to 64 bytes, so up to a page at either end stays small)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    madvise = _madvise()
    if madvise is not None and t.device.type == "cpu" and t.nbytes >= MIN_BYTES:
        start, end = -(-t.data_ptr() // PAGE) * PAGE, (t.data_ptr() + t.nbytes) // PAGE * PAGE
        madvise(start, end - start, MADV_HUGEPAGE)  # advice: a refusal leaves plain pages, the same bytes
    return t


def streamed(t: torch.Tensor) -> torch.Tensor:
    """t's values in memory from `empty` (t itself if it is small, not on the CPU, or no huge pages)."""
    if t.device.type != "cpu" or t.nbytes < MIN_BYTES or _madvise() is None:
        return t
    return empty(t.shape, t.dtype).copy_(t)
