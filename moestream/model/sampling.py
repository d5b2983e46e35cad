"""Sampling settings: temperature, top-k, top-p, repetition penalty, seed, max tokens, end-of-turn.

Declared once (flags, help, parsers: moestream/config.py `setting`) and checked when made; the
token choice itself is in scheduler/generate.py. No torch here: `moestream --help` builds its options
from these declarations."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..config import build_settings, setting, settings_of
from ..errors import MoestreamError

SEED_MAX = 2**63 - 1
MIN_TEMPERATURE = 1e-6  # logits of |x| < 1e4 divided by it stay far inside float32's range
PENALTY_MIN, PENALTY_MAX = 0.01, 100.0  # beyond these, float32 logits divided or multiplied become 0 or inf


def typed_real(value, label: str):
    """Typed text to a float; anything else as given (the class checks it)."""
    if not isinstance(value, str):
        return value
    try:
        return float(value.strip())
    except ValueError:
        raise MoestreamError(f"{label} needs a number, not {shown(value.strip())}") from None


def typed_whole(value, label: str):
    if not isinstance(value, str):
        return value
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise MoestreamError(f"{label} needs a whole number, not {shown(value.strip())}") from None


def typed_seed(value, label: str):
    if isinstance(value, str) and value.strip().lower() in ("none", "random"):
        return None
    try:
        return typed_whole(value, label)
    except MoestreamError:
        raise MoestreamError(f"{label} needs a whole number or none, not {shown(value.strip())}") from None


def typed_bool(value, label: str):
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise MoestreamError(f"{label} needs true or false, not {shown(value.strip())}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, checked when made: every way they arrive (flags, `llm.generate` keywords,
    chat /set and /load) builds one, so a bad value is one line up front, never NaN logits later.
    Frozen, so a checked object stays checked (change one with dataclasses.replace, which re-checks)."""

    temperature: float = setting(0.8, "--temp", parse=typed_real, name="temperature", metavar="T",
                                 help="Sampling temperature (0 = greedy).")
    top_k: int = setting(40, "--top-k", parse=typed_whole, name="top-k", metavar="N", help="0 = off.")
    top_p: float = setting(0.95, "--top-p", parse=typed_real, name="top-p", metavar="P", help="In (0, 1]; 1.0 = off.")
    repetition_penalty: float = setting(1.0, "--repeat-penalty", parse=typed_real, name="repeat penalty", metavar="X",
                                        help=f"{PENALTY_MIN} to {PENALTY_MAX:g}; 1.0 = off; > 1 discourages tokens "
                                             "already in the sequence.")
    seed: int | None = setting(None, "-s", "--seed", parse=typed_seed, name="seed", metavar="N",
                               help="Random seed for reproducible sampling (0 to 2^63-1).")
    max_tokens: int = setting(256, "-n", "--n-predict", parse=typed_whole, name="max tokens", metavar="N",
                              help="Maximum tokens to generate (at least 1).")
    ignore_eos: bool = setting(False, "--ignore-eos", switch=True, parse=typed_bool, name="ignore-eos",
                               help="Keep generating past end-of-turn tokens (benchmarks, tests).")

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

    @classmethod
    def parse(cls, name: str, text: str):
        """A setting's value from what a person typed (a flag, /set), in the field's type; checked when
        the SamplingParams is made."""
        declared = {n: s for n, _, s in settings_of(cls)}
        if name not in declared:
            raise MoestreamError(f"{shown(name)} is not a sampling setting: use one of {', '.join(declared)}")
        return declared[name].parse(str(text), declared[name].label)

    @classmethod
    def build(cls, **values) -> SamplingParams:
        """Settings from typed text or values, e.g. build(temperature="0.7", seed=7); None = the default."""
        return build_settings(cls, values, "sampling setting")



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
