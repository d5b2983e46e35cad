"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty, seed."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import MoestreamError

SEED_MAX = 2**63 - 1
MIN_TEMPERATURE = 1e-6  # logits of |x| < 1e4 divided by it stay far inside float32's range
PENALTY_MIN, PENALTY_MAX = 0.01, 100.0  # beyond these, float32 logits divided or multiplied become 0 or inf
KINDS = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float, "seed": int,
         "max_tokens": int, "ignore_eos": bool}
LABELS = {"temperature": "temperature", "top_k": "top-k", "top_p": "top-p", "repetition_penalty": "repeat penalty",
          "seed": "seed", "max_tokens": "max tokens", "ignore_eos": "ignore-eos"}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, checked when made: every way they arrive (flags, `llm.generate` keywords,
    chat /set and /load) builds one, so a bad value is one line up front, never NaN logits later.
    Frozen, so a checked object stays checked (change one with dataclasses.replace, which re-checks)."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the sequence
    seed: int | None = None
    max_tokens: int = 256
    ignore_eos: bool = False  # keep generating past end-of-turn tokens (benchmarks, tests)

    def __post_init__(self):
        t, k, p, r, s, n = (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed,
                            self.max_tokens)
        if not (number(t) and t >= 0):
            raise MoestreamError(f"temperature {shown(t)} must be a finite number >= 0 (0 = greedy), e.g. 0.8")
        if not (whole(k) and k >= 0):
            raise MoestreamError(f"top-k {shown(k)} must be a whole number >= 0 (0 = off), e.g. 40")
        if not (number(p) and 0 < p <= 1):
            raise MoestreamError(f"top-p {shown(p)} must be a number in (0, 1] (1 = off), e.g. 0.95")
        if not (number(r) and PENALTY_MIN <= r <= PENALTY_MAX):
            raise MoestreamError(f"repeat penalty {shown(r)} must be a number from {PENALTY_MIN} to {PENALTY_MAX:g} "
                                 "(1 = off), e.g. 1.1")
        if not (s is None or whole(s) and 0 <= s <= SEED_MAX):
            raise MoestreamError(f"seed {shown(s)} must be a whole number from 0 to 2^63-1 ({SEED_MAX}), or none")
        if not (whole(n) and n >= 1):
            raise MoestreamError(f"max tokens {shown(n)} must be a whole number >= 1, e.g. 256")
        if not isinstance(self.ignore_eos, bool):
            raise MoestreamError(f"ignore-eos {shown(self.ignore_eos)} must be true or false")

    @staticmethod
    def parse(name: str, text: str):
        """A setting's value from what a person typed (a flag, /set), in the field's type; checked when
        the SamplingParams is made."""
        if name not in KINDS:
            raise MoestreamError(f"{shown(name)} is not a sampling setting: use one of {', '.join(KINDS)}")
        kind, text, label = KINDS[name], str(text).strip(), LABELS[name]
        if kind is bool:
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
            raise MoestreamError(f"{label} needs true or false, not {shown(text)}")
        if name == "seed" and text.lower() in ("none", "random"):
            return None
        try:
            return float(text) if kind is float else int(text, 10)
        except ValueError:
            what = "a number" if kind is float else "a whole number" + (" or none" if name == "seed" else "")
            raise MoestreamError(f"{label} needs {what}, not {shown(text)}") from None

    @classmethod
    def from_text(cls, **values) -> SamplingParams:
        """Settings from typed text, e.g. from_text(temperature="0.7", seed="7"): strings are parsed, other
        values (None, a bool flag) taken as they are; settings not given keep their defaults."""
        return cls(**{name: cls.parse(name, v) if isinstance(v, str) else v for name, v in values.items()})


def number(v) -> bool:
    """A finite real number, not a bool (True is an int to Python, never a temperature to a person)."""
    try:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def shown(v) -> str:
    """A bad value as the one line shows it: short, whatever was passed."""
    try:
        text = repr(v)
    except ValueError:  # an int too long to print
        text = "(a very long number)"
    return text if len(text) <= 40 else text[:37] + "..."


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
    # a tiny temperature is near-greedy, not a division that overflows float32 into inf - inf = NaN
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    k = params.top_k if 0 < params.top_k < logits.shape[0] else logits.shape[0]
    # the k best, already sorted: top-p then only looks at them (cheap, whatever the vocabulary)
    top_logits, top_ids = torch.topk(logits, k)
    probs = torch.softmax(top_logits, dim=-1)
    if params.top_p < 1.0:
        # drop a token when the tokens ranked above it already cover top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs > params.top_p, 0.0)
    return int(top_ids[torch.multinomial(probs.cpu(), 1, generator=generator)])
