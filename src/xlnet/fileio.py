"""Atomic file writing, checksums and strict reading of user text: nothing half-written is ever left under a final
name, and unreadable input is an XLNetError naming the file and line."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from xlnet.errors import XLNetError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file we wrote the usual permissions (some writers, e.g. safetensors, create 0600 files)."""
    os.chmod(path, 0o666 & ~_umask())


@dataclass(frozen=True)
class DirKind:
    """What a directory output is: an existing destination is replaced only when it holds `marker` (a file,
    or glob, that every previous output of this kind has), so a user's unrelated directory is never deleted."""

    marker: str
    what: str  # for the error message, e.g. "a model directory"


def check_replaceable(path: str | os.PathLike, kind: DirKind | None) -> None:
    """Fail with one line unless `path` is absent, an empty directory, or a previous output of `kind`
    (None: nothing non-empty is replaced). Verbs call this before any work so a bad destination fails fast."""
    path = Path(path)
    advice = "choose another path or remove it"
    if path.is_symlink():
        raise XLNetError(f"{path}: exists and is a symbolic link; {advice}")
    if not path.exists():
        return
    if not path.is_dir():
        raise XLNetError(f"{path}: exists and is not a directory; {advice}")
    if kind is not None and any(path.glob(kind.marker)):
        return
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as e:
        raise XLNetError(f"{path}: cannot list ({e.strerror}); {advice}") from None
    if not empty:
        detail = f"{kind.what} (no {kind.marker})" if kind is not None else "empty"
        raise XLNetError(f"{path}: exists and is not {detail}; {advice}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replaces: DirKind | None = None) -> Iterator[Path]:
    """Build a directory under a temp name and swap it in whole when the block succeeds. An existing `path` is
    replaced only when `check_replaceable` allows it (checked before and again after the block)."""
    path = Path(path)
    check_replaceable(path, replaces)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise XLNetError(f"{path.parent}: cannot create directory ({e.strerror or e})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        check_replaceable(path, replaces)  # the block may have run for hours: look again
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`, moving a previous `path` aside first. The aside name is fresh each time, so a
    stale one left by a crash never blocks a later swap (and is not ours to delete blindly)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old)  # a directory may be renamed over an empty one
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


class DirLock:
    """An exclusive flock on a directory itself (no lock file left behind), held until `release` or the end of the
    process (kill -9 included): two runs writing one output directory would delete each other's checkpoints."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.fd: int | None = None
        if not enabled:  # (ranks other than 0, which write nothing there)
            return
        try:
            import fcntl
        except ImportError:  # Windows: no flock, no lock
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise XLNetError(f"{path} is in use by another xlnet run (it holds the directory's lock); wait for it "
                             f"to end, or choose another output directory") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def require_dir(path: Path, what: str, hint: str = "") -> None:
    """A one-line XLNetError unless `path` is a directory, saying whether it is missing or a file."""
    if not path.is_dir():
        raise XLNetError((f"{path}: is a file, not a {what}" if path.exists() else f"{what} not found: {path}") + hint)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, offset: int = 0) -> str:
    """sha256 of the file's bytes from `offset` on, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_binary(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(line source, raw file) for a plain or .gz file; the raw file's position tells progress through compressed input."""
    if not path.is_file():
        raise XLNetError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'no such file'}")
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise XLNetError(f"{path}: cannot open ({e.strerror})") from None
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def decoded_lines(path: Path, src: IO[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, text with its newline), strict UTF-8 decoded line by line so an error names the right line;
    NUL bytes mean a binary file."""
    try:
        for lineno, raw_line in enumerate(src, 1):
            if b"\x00" in raw_line:
                raise XLNetError(f"{path}:{lineno}: binary data (NUL byte); expected UTF-8 text")
            try:
                yield lineno, raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise XLNetError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise XLNetError(f"{path}: cannot read ({e})") from None


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) of a UTF-8 text file, plain or .gz; a leading BOM (some GLUE
    files have one) is dropped."""
    path = Path(path)
    src, raw = open_binary(path)
    with raw, src:
        for lineno, line in decoded_lines(path, src):
            yield lineno, (line.removeprefix("\ufeff") if lineno == 1 else line)
