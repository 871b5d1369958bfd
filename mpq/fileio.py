"""Writing output files safely: never half-written, never rewritten when unchanged."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mpq.errors import MpqError


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    A crash or an error part-way leaves the old file (or no file), never a truncated one.
    """
    p = Path(path)
    directory = p.parent if str(p.parent) else Path(".")
    if not directory.is_dir():
        raise MpqError(f"{p}: directory '{directory}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise MpqError(f"{p}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file 0600; outputs get the mode a plain open() would give them.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MpqError(f"{p}: cannot write ({exc.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_if_changed(path: str | Path, data: bytes) -> bool:
    """Write atomically unless the file already holds exactly `data` (keeps make's mtimes).

    Returns True when the file was written.
    """
    p = Path(path)
    if p.is_file() and p.read_bytes() == data:
        return False
    write_atomic(p, data)
    return True
