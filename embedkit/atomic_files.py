"""Files written whole or not at all: results.json, the result tables and the checkpoints.

Why: a run killed (or a disk filled) while `results.json` or `table.csv` was being written left a
truncated file behind, which a resumed run had to redo and the sweep aggregate could not parse. The
text goes to a temporary file in the same folder, is flushed and fsync'ed, then `os.replace`d over
the final name: a reader sees the old file or the new one, never part of one. The temporary name is
unique per writer (parallel sweep jobs write into shared folders) and starts with "." and ends in
".tmp", so a leftover from a kill is never read as a result (nor as a `*.ckpt` checkpoint).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False,
                 encoding: str = "utf-8") -> Path:
    """Call `write(fh)` on a temporary file beside `path`, then swap it in: a crash at any point
    leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding=encoding) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # The rename must reach the disk too, or a power cut could undo it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` so that a crash at any point leaves either the old file or the new one."""
    return write_atomic(path, lambda fh: fh.write(text), encoding=encoding)
