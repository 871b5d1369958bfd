"""Atomic output files: whole or absent, unchanged files untouched, the usual permissions."""

from __future__ import annotations

import os
import stat

from mpq.fileio import write_atomic, write_if_changed


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.c", b"int x;\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.c").stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_unchanged_content_is_not_rewritten(tmp_path):
    target = tmp_path / "b.h"
    assert write_if_changed(target, b"1\n")
    os.utime(target, (1_000_000, 1_000_000))
    assert not write_if_changed(target, b"1\n")
    assert target.stat().st_mtime == 1_000_000
    assert write_if_changed(target, b"2\n")
    assert target.read_bytes() == b"2\n"
