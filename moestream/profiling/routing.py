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

from ..errors import MoestreamError
from ..files import make_directory, refuse_foreign

FORMAT = "moestream-routing/1"


def is_trace(path: Path) -> bool:
    """Whether `path` starts with a routing trace's header line (a file we may replace)."""
    with open(path, "rb") as f:
        return f.read(40).startswith(b'{"format": "' + FORMAT.encode())


class RoutingRecorder:
    """Buffers the model's routing and writes it as JSONL, off the per-layer path.

    The model's hook is `buffer.append` (a builtin: no Python frame per layer): it appends
    (layer, experts [T, k], scores [T, k]) for each MoE layer step; the offload engine, when it
    predicts, appends the prefetcher's distance-1 guess for that layer right after (a set, or None).
    Steps are numbered and records paired with their guesses when they are formatted: at the end of
    each reply, or every LIMIT entries (the tensors may be on the GPU).
    """

    LIMIT = 16384

    def __init__(self, path: Path, meta: dict):
        refuse_foreign(Path(path), is_trace, "a moestream routing trace", "choose another --record-routing FILE")
        try:
            make_directory(Path(path).parent)
            self.file = open(path, "w", encoding="utf-8")
        except OSError as e:
            raise MoestreamError(f"cannot write the routing trace {path}: {e.strerror}") from None
        self.file.write(json.dumps({"format": FORMAT, **meta}) + "\n")
        self.step, self.last_layer = 0, None
        self.buffer: list = []
        self.hook = self.buffer.append
        self.first_layer = min(meta["moe_layers"]) if meta["moe_layers"] else 0

    @property
    def full(self) -> bool:
        """Whether the buffer should be formatted now (bounded: its tensors may be on the GPU)."""
        return len(self.buffer) >= self.LIMIT

    def flush(self) -> None:
        """Format and write the buffered records (torch imported here: replaying a trace needs none)."""
        import torch

        records: list[list] = []  # [layer, experts, scores, guess]
        for item in self.buffer:
            if isinstance(item, tuple):
                records.append([*item, None])
            elif records:  # the guess made for the record just before it
                records[-1][3] = item
        self.buffer.clear()
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


def _whole(x, low: int = 0, high: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low and (high is None or x < high)


def check_header(meta) -> str | None:
    """What is wrong with a trace's first line, or None."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"its first line is not a {FORMAT} header"
    layers = meta.get("moe_layers")
    if not isinstance(layers, list) or not layers or not all(_whole(x) for x in layers) or len(set(layers)) != len(layers):
        return "its header's moe_layers is not a list of distinct layer numbers"
    for key in ("num_experts", "top_k", "expert_bytes"):
        if not _whole(meta.get(key), 1):
            return f"its header's {key} is not a positive whole number"
    return None


def check_record(r, meta: dict) -> str | None:
    """What is wrong with one routing record, or None (replay indexes every field it checks)."""
    if not isinstance(r, dict):
        return "is not a JSON object"
    if not _whole(r.get("step")):
        return "has no step number"
    if r.get("layer") not in meta["moe_layers"] or not _whole(r.get("layer")):
        return f"has layer {r.get('layer')!r}, not one of the header's moe_layers"
    experts = r.get("experts")
    if (not isinstance(experts, list) or not experts
            or not all(isinstance(row, list) and all(_whole(e, 0, meta["num_experts"]) for e in row) for row in experts)):
        return f"has experts that are not lists of expert numbers in 0..{meta['num_experts'] - 1}, one list per token"
    predicted = r.get("predicted", [])
    if not isinstance(predicted, list) or not all(_whole(e, 0, meta["num_experts"]) for e in predicted):
        return "has predicted experts that are not expert numbers"
    return None


def load_trace(path: str | Path) -> Trace:
    """A recorded trace, checked line by line: anything else is one line naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MoestreamError(f"cannot read routing trace {path}: {getattr(e, 'strerror', None) or e}") from None
    if not lines or not lines[0].strip():
        raise MoestreamError(f"{path} is empty, not a moestream routing trace: record one with --record-routing FILE")
    fix = "record the trace again with --record-routing FILE"
    try:
        meta = json.loads(lines[0])
    except ValueError:
        meta = None
    problem = check_header(meta)
    if problem:
        raise MoestreamError(f"{path} is not a moestream routing trace: {problem} (expected format {FORMAT}); {fix}")
    records = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise MoestreamError(f"{path} line {number} is not valid JSON (a truncated trace?); {fix}") from None
        problem = check_record(record, meta)
        if problem:
            raise MoestreamError(f"{path} line {number} {problem}; {fix}")
        records.append(record)
    if not records:
        raise MoestreamError(f"{path} holds a header but no routing records (the run processed no tokens); {fix}")
    return Trace(meta, records)
