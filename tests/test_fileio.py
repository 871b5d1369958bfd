"""Atomic output files: whole or absent, unchanged files untouched, the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mpq.errors import MpqError
from mpq.fileio import check_outputs, write_atomic, write_if_changed


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


def test_a_fifo_or_a_directory_is_never_replaced(tmp_path):
    fifo = tmp_path / "out.bin"
    os.mkfifo(fifo)
    with pytest.raises(MpqError, match="out.bin: is a named pipe .*refusing to replace"):
        write_atomic(fifo, b"data")
    assert fifo.is_fifo()
    (tmp_path / "d").mkdir()
    with pytest.raises(MpqError, match="is a directory"):
        write_if_changed(tmp_path / "d", b"data")
    assert (tmp_path / "d").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(MpqError, match="directory .* does not exist"):
        write_atomic(tmp_path / "missing" / "x", b"data")


def test_dev_null_is_refused_and_stays_a_device(tmp_path):
    """As root, a rename would replace /dev/null with a regular file. The refusal is proven on
    a FIFO first, so a broken check fails here before /dev/null is ever tried."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(MpqError):
        write_atomic(fifo, b"x")
    with pytest.raises(MpqError, match="/dev/null: is a character device"):
        write_atomic("/dev/null", b"x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_outputs_never_overwrite_inputs_through_any_name(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    (tmp_path / "link.onnx").symlink_to(model)
    os.link(model, tmp_path / "hard.onnx")
    monkeypatch.chdir(tmp_path)
    for out in ("m.onnx", "./m.onnx", tmp_path / "link.onnx", "hard.onnx"):
        with pytest.raises(MpqError, match="is an input of this command"):
            check_outputs([Path(out)], [None, model])
    check_outputs([tmp_path / "plan.json", None], [model, tmp_path / "absent.npz"])
    assert model.read_bytes() == b"model"
