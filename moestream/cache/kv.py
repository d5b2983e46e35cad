"""KVCache: per-layer keys and values, chunk-aware and tiered, so context is bounded by host memory.

Llama 4 has two kinds of attention layer, and their caches differ by orders of magnitude:
- RoPE layers attend only inside their own `attention_chunk_size`-aligned chunk, so `ChunkKV` keeps
  at most one chunk, always on the compute device: when a token opens a new chunk, the old keys
  can never be seen again.
- NoPE layers attend globally, so `GlobalKV` keeps every token: the newest in a hot window on the
  device, older fixed-size blocks spilled to host RAM (pinned with CUDA) and, past the host budget,
  to a disk file. Attention runs over each tier where it lies (or streamed to the device, whichever
  measured faster) and the parts are merged exactly by log-sum-exp (model/attention.py).

Storage types (-ctk/-ctv): f32, f16, bf16, or q8_0 = int8 with one float scale per (token, head),
which halves bf16 KV; spilled blocks keep their type, so they move and rest at that size.

Attention asks a layer's cache `attend(q, k_new, v_new, pos0, q_pos)`: the cache stores the new
keys and returns the attention output; the model never sees tiers.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MoestreamError
from ..files import describe_os_error, lock_open_file, make_directory
from ..model import native
from ..model.attention import attend, attention_part, merge_parts
from ..profiling.recorder import NULL

KV_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.int8}


def kv_type_for(dtype: torch.dtype) -> str:
    """-ctk/-ctv auto: the compute dtype's KV type."""
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]


def kv_type_bytes(kv_type: str, head_dim: int) -> float:
    """Bytes per (token, head) of one of K or V."""
    return head_dim + 4 if kv_type == "q8_0" else head_dim * torch.empty((), dtype=KV_TYPES[kv_type]).element_size()


class KVArray:
    """Keys or values of up to `capacity` tokens in one storage type, on one device."""

    def __init__(self, capacity: int, heads: int, head_dim: int, kv_type: str, device, pin: bool = False):
        self.kv_type, self.quant = kv_type, kv_type == "q8_0"
        self.heads, self.head_dim, self.device, self.pin = heads, head_dim, torch.device(device), pin
        self.data = torch.empty(capacity, heads, head_dim, dtype=KV_TYPES[kv_type], device=device, pin_memory=pin)
        self.scale = torch.empty(capacity, heads, device=device, pin_memory=pin) if self.quant else None

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * 4 if self.quant else 0)

    def write(self, i: int, x: torch.Tensor) -> None:
        """Store x [T, heads, hd] (compute dtype) at token slots i..i+T."""
        T = x.shape[0]
        if self.quant:
            scale = x.float().abs().amax(-1).clamp(min=1e-12) / 127.0
            self.data[i:i + T] = torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
            self.scale[i:i + T] = scale
        else:
            self.data[i:i + T] = x

    def read(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Slots a..b in the compute dtype (a view when no conversion is needed)."""
        if self.quant:
            return (self.data[a:b].float() * self.scale[a:b, :, None]).to(dtype)
        x = self.data[a:b]
        return x if x.dtype == dtype else x.to(dtype)

    def parts(self, a: int, b: int) -> list[torch.Tensor]:
        """The stored tensors of slots a..b, format preserved (what a spill moves)."""
        return [self.data[a:b]] + ([self.scale[a:b]] if self.quant else [])

    def put(self, i: int, parts: list[torch.Tensor]) -> None:
        n = parts[0].shape[0]
        self.data[i:i + n].copy_(parts[0], non_blocking=self.pin)
        if self.quant:
            self.scale[i:i + n].copy_(parts[1], non_blocking=self.pin)

    def drop_front(self, n: int, used: int) -> None:
        """Forget slots 0..n, moving slots n..used to the front."""
        self.data[:used - n] = self.data[n:used].clone()
        if self.quant:
            self.scale[:used - n] = self.scale[n:used].clone()

    def grown(self, capacity: int, used: int) -> "KVArray":
        out = KVArray(capacity, self.heads, self.head_dim, self.kv_type, self.device, self.pin)
        out.put(0, self.parts(0, used))
        return out


class KVPair:
    """Keys and values side by side (their types may differ: -ctk / -ctv)."""

    def __init__(self, capacity, heads, head_dim, k_type, v_type, device, pin=False):
        self.k = KVArray(capacity, heads, head_dim, k_type, device, pin)
        self.v = KVArray(capacity, heads, head_dim, v_type, device, pin)

    @property
    def capacity(self) -> int:
        return self.k.capacity

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, i, k, v):
        self.k.write(i, k)
        self.v.write(i, v)

    def read(self, a, b, dtype):
        return self.k.read(a, b, dtype), self.v.read(a, b, dtype)

    def parts(self, a, b):
        return self.k.parts(a, b) + self.v.parts(a, b)

    def put(self, i, parts):
        nk = 2 if self.k.quant else 1
        self.k.put(i, parts[:nk])
        self.v.put(i, parts[nk:])

    def drop_front(self, n, used):
        self.k.drop_front(n, used)
        self.v.drop_front(n, used)

    def grown(self, capacity, used) -> "KVPair":
        out = KVPair.__new__(KVPair)
        out.k, out.v = self.k.grown(capacity, used), self.v.grown(capacity, used)
        return out


@dataclass
class KVLayout:
    """How the KV cache is stored; built from the flags by the planner."""

    k_type: str  # f32 | f16 | bf16 | q8_0
    v_type: str
    block: int = 256  # tokens per spilled block
    hot_tokens: int | None = None  # per global layer on the device; None = all tokens stay on the device
    host_tokens: int | None = None  # per global layer in host RAM; None = no limit
    disk: Path | None = None  # spill file beyond the host budget
    max_tokens: int = 1 << 62


@dataclass
class KVCounters:
    spilled_to_host_bytes: int = 0
    spilled_to_disk_bytes: int = 0
    fetched_to_device_bytes: int = 0  # host blocks streamed to the device for attention
    read_from_disk_bytes: int = 0
    seconds: dict = field(default_factory=lambda: {"device": 0.0, "host": 0.0, "disk": 0.0})
    host_on_cpu: bool | None = None  # measured choice for host-resident blocks on CUDA
    host_trials: dict = field(default_factory=dict)  # on_cpu -> seconds per token, measured


@dataclass
class KVStats:
    """A conversation's KV cache: one group of llm.stats() (tokens per tier: of one global layer)."""

    tokens: int = 0  # positions processed
    tokens_device: int = 0
    tokens_host: int = 0
    tokens_disk: int = 0
    device_bytes: int = 0
    host_bytes: int = 0
    spilled_to_host_bytes: int = 0
    spilled_to_disk_bytes: int = 0
    fetched_to_device_bytes: int = 0  # host blocks streamed to the device for attention
    read_from_disk_bytes: int = 0
    attention_seconds: dict = field(default_factory=dict)  # tier -> seconds of attention over it


class KVDisk:
    """The disk tier: one file of moestream's own, held by one process, emptied for every conversation.

    Nothing lost: the file is created exclusively (with HEADER at offset 0), or reused only when it
    starts with MAGIC (a run that died holding it); any other file at the path is refused and left
    byte-identical. Nothing leaked: an exclusive lock keeps a second process out, every conversation
    starts from an empty file (reset), and the file, 0600, is removed when the owner closes it or
    the interpreter exits (weakref.finalize).

    `stage` is one host buffer, shared by the global layers (they attend one after another), into
    which a layer's disk blocks are read up to STAGE_BYTES at a time, so attention over them is one
    call per pass rather than one per block."""

    STAGE_BYTES = 64 * 2**20
    MAGIC = b"moestream-kv/1\n"
    HEADER = MAGIC.ljust(4096, b"\0")  # blocks start on a page boundary

    def __init__(self, path: Path):
        self.stage: KVPair | None = None
        self.path = Path(path).expanduser()
        fd, created = None, False
        try:
            make_directory(self.path.parent)
            fd, created = self._open()
            lock_open_file(fd, self.path, f"the KV disk file {self.path}", "point --kv-disk at another file")
            if created:
                if os.pwrite(fd, self.HEADER, 0) != len(self.HEADER):
                    raise OSError(errno.ENOSPC, "No space left on device")
            elif os.pread(fd, len(self.MAGIC), 0) != self.MAGIC:
                raise MoestreamError(
                    f"{self.path} exists and is not a moestream KV file; moestream never overwrites a file it did not "
                    "write: point --kv-disk at a new file name"
                )
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, len(self.HEADER))
        except BaseException as e:
            if fd is not None:
                if created:  # ours and empty: nothing to keep
                    _remove_kv_file(self.path, fd, _identity(fd))
                else:
                    os.close(fd)
            if isinstance(e, OSError):
                raise MoestreamError(
                    f"cannot open the KV disk file {self.path}: {describe_os_error(e)}; point --kv-disk elsewhere"
                ) from None
            raise
        self.fd, self.end = fd, len(self.HEADER)
        self._remove = weakref.finalize(self, _remove_kv_file, self.path, fd, _identity(fd))

    def _open(self) -> tuple[int, bool]:
        """(fd, created): a new file made exclusively, or the regular file already there (its header
        is checked by the caller once it holds the lock: the holder may be writing it)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), True
        except FileExistsError:
            pass
        if not stat.S_ISREG(os.lstat(self.path).st_mode):
            raise MoestreamError(f"{self.path} exists and is not a regular file: point --kv-disk at a new file name")
        return os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), False

    def reset(self) -> None:
        """Forget every block: a new conversation never reads an earlier one's keys."""
        try:
            os.ftruncate(self.fd, len(self.HEADER))
        except OSError as e:
            raise MoestreamError(f"cannot empty the KV disk file {self.path}: {describe_os_error(e)}; "
                                 "point --kv-disk elsewhere") from None
        self.end = len(self.HEADER)

    def close(self) -> None:
        """Remove the file (it holds a conversation) and let go of it."""
        self._remove()

    def write(self, parts: list[torch.Tensor]) -> tuple[int, int]:
        """Append one block's tensors; returns (offset, bytes)."""
        offset = self.end
        for t in parts:
            raw = t.detach().cpu().contiguous().view(torch.uint8).numpy()
            try:
                if os.pwrite(self.fd, raw, self.end) != raw.nbytes:
                    raise OSError(28, "No space left on device")
            except OSError as e:
                raise MoestreamError(
                    f"cannot write the KV disk file {self.path} ({e.strerror}): free space there, point --kv-disk "
                    "elsewhere, or use a smaller -c; the conversation is kept"
                ) from None
            self.end += raw.nbytes
        return offset, self.end - offset

    def read_into(self, offset: int, parts: list[torch.Tensor]) -> int:
        pos = offset
        for t in parts:
            view = memoryview(t.view(torch.uint8).numpy())
            if os.preadv(self.fd, [view], pos) != view.nbytes:
                raise MoestreamError(f"the KV disk file {self.path} was truncated under us: start the conversation again")
            pos += view.nbytes
        return pos - offset


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _remove_kv_file(path: Path, fd: int, identity: tuple[int, int]) -> None:
    """Unlink `path` if it still names our file (still locked, so no other process adopts it), then close."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


class ChunkKV:
    """Keys/values of the current chunk only: a fixed buffer of `chunk` slots on the device."""

    def __init__(self, chunk: int, kv_heads: int, head_dim: int, device, dtype, layout: KVLayout, rec=NULL):
        self.chunk, self.dtype = chunk, dtype
        self.store = KVPair(chunk, kv_heads, head_dim, layout.k_type, layout.v_type, device)
        self.rec = rec
        self.start = 0  # absolute position of slot 0
        self.n = 0  # filled slots

    def attend(self, q, k, v, pos0: int, q_pos) -> torch.Tensor:
        """Store k/v [T, Hkv, hd] at positions pos0.. and attend q over the chunk-visible keys."""
        T, C = k.shape[0], self.chunk
        if pos0 // C != self.start // C or self.n == 0:
            self.start, self.n = (pos0 // C) * C, 0  # a new chunk: the old one is out of sight
        assert pos0 == self.start + self.n, "KV cache fed out of order"
        if T == 1 and self.n < C and native.plain(q, k, v, self.store.k.data, self.store.v.data):
            self.n += 1  # decode, float32 slots on the CPU: store and attend in one C call
            return native.append_attention(q, k, v, self.store.k.data, self.store.v.data, self.n - 1)
        if self.n + T <= C:  # the common case (decode): store, then attend over the chunk so far
            self.store.write(self.n, k, v)
            self.n += T
            keys, values = self.store.read(0, self.n, self.dtype)
            return attend(q, keys, values, q_pos, self.start, C)
        # A multi-token step that crosses chunk boundaries: attend over old + new, keep the last chunk.
        old_k, old_v = self.store.read(0, self.n, self.dtype)
        keys, values = torch.cat([old_k, k]), torch.cat([old_v, v])
        first = self.start
        out = attend(q, keys, values, q_pos, first, C)
        last_start = ((pos0 + T - 1) // C) * C
        keep = last_start - first
        self.n = keys.shape[0] - keep
        self.store.write(0, keys[keep:], values[keep:])
        self.start = last_start
        return out

    @property
    def nbytes(self) -> int:
        return self.store.nbytes


class GlobalKV:
    """Every token's keys/values: a hot window on the device, older blocks on host RAM, then disk."""

    def __init__(self, layer: int, kv_heads: int, head_dim: int, device, dtype, layout: KVLayout, rec,
                 disk: KVDisk | None, counters: KVCounters):
        self.layer, self.device, self.dtype, self.layout = layer, torch.device(device), dtype, layout
        self.heads, self.head_dim = kv_heads, head_dim
        self.disk, self.counters = disk, counters
        self.rec = rec
        self.pin = self.device.type == "cuda"
        first = min(layout.max_tokens, layout.hot_tokens or 256, 256)
        self.hot = KVPair(max(first, 1), kv_heads, head_dim, layout.k_type, layout.v_type, device)
        self.n_hot = 0
        self.host: KVPair | None = None
        self.n_host = 0
        self.disk_blocks: list[int] = []  # offsets of this layer's blocks in the disk file, oldest first
        self.n = 0  # tokens stored in all tiers

    # --- placement ---------------------------------------------------------------------------------
    def _spill_block(self) -> None:
        with self.rec.span("kv spill", layer=self.layer, tokens=self.layout.block):
            self._spill()

    def _spill(self) -> None:
        """Move the oldest hot block to host RAM (and the oldest host block to disk if host is full);
        with no room for a single block in host RAM, the hot block goes straight to disk."""
        B, lay = self.layout.block, self.layout
        if lay.host_tokens is not None and self.n_host + B > lay.host_tokens:
            if self.disk is None:
                raise MoestreamError("the KV cache is full: raise --kv-cpu-mem, add --kv-disk PATH, or use a smaller -c")
            straight = self.n_host == 0  # --kv-cpu-mem below one block
            self._to_disk(self.hot.parts(0, B) if straight else self.host.parts(0, B))
            if straight:
                self.hot.drop_front(B, self.n_hot)
                self.n_hot -= B
                return
            self.host.drop_front(B, self.n_host)
            self.n_host -= B
        if self.host is None or self.n_host + B > self.host.capacity:
            cap = max(B, 2 * (self.host.capacity if self.host else B))
            if lay.host_tokens is not None:
                cap = min(cap, max(B, lay.host_tokens))
            if self.host is None:
                self.host = KVPair(cap, self.heads, self.head_dim, lay.k_type, lay.v_type, "cpu", self.pin)
            else:
                self.host = self.host.grown(cap, self.n_host)
        parts = self.hot.parts(0, B)
        self.host.put(self.n_host, parts)
        if self.pin:
            torch.cuda.current_stream().synchronize()  # the hot slots are reused right after
        self.counters.spilled_to_host_bytes += sum(p.numel() * p.element_size() for p in parts)
        self.n_host += B
        self.hot.drop_front(B, self.n_hot)
        self.n_hot -= B

    def _to_disk(self, parts: list[torch.Tensor]) -> None:
        offset, nbytes = self.disk.write(parts)
        self.disk_blocks.append(offset)
        self.counters.spilled_to_disk_bytes += nbytes

    def _append(self, k, v) -> None:
        T, lay = k.shape[0], self.layout
        if lay.hot_tokens is not None:
            while self.n_hot + T > lay.hot_tokens and self.n_hot >= lay.block:
                self._spill_block()
        if self.n_hot + T > self.hot.capacity:
            cap = max(2 * self.hot.capacity, self.n_hot + T)
            limit = lay.hot_tokens if lay.hot_tokens is not None else lay.max_tokens
            self.hot = self.hot.grown(max(min(cap, limit), self.n_hot + T), self.n_hot)
        self.hot.write(self.n_hot, k, v)
        self.n_hot += T
        self.n += T

    # --- attention ---------------------------------------------------------------------------------
    def attend(self, q, k, v, pos0: int, q_pos) -> torch.Tensor:
        assert pos0 == self.n, "KV cache fed out of order"
        self._append(k, v)
        hot_first = self.n - self.n_hot
        hot_k, hot_v = self.hot.read(0, self.n_hot, self.dtype)
        if hot_first == 0:  # nothing spilled: plain attention, as if there were no tiers
            t0 = time.perf_counter()
            out = attend(q, hot_k, hot_v, q_pos, 0, None)
            self.counters.seconds["device"] += time.perf_counter() - t0
            return out
        parts = []
        if self.disk_blocks:
            with self.rec.span("kv disk blocks", "disk", layer=self.layer, blocks=len(self.disk_blocks)):
                parts += self._disk_parts(q)
        if self.n_host:
            with self.rec.span("kv host blocks", layer=self.layer, tokens=self.n_host):
                parts += self._host_parts(q)
        t0 = time.perf_counter()
        mask = None
        if q.shape[0] > 1:
            k_pos = torch.arange(hot_first, self.n, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]
        parts.append(attention_part(q, hot_k, hot_v, mask))
        self.counters.seconds["device"] += time.perf_counter() - t0
        return merge_parts(parts).to(q.dtype).reshape(q.shape[0], -1)

    def _host_parts(self, q) -> list:
        if not self.n_host:
            return []
        c = self.counters
        on_cpu = self.device.type == "cpu" or c.host_on_cpu is not False
        t0 = time.perf_counter()
        if on_cpu:
            keys, values = self.host.read(0, self.n_host, torch.float32)
            out, lse = attention_part(q.to("cpu"), keys, values)
            part = (out.to(q.device), lse.to(q.device))
        else:  # stream the stored (possibly 8-bit) block to the device and attend there
            stage = KVPair(self.n_host, self.heads, self.head_dim, self.layout.k_type, self.layout.v_type, self.device)
            stage.put(0, self.host.parts(0, self.n_host))
            c.fetched_to_device_bytes += stage.nbytes
            part = attention_part(q, *stage.read(0, self.n_host, self.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        c.seconds["host"] += elapsed
        if self.device.type == "cuda":  # the cost model: time each way once per token, then keep the faster
            c.host_trials[on_cpu] = elapsed / self.n_host
            c.host_on_cpu = (c.host_trials[True] <= c.host_trials[False]) if len(c.host_trials) == 2 else not on_cpu
        return [part]

    def _disk_parts(self, q) -> list:
        if not self.disk_blocks:
            return []
        B, lay = self.layout.block, self.layout
        t0 = time.perf_counter()
        disk = self.disk
        if disk.stage is None:  # one block, to learn its size; then as many blocks as STAGE_BYTES hold
            disk.stage = KVPair(B, self.heads, self.head_dim, lay.k_type, lay.v_type, "cpu")
        block_bytes = disk.stage.nbytes * B // disk.stage.capacity
        per_pass = max(1, disk.STAGE_BYTES // block_bytes)
        want = min(len(self.disk_blocks), per_pass) * B
        if disk.stage.capacity < want:
            disk.stage = KVPair(want, self.heads, self.head_dim, lay.k_type, lay.v_type, "cpu")
        stage, parts, qc = disk.stage, [], q.to("cpu")
        for first in range(0, len(self.disk_blocks), per_pass):
            group = self.disk_blocks[first:first + per_pass]
            for i, offset in enumerate(group):
                self.counters.read_from_disk_bytes += disk.read_into(offset, stage.parts(i * B, (i + 1) * B))
            out, lse = attention_part(qc, *stage.read(0, len(group) * B, torch.float32))
            parts.append((out.to(q.device), lse.to(q.device)))
        self.counters.seconds["disk"] += time.perf_counter() - t0
        return parts

    @property
    def nbytes(self) -> int:
        """Bytes on the compute device."""
        return self.hot.nbytes

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes if self.host is not None else 0


class KVCache:
    """One cache per layer plus the number of tokens already processed.

    disk: the KV disk file the LLM opened and locked at load (held for its life); the cache starts it
    empty. Without one, a layout that names a disk file and spills opens (and owns) its own."""

    def __init__(self, config, device, dtype, layout: KVLayout | None = None, disk: KVDisk | None = None, rec=NULL):
        self.layout = layout or KVLayout(kv_type_for(dtype), kv_type_for(dtype))
        self.counters = KVCounters()
        self.owns_disk = disk is None and self.layout.disk is not None and bool(self.layout.hot_tokens)
        if self.owns_disk:
            disk = KVDisk(self.layout.disk)
        elif disk is not None:
            disk.reset()  # a new conversation: no block of an earlier one is ever read
        self.disk = disk
        self.layers = [
            ChunkKV(config.attention_chunk_size, config.num_key_value_heads, config.head_dim, device, dtype, self.layout, rec)
            if config.uses_rope(i)
            else GlobalKV(i, config.num_key_value_heads, config.head_dim, device, dtype, self.layout, rec, self.disk,
                          self.counters)
            for i in range(config.num_hidden_layers)
        ]
        self.first_global = next((layer for layer in self.layers if isinstance(layer, GlobalKV)), None)
        self.pos = 0

    @property
    def nbytes(self) -> int:
        """Bytes on the compute device."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def host_bytes(self) -> int:
        """Host RAM: the global layers' host tiers, and the disk tier's staging buffer."""
        stage = self.disk.stage.nbytes if self.disk is not None and self.disk.stage is not None else 0
        return sum(layer.host_bytes for layer in self.layers if isinstance(layer, GlobalKV)) + stage

    def tokens_by_tier(self) -> dict[str, int]:
        """Tokens of one global layer in each tier (every global layer holds the same split)."""
        g = self.first_global
        if g is None:
            return {"device": self.pos, "host": 0, "disk": 0}
        return {"device": g.n_hot, "host": g.n_host, "disk": len(g.disk_blocks) * self.layout.block}

    def snapshot(self) -> KVStats:
        tiers, c = self.tokens_by_tier(), self.counters
        return KVStats(self.pos, tiers["device"], tiers["host"], tiers["disk"], self.nbytes, self.host_bytes,
                       c.spilled_to_host_bytes, c.spilled_to_disk_bytes, c.fetched_to_device_bytes,
                       c.read_from_disk_bytes, dict(c.seconds))

    def close(self) -> None:
        """Drop the conversation's disk blocks: an owned file is removed, a lent one emptied."""
        if self.disk is not None:
            if self.owns_disk:
                self.disk.close()
            else:
                self.disk.reset()
            self.disk = None
            for layer in self.layers:
                if isinstance(layer, GlobalKV):
                    layer.disk = None
