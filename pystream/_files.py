"""Writing files all at once; used by every layer (the token cache of `inputs`, checkpoints, results, reports), so it
sits below them all."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path, write: Callable[[Path], object]) -> None:
    """Write `path` all at once: `write(tmp)` fills a temporary file beside it (same suffix), which then replaces
    `path`, so that a reader or a crash never sees half a file; the temporary is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_regular_file(path, name, max_bytes: int, error=OSError) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes`; anything else raises `error` with a
    one-line message starting with `name`. A FIFO, a device or a socket is refused before anything is read from it
    (opened non-blocking, checked with fstat on the opened file, so that the check and the read see the same file):
    reading one could block forever or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except IsADirectoryError:
        raise error(f"{name}: is a directory, not a file") from None
    except OSError as err:
        raise error(f"{name}: cannot be read ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{name}: is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                    else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "special")
            raise error(f"{name}: is {kind}, not a regular file (only regular files are read)")
        if info.st_size > max_bytes:
            raise error(f"{name}: {info.st_size:,} bytes, more than the {max_bytes:,} read at most")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise error(f"{name}: more than the {max_bytes:,} bytes read at most")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as err:
        if isinstance(err, error):
            raise
        raise error(f"{name}: cannot be read ({err.strerror or err})") from None
    finally:
        os.close(fd)
