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
    """Buffers the model's routing and writes it as JSONL, off the per-layer path.

    The model's hook is `pending.append` (a builtin: no Python frame per layer): it appends
    (layer, experts [T, k], scores [T, k]) for each MoE layer step; the offload engine, when it
    predicts, appends the prefetcher's distance-1 guess for that layer right after (a set, or None).
    Steps are numbered and records paired with their guesses when they are formatted: at the end of
    each reply, or every LIMIT entries (the tensors may be on the GPU).
    """

    LIMIT = 16384

    def __init__(self, path: Path, meta: dict):
        try:
            self.file = open(path, "w", encoding="utf-8")
        except OSError as e:
            raise MoestreamError(f"cannot write the routing trace {path}: {e.strerror}") from None
        self.file.write(json.dumps({"format": FORMAT, **meta}) + "\n")
        self.step, self.last_layer = 0, None
        self.pending: list = []
        self.hook = self.pending.append
        self.first_layer = min(meta["moe_layers"]) if meta["moe_layers"] else 0

    def flush(self) -> None:
        """Format and write the buffered records."""
        records: list[list] = []  # [layer, experts, scores, guess]
        for item in self.pending:
            if isinstance(item, tuple):
                records.append([*item, None])
            elif records:  # the guess made for the record just before it
                records[-1][3] = item
        self.pending.clear()
        if not records:
            return
        # two bulk conversions instead of two per record: the tensors are tiny, the calls are not
        experts = torch.cat([r[1] for r in records]).tolist()  # [tokens of all records, k]
        scores = torch.cat([r[2] for r in records]).float().tolist()
        lines, pos = [], 0
        for layer, e, _, guess in records:
            if layer == self.first_layer and self.last_layer is not None:
                self.step += 1
            self.last_layer = layer
            tokens = len(e)
            rows = experts[pos:pos + tokens]
            vals = [[round(v, 5) for v in row] for row in scores[pos:pos + tokens]]
            pos += tokens
            predicted = f', "predicted": {sorted(guess)}' if guess is not None else ""
            lines.append(f'{{"step": {self.step}, "layer": {layer}, "experts": {rows}, "scores": {vals}{predicted}}}')
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

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
