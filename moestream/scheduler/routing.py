"""Routing traces: every token's (layer, experts, scores), written as JSONL, read back for replay.

Format (one JSON object per line, no pickle):
  line 1:  {"format": "moestream-routing/1", "model": NAME, "moe_layers": [...], "num_experts": E,
            "top_k": K, "expert_bytes": BYTES}
  then:    {"step": S, "layer": L, "experts": [[e, ...] per token], "scores": [[s, ...] per token],
            "predicted": [e, ...]}   <- the prefetcher's guess for this layer one MoE layer earlier
                                        (present when the run had a prefetcher)
A step is one forward pass (a whole prompt chunk, or one decoded token); records of a step come in
layer order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoestreamError

FORMAT = "moestream-routing/1"


class RoutingRecorder:
    """The model's on_route hook, appending records to a JSONL file."""

    def __init__(self, path: Path, meta: dict):
        try:
            self.file = open(path, "w", encoding="utf-8")
        except OSError as e:
            raise MoestreamError(f"cannot write the routing trace {path}: {e.strerror}") from None
        self.file.write(json.dumps({"format": FORMAT, **meta}) + "\n")
        self.step, self.last_layer = 0, None
        self.guesses: dict = {}  # layer -> the prefetcher's distance-1 guess for it (its live dict, when there is one)
        self.pending: list[tuple] = []
        self.first_layer = min(meta["moe_layers"]) if meta["moe_layers"] else 0

    def __call__(self, layer: int, experts: torch.Tensor, scores: torch.Tensor) -> None:
        if layer == self.first_layer and self.last_layer is not None:
            self.step += 1
        self.last_layer = layer
        guess = self.guesses.get(layer)
        # keep the (tiny) tensors as they are: converting them is left to flush, off the token path
        self.pending.append((self.step, layer, experts, scores, guess))
        if len(self.pending) >= 8192:  # formatting waits for the end of the reply, or this bound (tensors may be on the GPU)
            self.flush()

    def flush(self) -> None:
        """Format and write the buffered records (kept off the per-layer path)."""
        if not self.pending:
            return
        # two bulk conversions instead of two per record: the tensors are tiny, the calls are not
        experts = torch.cat([p[2] for p in self.pending]).tolist()  # [tokens of all records, k]
        scores = torch.cat([p[3] for p in self.pending]).float().tolist()
        lines, pos = [], 0
        for step, layer, e, _, guess in self.pending:
            tokens = len(e)
            rows = experts[pos:pos + tokens]
            vals = [[round(v, 5) for v in row] for row in scores[pos:pos + tokens]]
            pos += tokens
            predicted = f', "predicted": {sorted(guess)}' if guess is not None else ""
            lines.append(f'{{"step": {step}, "layer": {layer}, "experts": {rows}, "scores": {vals}{predicted}}}')
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.file.close()


@dataclass
class Trace:
    meta: dict
    records: list[dict]

    @property
    def tokens(self) -> int:
        """Tokens processed: the token count of each step, taken at its first layer."""
        first = min(self.meta["moe_layers"])
        return sum(len(r["experts"]) for r in self.records if r["layer"] == first)

    def accesses(self) -> list[tuple[int, int]]:
        """The expert-cache access sequence: each step's distinct experts per layer, in order of use."""
        out = []
        for r in self.records:
            seen = dict.fromkeys(e for row in r["experts"] for e in row)
            out += [(r["layer"], e) for e in seen]
        return out


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        meta = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, IndexError, ValueError, UnicodeDecodeError) as e:
        raise MoestreamError(f"cannot read routing trace {path}: {getattr(e, 'strerror', None) or e}") from None
    if meta.get("format") != FORMAT:
        raise MoestreamError(f"{path} is not a moestream routing trace (expected format {FORMAT})")
    return Trace(meta, records)
