"""KVCache: per-layer keys and values for incremental decoding.

Llama 4 has two kinds of attention layer, and their caches differ in size by orders of magnitude:
- RoPE layers attend only inside their own `attention_chunk_size`-aligned chunk, so `ChunkKV` keeps
  at most one chunk: when a token opens a new chunk, the old keys can never be seen again.
- NoPE layers attend globally, so `GlobalKV` keeps every token (grown geometrically).

Attention asks a layer's cache for "the keys my new queries may see" via `extend`, which stores the
new keys and returns the visible keys and the absolute position of the first one (they are
consecutive); the mask is built from positions, so the model never needs to know which cache it
talks to.
"""

from __future__ import annotations

import torch


class ChunkKV:
    """Keys/values of the current chunk only: a fixed buffer of `chunk` slots."""

    def __init__(self, chunk: int, kv_heads: int, head_dim: int, device, dtype):
        self.chunk = chunk
        self.k = torch.empty(chunk, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.start = 0  # absolute position of slot 0
        self.n = 0  # filled slots

    def extend(self, k: torch.Tensor, v: torch.Tensor, pos0: int):
        """Store k/v [T, Hkv, hd] at positions pos0.. and return (keys, values, first key position)."""
        T, C = k.shape[0], self.chunk
        if pos0 // C != self.start // C or self.n == 0:
            self.start, self.n = (pos0 // C) * C, 0  # a new chunk: the old one is out of sight
        assert pos0 == self.start + self.n, "KV cache fed out of order"
        if self.n + T <= C:  # the common case (decode): write in place, return views
            self.k[self.n:self.n + T] = k
            self.v[self.n:self.n + T] = v
            self.n += T
            return self.k[:self.n], self.v[:self.n], self.start
        # A multi-token step that crosses chunk boundaries: attend over old + new, keep the last chunk.
        keys = torch.cat([self.k[:self.n], k])
        values = torch.cat([self.v[:self.n], v])
        first = self.start
        last_start = ((pos0 + T - 1) // C) * C
        keep = last_start - self.start
        self.n = keys.shape[0] - keep
        self.k[:self.n] = keys[keep:]
        self.v[:self.n] = values[keep:]
        self.start = last_start
        return keys, values, first

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class GlobalKV:
    """Every token's keys/values, in a buffer grown by doubling (amortised O(1) appends)."""

    def __init__(self, kv_heads: int, head_dim: int, device, dtype, capacity: int = 256):
        self.k = torch.empty(capacity, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.n = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor, pos0: int):
        assert pos0 == self.n, "KV cache fed out of order"
        T = k.shape[0]
        if self.n + T > self.k.shape[0]:
            cap = max(2 * self.k.shape[0], self.n + T)
            self.k = _grow(self.k, self.n, cap)
            self.v = _grow(self.v, self.n, cap)
        self.k[self.n:self.n + T] = k
        self.v[self.n:self.n + T] = v
        self.n += T
        return self.k[:self.n], self.v[:self.n], 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _grow(buf: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
    out = torch.empty((capacity, *buf.shape[1:]), device=buf.device, dtype=buf.dtype)
    out[:n] = buf[:n]
    return out


class KVCache:
    """One cache per layer plus the number of tokens already processed."""

    def __init__(self, config, device, dtype):
        self.layers = [
            ChunkKV(config.attention_chunk_size, config.num_key_value_heads, config.head_dim, device, dtype)
            if config.uses_rope(i)
            else GlobalKV(config.num_key_value_heads, config.head_dim, device, dtype)
            for i in range(config.num_hidden_layers)
        ]
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
