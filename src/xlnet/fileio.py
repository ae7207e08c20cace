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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temp name and swap it in whole when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_binary(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(line source, raw file) for a plain or .gz file; the raw file's position tells progress through compressed input."""
    if not path.is_file():
        raise XLNetError(f"{path}: no such file")
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
