"""Routed-expert storage: where expert weights live when they are not on the compute device.

The MoE block calls `experts.prepare(layer, wanted, h)` once and then `experts.get(layer, e)` for
each expert its router picked, and nothing else; that is the only place the model knows experts
might not be resident. Each expert is packed into ONE contiguous buffer (gate_up then down), so
moving it between tiers is a single copy.

ExpertStore tiers: host RAM (pinned when CUDA is present) up to the plan's share, the rest in a
repacked file on disk (one aligned block per expert, so one expert is one sequential read) or, with
--no-repack, read straight from the checkpoint's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoestreamError
from ..model.checkpoint import Checkpoint

BLOCK_ALIGN = 4096  # disk blocks start on page boundaries (O_DIRECT-friendly, no straddled pages)


class PackedExpert:
    """One routed expert: buffer = [gate_up (D x 2F) | down (F x D)], x@W orientation."""

    __slots__ = ("buffer", "gate_up", "down")
    on_cpu = False  # runs where its buffer is (the compute device)

    def __init__(self, buffer: torch.Tensor, hidden: int, inter: int):
        self.buffer = buffer
        n = hidden * 2 * inter
        self.gate_up = buffer[:n].view(hidden, 2 * inter)
        self.down = buffer[n:].view(inter, hidden)

    @classmethod
    def pack(cls, gate_up: torch.Tensor, down: torch.Tensor, device, dtype) -> "PackedExpert":
        hidden, inter = down.shape[1], down.shape[0]
        buffer = torch.empty(gate_up.numel() + down.numel(), device=device, dtype=dtype)
        expert = cls(buffer, hidden, inter)
        expert.gate_up.copy_(gate_up)
        expert.down.copy_(down)
        return expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(x @ Wgate) * (x @ Wup))."""
        gate, up = (x @ self.gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class ResidentExperts:
    """Every expert on the compute device, each read from the checkpoint the first time it is used.

    The degenerate case of an expert cache whose budget holds all experts: after warm-up there are
    no copies at all. Reading on first use (not at load) keeps start-up fast and proves laziness.
    """

    def __init__(self, checkpoint: Checkpoint, device, dtype):
        self.checkpoint = checkpoint
        self.device, self.dtype = device, dtype
        self.experts: dict[tuple[int, int], PackedExpert] = {}
        self.gets = 0  # calls through the narrow interface

    def prepare(self, layer: int, wanted: list[int], h: torch.Tensor) -> list[int]:
        """Told every expert of a layer's step before any is computed; returns the order to compute
        them in. Nothing to plan when every expert is resident."""
        return wanted

    def get(self, layer: int, e: int) -> PackedExpert:
        self.gets += 1
        expert = self.experts.get((layer, e))
        if expert is None:
            gate_up, down = self.checkpoint.read_expert(layer, e)
            expert = self.experts[(layer, e)] = PackedExpert.pack(gate_up, down, self.device, self.dtype)
        return expert

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.experts.values())


class RepackedFile:
    """Disk tier: experts in one file, one BLOCK_ALIGN-aligned block each, described by a JSON sidecar.

    The sidecar is written last and names the checkpoint's fingerprint, so a file from an
    interrupted write or from other weights is never read: it is rebuilt.
    """

    FORMAT = "moestream-experts/1"

    def __init__(self, path: Path, keys: list[tuple[int, int]], numel: int, dtype: torch.dtype, fingerprint: str):
        self.path, self.meta_path = path, path.with_suffix(".json")
        self.keys, self.numel, self.dtype = keys, numel, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = numel * itemsize
        self.block = -(-self.nbytes // BLOCK_ALIGN) * BLOCK_ALIGN
        self.index = {key: i for i, key in enumerate(keys)}
        self.meta = {"format": self.FORMAT, "fingerprint": fingerprint, "dtype": str(dtype).removeprefix("torch."),
                     "numel": numel, "block": self.block, "keys": [list(k) for k in keys]}
        self.fd: int | None = None

    def valid(self) -> bool:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return False
        return meta == self.meta and self.path.exists() and self.path.stat().st_size == len(self.keys) * self.block

    def write(self, fill, staging: torch.Tensor, progress=None) -> None:
        """fill(key, buffer) loads one expert; each is written at its block, one at a time."""
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.meta_path.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                raw = staging.view(torch.uint8).numpy()
                for i, key in enumerate(self.keys):
                    fill(key, staging)
                    if os.pwrite(fd, raw[:self.nbytes], i * self.block) != self.nbytes:
                        raise OSError(28, "short write")
                    if progress:
                        progress(self.nbytes)
                os.ftruncate(fd, len(self.keys) * self.block)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self.meta_path.write_text(json.dumps(self.meta))
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            need = len(self.keys) * self.block
            raise MoestreamError(
                f"cannot write the expert file {self.path} ({e.strerror or e}): it needs {need / 2**30:.2f} GiB; "
                "free space there, point --expert-dir elsewhere, or raise --cpu-mem"
            ) from None

    def read_into(self, key: tuple[int, int], out: torch.Tensor) -> int:
        """One sequential read of one expert into a flat host buffer; returns bytes read."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out.view(torch.uint8).numpy())[:self.nbytes]
        if os.preadv(self.fd, [view], self.index[key] * self.block) != self.nbytes:
            raise MoestreamError(f"the expert file {self.path} is shorter than its index: delete it to rebuild")
        return self.nbytes


def default_expert_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moestream"


class ExpertStore:
    """Every routed expert of the model, packed, in host RAM up to `host_experts`, the rest on disk.

    Filling the host tier reads one expert at a time straight into its row of the (pinned) host
    buffer, so loading never holds two copies of the experts in RAM.
    """

    def __init__(self, checkpoint: Checkpoint, keys: list[tuple[int, int]], host_experts: int, dtype: torch.dtype,
                 pin: bool, expert_dir: Path | None, repack: bool = True, progress=None):
        c = checkpoint.config
        self.checkpoint, self.dtype = checkpoint, dtype
        self.hidden, self.inter = c.hidden_size, c.intermediate_size
        self.numel = c.expert_numel
        self.host_keys = keys[:host_experts]
        self.disk_keys = keys[host_experts:]
        self.host_index = {key: i for i, key in enumerate(self.host_keys)}
        self.host = torch.empty(len(self.host_keys), self.numel, dtype=dtype, pin_memory=pin)
        self.host_experts = [PackedExpert(self.host[i], self.hidden, self.inter) for i in range(len(self.host_keys))]
        for i, key in enumerate(self.host_keys):
            checkpoint.read_expert_into(*key, self.host[i])
            if progress:
                progress(self.host[i].numel() * self.host.element_size())
        self.file: RepackedFile | None = None
        if self.disk_keys and repack:
            name = f"{checkpoint.path.name}-{checkpoint.fingerprint()}-{str(dtype).removeprefix('torch.')}-{len(self.disk_keys)}"
            self.file = RepackedFile((expert_dir or default_expert_dir()) / f"{name}.experts", self.disk_keys,
                                     self.numel, dtype, checkpoint.fingerprint())
            if not self.file.valid():
                staging = torch.empty(self.numel, dtype=dtype)
                self.file.write(lambda key, buf: checkpoint.read_expert_into(*key, buf), staging, progress)

    def tier(self, key: tuple[int, int]) -> str:
        return "host" if key in self.host_index else "disk"

    def host_expert(self, key: tuple[int, int]) -> PackedExpert:
        return self.host_experts[self.host_index[key]]

    @property
    def reads_with_torch(self) -> bool:
        """Disk reads that convert or gather with torch ops (straight from a checkpoint whose layout or
        dtype differs from the store's): they must run on the compute thread, because torch ops on
        another thread start a second OpenMP team whose spinning threads take the cores from compute."""
        return bool(self.disk_keys) and self.file is None and not self.checkpoint.reads_raw(self.dtype)

    def read_into(self, key: tuple[int, int], out: torch.Tensor) -> int:
        """Bring a disk-tier expert into a flat host buffer (the repacked file, or the checkpoint)."""
        if self.file is not None:
            return self.file.read_into(key, out)
        self.checkpoint.read_expert_into(*key, out)
        return self.numel * out.element_size()

    @property
    def host_bytes(self) -> int:
        return self.host.numel() * self.host.element_size()
