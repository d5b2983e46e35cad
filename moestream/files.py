"""Files moestream writes: never half-written, never someone else's, never shared by accident.

Three rules, one home:
- A file is written whole or not at all: `atomic_write` writes a unique temporary name in the same
  directory, fsyncs it, renames it over the target and fsyncs the directory, so a full disk, a
  SIGTERM or a power cut leaves the previous version (or nothing), never a truncated file.
- A file moestream did not create is never truncated or overwritten: writers pass `ours`, a test
  of the existing file's content (our own format marker), and anything else is refused with one line.
- A file two processes could share is locked: `FileLock` takes an exclusive `flock` (released by
  the kernel when the process dies, so a crashed writer never leaves a stale lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path
from typing import Callable

from .errors import MoestreamError

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """A name beside `path` that no other writer (another process, or this one) can pick."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def describe_os_error(e: OSError) -> str:
    """What went wrong, in words that point at the fix (not "free space" for a missing directory)."""
    hints = {
        errno.ENOSPC: "the disk is full: free space there or choose another place",
        errno.EDQUOT: "the disk quota is exceeded: free space there or choose another place",
        errno.EACCES: "permission denied: choose a place you can write to",
        errno.EPERM: "permission denied: choose a place you can write to",
        errno.EROFS: "the file system is read-only: choose another place",
        errno.ENOENT: "a directory on the way does not exist",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.EISDIR: "it is a directory, not a file",
    }
    return hints.get(e.errno, e.strerror or str(e))


def make_directory(directory: Path) -> None:
    """mkdir -p; a file in the way is ENOTDIR (not mkdir's bare EEXIST), so describe_os_error names it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory)) from None


def refuse_foreign(path: Path, ours: Callable[[Path], bool] | None, what: str, fix: str) -> None:
    """Raise if `path` exists and is not a file moestream wrote (as `ours` judges its content)."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_file():
        raise MoestreamError(f"{path} exists and is not a regular file: {fix}")
    if ours is None or not _safely(ours, path):
        raise MoestreamError(f"{path} exists and is not {what}; moestream never overwrites a file it did not write: {fix}")


def _safely(test: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(test(path))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def cache_dir() -> Path:
    """Where moestream keeps what it makes for itself: $XDG_CACHE_HOME/moestream, else ~/.cache/moestream."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moestream"


FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_limited(path: str | Path, limit: int, what: str, fix: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, for `what` (e.g. "/read"); anything else is
    one line. A FIFO, a device or a directory is refused before a byte is read (checked before opening,
    and again on the descriptor, opened non-blocking so a FIFO without a writer cannot hang us)."""
    path = Path(path).expanduser()
    size = f"{limit / 2**20:g} MiB"

    def refuse_kind(mode: int) -> None:
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
            raise MoestreamError(f"{path} is {kind}; {what} reads regular files only: {fix}")

    try:
        refuse_kind(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        why = "there is no such file" if e.errno == errno.ENOENT else describe_os_error(e)
        raise MoestreamError(f"cannot read {path}: {why}") from None
    try:
        st = os.fstat(fd)
        refuse_kind(st.st_mode)
        if st.st_size > limit:
            raise MoestreamError(f"{path} is {st.st_size / 2**20:.1f} MiB, over the {size} that {what} reads: {fix}")
        chunks, left = [], limit + 1  # one byte more than allowed tells a file that grew since fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise MoestreamError(f"cannot read {path}: {describe_os_error(e)}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise MoestreamError(f"{path} is over the {size} that {what} reads: {fix}")
    return data


def fsync_directory(directory: Path) -> None:
    """Make a rename durable (the directory entry is data too)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str, *, ours: Callable[[Path], bool] | None = None,
                 what: str = "a moestream file", fix: str = "choose another file name", mode: int = 0o644) -> None:
    """Write `data` to `path` whole or not at all; an existing file is replaced only if `ours(path)`."""
    path = Path(path).expanduser()
    refuse_foreign(path, ours, what, fix)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise MoestreamError(f"cannot write {path}: {describe_os_error(e)}; nothing was changed") from None
    except BaseException:  # Ctrl+C mid-write: the old file stays, the temporary goes
        _unlink_quietly(tmp)
        raise
    fsync_directory(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class FileLock:
    """An exclusive advisory lock on `path` (created 0600 if missing), held until release() or exit.

    blocking=False: a second holder gets one line naming `what` and the fix; blocking=True waits
    (two processes repacking the same experts: the second waits, then reuses the first's file)."""

    def __init__(self, path: str | Path, what: str, fix: str, blocking: bool = False):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise MoestreamError(f"cannot open {self.path} to lock {what}: {describe_os_error(e)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MoestreamError(f"{what} is in use by another moestream process: {fix}") from None
            raise MoestreamError(f"cannot lock {self.path}: {describe_os_error(e)}") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def lock_open_file(fd: int, path: Path, what: str, fix: str) -> None:
    """FileLock's non-blocking exclusive flock, on a file already open for its data (the KV disk
    file is its own lock, so the lock and the bytes can never be two different files)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MoestreamError(f"{what} is in use by another moestream process: {fix}") from None
        raise MoestreamError(f"cannot lock {path}: {describe_os_error(e)}") from None
