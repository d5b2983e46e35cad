"""Weights on huge pages (moestream/memory.py): the same bytes, only the pages asked for change."""

import torch

from moestream import memory


def test_large_weights_ask_for_huge_pages_over_their_whole_pages(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)))
    t = memory.empty((memory.MIN_BYTES // 2 + 5, 2), torch.bfloat16)
    assert t.shape == (memory.MIN_BYTES // 2 + 5, 2) and t.dtype == torch.bfloat16
    (start, length, advice), = calls
    assert advice == memory.MADV_HUGEPAGE and start % memory.PAGE == 0 and length % memory.PAGE == 0
    assert t.data_ptr() <= start and start + length <= t.data_ptr() + t.nbytes  # inside it, never beyond
    assert length >= t.nbytes - 2 * memory.PAGE
    memory.empty(memory.MIN_BYTES - 1, torch.uint8)  # small: plain pages
    assert len(calls) == 1


def test_streamed_copies_values_and_leaves_small_or_unadvisable_tensors(monkeypatch):
    w = torch.randn(memory.MIN_BYTES // 4 + 3)
    small = torch.randn(10)
    assert memory.streamed(small) is small
    monkeypatch.setattr(memory, "_madvise", lambda: None)  # THP `never`, or not Linux
    assert memory.streamed(w) is w
    monkeypatch.setattr(memory, "_madvise", lambda: lambda *a: 0)
    moved = memory.streamed(w)
    assert moved is not w and moved.data_ptr() != w.data_ptr() and torch.equal(moved, w)


def test_the_probe_answers_on_this_machine():
    """Linux with THP not `never`: libc's madvise; anything else: None (plain memory)."""
    memory._madvise.cache_clear()
    try:
        fn = memory._madvise()
        assert fn is None or callable(fn)
        memory.empty(memory.MIN_BYTES, torch.uint8).fill_(1)  # whatever the kernel says, the memory works
    finally:
        memory._madvise.cache_clear()
