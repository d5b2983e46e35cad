"""ExpertStore: where routed experts live when they are not on the compute device.

Each expert is one packed buffer (model/experts.py), so moving it between tiers is a single copy.
Tiers: host RAM (pinned when CUDA is present) up to the plan's share, the rest in a
repacked file on disk (one aligned block per expert, so one expert is one sequential read) or, with
--no-repack, read straight from the checkpoint's files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import weakref
from pathlib import Path

import torch
import xxhash

from .. import memory
from ..errors import MoestreamError
from ..files import (TMP_SUFFIX, FileLock, cache_dir, describe_os_error, fsync_directory, make_directory, refuse_foreign,
                     temporary_name)
from ..model.checkpoint import Checkpoint
from ..model.formats import ExpertFormat

BLOCK_ALIGN = 4096  # disk blocks start on page boundaries (O_DIRECT-friendly, no straddled pages)


def checksum(data) -> int:
    """xxh3-64 of a block's bytes. Measured on a 64 MiB buffer (best of 3): 22 GB/s, where zlib.crc32
    does 3.0, adler32 3.2 and blake2b 0.8, and reading the block back from the page cache 4.8; so
    checking every read costs about a fifth of the read instead of more than doubling it."""
    return xxhash.xxh3_64_intdigest(data)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


class RepackedFile:
    """Disk tier: experts in one file, after a header that describes them, one aligned block each.

    The header (MAGIC, its length, then JSON: format, checkpoint, fingerprint, the experts' storage
    format (--expert-dtype: a change rebuilds the file), bytes per expert, block, keys and one checksum
    per block; padded to BLOCK_ALIGN) is part of the file, so the file is valid
    iff its header says so, with no sidecar to get out of step. It is built under a temporary name,
    fsynced and renamed into place while the expert directory's lock is held: a second process waits
    and then reuses it, and a writer that dies leaves only its temporary, which the next holder of the
    lock removes. Every block is checked against its checksum as it is read, so a file corrupted in
    place is never used: it is removed and the read fails with one line.
    """

    FORMAT = "moestream-experts/3"
    MAGIC = b"moestream-experts\n"
    LOCK = ".moestream-experts.lock"  # one per directory: every writer of *.experts there holds it

    def __init__(self, directory: Path, checkpoint_id: str, label: str, keys: list[tuple[int, int]], nbytes: int,
                 expert_format: str, fingerprint: str, role: str = "experts"):
        self.directory, self.keys, self.nbytes = directory, keys, nbytes
        self.block = -(-self.nbytes // BLOCK_ALIGN) * BLOCK_ALIGN
        self.index = {key: i for i, key in enumerate(keys)}
        self.meta = {"format": self.FORMAT, "checkpoint": checkpoint_id, "fingerprint": fingerprint,
                     "expert_format": expert_format, "nbytes": nbytes, "block": self.block,
                     "keys": [list(k) for k in keys], "checksum": "xxh3_64", "role": role}
        # one file per (checkpoint, layout, dtype): its name is a hash of everything the header must match
        digest = hashlib.sha1(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.path = directory / f"{label}-{digest}.experts"
        self.data_start = -(-len(self._header([0] * len(keys))) // BLOCK_ALIGN) * BLOCK_ALIGN  # checksums are fixed-width
        self.size = self.data_start + len(keys) * self.block
        self.checksums: list[int] = []
        self.fd: int | None = None
        self.broken: str | None = None  # set once a block failed its check: the file is never read again

    def _header(self, checksums: list[int]) -> bytes:
        body = json.dumps(dict(self.meta, checksums=[f"{c:016x}" for c in checksums])).encode()
        return self.MAGIC + struct.pack("<Q", len(body)) + body

    @classmethod
    def read_header(cls, fd: int) -> dict | None:
        """The JSON header of an open expert file, or None if it has none (not ours, or torn)."""
        head = os.pread(fd, len(cls.MAGIC) + 8, 0)
        if len(head) < len(cls.MAGIC) + 8 or not head.startswith(cls.MAGIC):
            return None
        (n,) = struct.unpack("<Q", head[len(cls.MAGIC):])
        try:
            meta = json.loads(os.pread(fd, min(n, 1 << 26), len(head)))  # Maverick's is ~200 KB
        except (ValueError, UnicodeDecodeError):
            return None
        return meta if isinstance(meta, dict) else None

    def prepare(self, fill, staging: torch.Tensor, progress=None) -> None:
        """Open the file if its header describes exactly these experts, else build it; under the lock.

        fill(key, buffer) loads one expert from the checkpoint (only when building)."""
        lock_path = self.directory / self.LOCK
        try:
            make_directory(self.directory)
            os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # a directory we cannot write fails here
        except OSError as e:
            raise MoestreamError(self._cannot_write(e)) from None
        with FileLock(lock_path, f"the expert directory {self.directory}", "point --expert-dir elsewhere", blocking=True):
            self._remove_leftovers()
            if not self._open():
                refuse_foreign(self.path, self._ours, "a moestream expert file", "point --expert-dir elsewhere")
                self._write(fill, staging, progress)
                if not self._open():
                    raise MoestreamError(f"the expert file {self.path} did not read back as written: point --expert-dir elsewhere")
        self._close = weakref.finalize(self, os.close, self.fd)

    def _ours(self, path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(len(self.MAGIC)) == self.MAGIC

    def _remove_leftovers(self) -> None:
        """With the lock held: temporaries (their writers died: every writer holds the lock) and this
        checkpoint's files for another fingerprint or layout, in the same role (the experts, or their
        miss replicas). Other checkpoints' files stay."""
        for tmp in self.directory.glob(f".*.experts.*{TMP_SUFFIX}"):
            try:
                tmp.unlink()
            except OSError:
                pass  # gone already, or not ours to remove
        for other in self.directory.glob("*.experts"):
            if other == self.path:
                continue
            try:
                fd = os.open(other, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    meta = self.read_header(fd)
                finally:
                    os.close(fd)
                if (meta is not None and meta.get("checkpoint") == self.meta["checkpoint"]
                        and meta.get("role", "experts") == self.meta["role"]):  # the miss replicas' file is another's
                    other.unlink()
            except OSError:
                pass  # unreadable or gone: not ours to judge

    def _open(self) -> bool:
        """Whether the file is there, whole, with a header matching these experts (then it is kept open,
        so a later run that removes it as stale cannot take it from under us)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise MoestreamError(f"cannot read the expert file {self.path}: {describe_os_error(e)}; point --expert-dir elsewhere") from None
        meta = self.read_header(fd)
        try:
            ok = (meta is not None and {k: meta.get(k) for k in self.meta} == self.meta
                  and len(meta.get("checksums", ())) == len(self.keys) and os.fstat(fd).st_size == self.size)
            checksums = [int(c, 16) for c in meta["checksums"]] if ok else []
        except (TypeError, ValueError):
            ok = False
        if not ok:
            os.close(fd)
            return False
        self.fd, self.checksums = fd, checksums
        return True

    def _write(self, fill, staging: torch.Tensor, progress=None) -> None:
        """Every block, then the header (so a temporary is never whole before its end), fsync, rename."""
        tmp = temporary_name(self.path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                raw = staging.view(torch.uint8).numpy()[:self.nbytes]
                checksums = []
                for i, key in enumerate(self.keys):
                    fill(key, staging)
                    checksums.append(checksum(raw))
                    _pwrite_all(fd, raw, self.data_start + i * self.block)
                    if progress:
                        progress(self.nbytes)
                os.ftruncate(fd, self.size)
                _pwrite_all(fd, self._header(checksums), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise MoestreamError(self._cannot_write(e)) from None
        except BaseException:  # Ctrl+C mid-write: no temporary stays behind
            tmp.unlink(missing_ok=True)
            raise
        fsync_directory(self.directory)

    def _cannot_write(self, e: OSError) -> str:
        """A full disk says how much is needed; a missing or unwritable directory says so, not "free space"."""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"cannot write the expert file {self.path} ({self.size / 2**30:.2f} GiB): {describe_os_error(e)} "
                    "(--expert-dir DIR), or raise --cpu-mem to keep more experts in RAM")
        return f"cannot write the expert file in {self.directory}: {describe_os_error(e)}; point --expert-dir elsewhere"

    def read_into(self, key: tuple[int, int], out: torch.Tensor) -> int:
        """One sequential read of one expert into a flat host buffer, checked; returns bytes read."""
        if self.broken:
            raise MoestreamError(self.broken)
        i = self.index[key]
        view = memoryview(out.view(torch.uint8).numpy())[:self.nbytes]
        if os.preadv(self.fd, [view], self.data_start + i * self.block) != self.nbytes:
            why = "is cut short"
        elif checksum(view) != self.checksums[i]:
            why = "failed its checksum"
        else:
            return self.nbytes
        self._remove()
        self.broken = (f"the expert file {self.path} was corrupt (the block of expert {key[1]} of layer {key[0]} {why}) "
                       "and has been removed: run again to rebuild it")
        raise MoestreamError(self.broken)

    def _remove(self) -> None:
        """Unlink the file if the path still names the one we read (a rebuilt one is not ours to remove)."""
        try:
            st, mine = os.stat(self.path), os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                self.path.unlink()
        except OSError:
            pass


class ExpertStore:
    """Every routed expert of the model, packed in its format, in host RAM up to `host_experts`, the
    rest on disk.

    Filling the host tier packs one expert at a time straight into its row of the (pinned) host
    buffer, so loading never holds two copies of the experts in RAM. A format the checkpoint cannot be
    read into directly (quantized, converted) is packed once, into the repacked file, which then holds
    every expert: the next run fills its host tier from the file with plain reads instead of
    quantizing again (an int4 Scout expert takes seconds to pack; reading it, milliseconds).
    """

    def __init__(self, checkpoint: Checkpoint, keys: list[tuple[int, int]], host_experts: int, fmt: ExpertFormat,
                 pin: bool, expert_dir: Path | None, repack: bool = True, progress=None, role: str = "experts"):
        c = checkpoint.config
        self.checkpoint, self.fmt = checkpoint, fmt
        self.hidden, self.inter = c.hidden_size, c.intermediate_size
        self.nbytes = fmt.nbytes(self.hidden, self.inter)
        self.host_keys = keys[:host_experts]
        self.disk_keys = keys[host_experts:]
        self.host_index = {key: i for i, key in enumerate(self.host_keys)}
        self.host = (torch.empty(len(self.host_keys), self.nbytes, dtype=torch.uint8, pin_memory=True) if pin else
                     memory.empty((len(self.host_keys), self.nbytes), torch.uint8))  # the CPU computes from it
        self.host_experts = [fmt.expert(self.host[i], self.hidden, self.inter) for i in range(len(self.host_keys))]
        packs = not checkpoint.reads_raw(fmt)
        in_file = keys if packs else self.disk_keys  # what the repacked file holds
        self.file: RepackedFile | None = None
        if in_file and repack:
            self.file = RepackedFile(Path(expert_dir or cache_dir()).expanduser(), str(Path(checkpoint.path).resolve()),
                                     checkpoint.path.name + ("" if role == "experts" else f"-{role}"), in_file, self.nbytes,
                                     fmt.signature, checkpoint.fingerprint(), role)
            staging = torch.empty(self.nbytes, dtype=torch.uint8)
            self.file.prepare(lambda key, buf: checkpoint.read_expert_into(*key, buf, fmt), staging, progress)
        source = self.file.read_into if self.file is not None and packs else (
            lambda key, out: checkpoint.read_expert_into(*key, out, fmt))
        for i, key in enumerate(self.host_keys):
            source(key, self.host[i])
            if progress and not (self.file is not None and packs):
                progress(self.nbytes)

    def tier(self, key: tuple[int, int]) -> str:
        return "host" if key in self.host_index else "disk"

    def host_expert(self, key: tuple[int, int]):
        return self.host_experts[self.host_index[key]]

    @property
    def reads_with_torch(self) -> bool:
        """Disk reads that convert, quantize or gather with torch ops (straight from a checkpoint whose
        layout or dtype differs from the store's format): they must run on the compute thread, because
        torch ops on another thread start a second OpenMP team whose spinning threads take the cores
        from compute."""
        return bool(self.disk_keys) and self.file is None and not self.checkpoint.reads_raw(self.fmt)

    def read_into(self, key: tuple[int, int], out: torch.Tensor) -> int:
        """Bring a disk-tier expert into a uint8 host buffer (the repacked file, or the checkpoint)."""
        if self.file is not None:
            return self.file.read_into(key, out)
        self.checkpoint.read_expert_into(*key, out, self.fmt)
        return self.nbytes

    @property
    def host_bytes(self) -> int:
        return self.host.numel()

    def snapshot(self) -> dict:
        return {"host_bytes": self.host_bytes, "disk_experts": len(self.disk_keys)}
