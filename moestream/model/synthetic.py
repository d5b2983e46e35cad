"""SyntheticCheckpoint: a model with real Llama 4 shapes and random weights, no files needed.

For benchmarks on a GPU (`moestream bench --synthetic scout --layers 8`): the runtime reads it
through the same interface as a Checkpoint, so placement, offload and KV behave as with real
weights; only the numbers the model produces are meaningless. Weights are drawn per tensor from a
generator seeded by the tensor's name, so two runs see the same model.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from ..errors import MoestreamError
from .checkpoint import Checkpoint, CheckpointStats
from .config import ModelConfig
from .formats import ExpertFormat, ExpertWeights
from .presets import SYNTHETIC


class SyntheticCheckpoint:
    """Checkpoint's read interface over random tensors of a preset's shapes."""

    per_expert_keys = False

    def __init__(self, preset: str, layers: int | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        if preset not in SYNTHETIC:
            raise MoestreamError(f"--synthetic {preset!r} is not one of {', '.join(sorted(SYNTHETIC))}")
        raw = dict(SYNTHETIC[preset])
        if layers is not None:
            if layers < 1:
                raise MoestreamError("--layers must be at least 1")
            raw["num_hidden_layers"] = layers
        self.config = ModelConfig.from_dict(raw, source=f"synthetic {preset}")
        self.path = Path(f"synthetic-{preset}-{self.config.num_hidden_layers}L")
        self.dtype, self.seed = dtype, seed
        self.shapes = Checkpoint.expected_shapes_for(self.config)
        self.notes: list[str] = []
        self.expert_reads = 0
        self.expert_bytes_read = 0

    def reads_raw(self, fmt: ExpertFormat) -> bool:
        return False  # experts are drawn with torch ops

    @property
    def expert_dtype(self) -> torch.dtype:
        return self.dtype

    def _random(self, name: str, shape) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype)
        g = torch.Generator().manual_seed(self.seed ^ zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * 0.02).to(self.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._random(name, self.shapes[name])

    def read_expert(self, layer: int, e: int) -> ExpertWeights:
        D, F = self.config.hidden_size, self.config.intermediate_size
        self.expert_reads += 1
        self.expert_bytes_read += 3 * D * F * torch.empty((), dtype=self.dtype).element_size()
        f = f"model.layers.{layer}.feed_forward.experts.{e}."
        return ExpertWeights(self._random(f + "gate_up", (D, 2 * F)), self._random(f + "down", (F, D)))

    def read_expert_into(self, layer: int, e: int, out: torch.Tensor, fmt: ExpertFormat) -> None:
        fmt.pack(self.read_expert(layer, e), out)

    def snapshot(self) -> CheckpointStats:
        return CheckpointStats(self.expert_reads, self.expert_bytes_read)

    def fingerprint(self) -> str:
        return f"synthetic-{self.path.name}-{self.seed}"
