"""Writing files all at once; used by every layer (the token cache of `inputs`, checkpoints, results, reports), so it
sits below them all."""

from __future__ import annotations

import contextlib
import os
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
