"""The wheel: `pip install` of a built wheel gives a working `mpq` with boards and templates.

The distribution is named mpq-mcu (the PyPI name "mpq" is an unrelated project); the import
package and the command are `mpq`, and all three carry mpq.__version__.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from conftest import REPO

from mpq import __version__
from mpq.codegen.export import KERNEL_SOURCES, library_files

DIST = "mpq-mcu"  # the distribution name; files use its normalised form mpq_mcu


def metadata_field(text: str, field: str) -> str:
    """The value of one `Field: value` header of a METADATA / PKG-INFO file."""
    return next(line.split(": ", 1)[1] for line in text.splitlines()
                if line.startswith(f"{field}: "))


def test_wheel_contains_and_uses_boards_and_templates(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(REPO)], check=True,
                   capture_output=True)
    wheels = list(dist.glob("*.whl"))
    assert [w.name for w in wheels] == [f"mpq_mcu-{__version__}-py3-none-any.whl"]
    wheel = zipfile.ZipFile(wheels[0])
    names = wheel.namelist()
    meta = wheel.read(f"mpq_mcu-{__version__}.dist-info/METADATA").decode()
    assert metadata_field(meta, "Name") == DIST
    assert metadata_field(meta, "Version") == __version__
    entry_points = wheel.read(f"mpq_mcu-{__version__}.dist-info/entry_points.txt").decode()
    assert "mpq = mpq.cli:main" in entry_points
    assert "mpq/boards/nano33ble.toml" in names
    assert "mpq/templates/linker/board.ld.j2" in names
    assert "mpq/templates/firmware/startup.c.j2" in names
    assert "mpq/tools/icount/icount.c" in names
    # The C kernel library, every file of it (an export copies them from here).
    assert {f"mpq/kernels/{n}" for n in library_files(list(KERNEL_SOURCES))} <= set(names)
    assert "mpq/cli.py" in names and not any(n.startswith("tests/") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheels[0])], check=True, capture_output=True)
    # Run from an empty directory so only the installed copy of mpq can be imported.
    env = {**os.environ, "PYTHONPATH": str(site)}
    version = subprocess.run([str(site / "bin" / "mpq"), "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)  # the console script
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"mpq, version {__version__}"
    installed = subprocess.run(
        [sys.executable, "-c", f"import importlib.metadata as m; print(m.version({DIST!r}))"],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert installed.stdout.strip() == __version__, installed.stderr
    code = ("import mpq.resources, mpq.cli; print(mpq.resources.data_dir('templates'));"
            "assert mpq.resources.data_dir('kernels').parent == mpq.resources.data_dir("
            "'templates').parent;"
            "mpq.cli.main(['boards', '--json'])")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    first, rest = run.stdout.split("\n", 1)
    assert Path(first).is_relative_to(site)
    assert {b["name"] for b in json.loads(rest)} >= {"nano33ble", "stm32h743", "mps2-an386"}


def test_sdist_is_named_for_the_distribution(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d",
                    str(tmp_path)], cwd=REPO, check=True, capture_output=True)
    sdists = list(tmp_path.glob("*.tar.gz"))
    assert [s.name for s in sdists] == [f"mpq_mcu-{__version__}.tar.gz"]
    with tarfile.open(sdists[0]) as tar:
        pkg_info = tar.extractfile(f"mpq_mcu-{__version__}/PKG-INFO").read().decode()
        assert f"mpq_mcu-{__version__}/mpq/cli.py" in tar.getnames()
        assert f"mpq_mcu-{__version__}/kernels/mpq_conv.c" in tar.getnames()
    assert metadata_field(pkg_info, "Name") == DIST
    assert metadata_field(pkg_info, "Version") == __version__
