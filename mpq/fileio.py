"""Writing output files safely: never half-written, never rewritten when unchanged, never
over an input of the same command, never in place of something that is not a regular file."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mpq.errors import MpqError


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"))


def check_replaceable(path: str | Path) -> None:
    """Refuse an output path that exists but is not a regular file (through symlinks): the
    rename of `write_atomic` would put a regular file in place of a device node, a FIFO, a
    socket or a directory (as root, `-o /dev/null` would replace /dev/null)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # absent (or a dangling link): nothing to replace
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise MpqError(f"{path}: is {kind}, not a regular file; refusing to replace it")


def _same_file(a: Path, b: Path) -> bool:
    """`a` would write over the existing file `b` (same path, a symlink, a hard link)."""
    if not b.exists():
        return False
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False  # one of them does not exist


def check_outputs(outputs: Iterable[str | Path | None],
                  inputs: Iterable[str | Path | None]) -> None:
    """Refuse, before a command does its work, outputs it could not write safely: one that
    is also an input (the same path, a symlink to it or a hard link — `mpq search k.onnx -o
    k.onnx` must not destroy the model) or one that is not a regular file
    (`check_replaceable`). `write_atomic` checks the latter again when it writes."""
    ins = [Path(i) for i in inputs if i is not None]
    for out in outputs:
        if out is None:
            continue
        check_replaceable(out)
        for i in ins:
            if _same_file(Path(out), i):
                same = "" if str(out) == str(i) else f" (the same file as {i})"
                raise MpqError(f"{out}: is an input of this command{same}; refusing to "
                               "overwrite it (choose another output)")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    A crash or an error part-way leaves the old file (or no file), never a truncated one.
    Only a regular file (or nothing) is replaced (`check_replaceable`).
    """
    p = Path(path)
    directory = p.parent if str(p.parent) else Path(".")
    if not directory.is_dir():
        raise MpqError(f"{p}: directory '{directory}' does not exist")
    check_replaceable(p)
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
    if p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data:
        return False
    write_atomic(p, data)
    return True
