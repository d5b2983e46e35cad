"""Attention arithmetic shared by the model and the KV cache tiers.

Keys may live in several places (a device window, host RAM, a disk file). Softmax attention over
the union of key sets can be computed part by part and merged exactly: each part returns its
normalised output and the log-sum-exp of its scores, and the parts are re-weighted by
exp(lse_part - lse_total). So a tier can be attended where it lies and only [T, H] numbers move.

Shapes: q [T, H, hd]; k, v [S, Hkv, hd] with H a multiple of Hkv (grouped-query attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean mask [Tq, Tk]: causal, and within the same aligned chunk when `chunk` is given."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if chunk is not None:
        mask &= (k_pos[None, :] // chunk) == (q_pos[:, None] // chunk)
    return mask


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token over all its visible keys, GQA by grouping heads: q [H, hd] -> [1, H*hd].

    Three small kernels; cheaper than the general SDPA path when there is nothing to mask.
    """
    H, hd = q.shape
    kv_heads = k.shape[1]
    q = q.view(kv_heads, H // kv_heads, hd)  # query heads grouped under their shared KV head
    scores = (q @ k.permute(1, 2, 0)) * hd**-0.5  # [Hkv, group, S]
    return (scores.softmax(-1) @ v.transpose(0, 1)).reshape(1, H * hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_first: int,
           chunk: int | None) -> torch.Tensor:
    """Causal (optionally chunk-local) attention of q over consecutive keys from position k_first."""
    T = q.shape[0]
    if T == 1:  # a single new token sees every key a cache hands it
        return decode_attention(q[0], k, v)
    k_pos = torch.arange(k_first, k_first + k.shape[0], device=k.device)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=visibility(q_pos, k_pos, chunk), enable_gqa=True)
    return out.transpose(0, 1).reshape(T, -1)


def attention_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Attention of q over one part of the keys, in float32: (output [T, H, hd], log-sum-exp [T, H])."""
    T, H, hd = q.shape
    kv_heads = k.shape[1]
    g = H // kv_heads
    qg = q.float().view(T, kv_heads, g, hd).permute(1, 2, 0, 3)  # [Hkv, g, T, hd]
    scores = (qg @ k.float().permute(1, 2, 0)[:, None]) * hd**-0.5  # [Hkv, g, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, g, T]
    out = torch.exp(scores - lse[..., None]) @ v.float().transpose(0, 1)[:, None]  # [Hkv, g, T, hd]
    return out.permute(2, 0, 1, 3).reshape(T, H, hd), lse.permute(2, 0, 1).reshape(T, H)


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax attention over the union of the parts' keys: [T, H, hd] float32."""
    lse = torch.stack([p[1] for p in parts])  # [P, T, H]
    weights = torch.exp(lse - torch.logsumexp(lse, dim=0))
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))
