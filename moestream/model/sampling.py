"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty, seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the sequence
    seed: int | None = None
    max_tokens: int = 256
    ignore_eos: bool = False  # keep generating past end-of-turn tokens (benchmarks, tests)


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL/transformers rule: divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits.gather(0, previous)
    logits = logits.clone()
    logits.scatter_(0, previous, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor, generator: torch.Generator | None) -> int:
    """Choose one token id from logits [V] (float32)."""
    logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.temperature <= 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    k = params.top_k if 0 < params.top_k < logits.shape[0] else logits.shape[0]
    # the k best, already sorted: top-p then only looks at them (cheap, whatever the vocabulary)
    top_logits, top_ids = torch.topk(logits, k)
    probs = torch.softmax(top_logits, dim=-1)
    if params.top_p < 1.0:
        # drop a token when the tokens ranked above it already cover top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs > params.top_p, 0.0)
    return int(top_ids[torch.multinomial(probs.cpu(), 1, generator=generator)])
