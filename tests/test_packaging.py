"""The wheel: `pip install` of a built wheel gives a working `mpq` with boards and templates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_contains_and_uses_boards_and_templates(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(REPO)], check=True,
                   capture_output=True)
    wheels = list(dist.glob("mpq-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "mpq/boards/nano33ble.toml" in names
    assert "mpq/templates/linker/board.ld.j2" in names
    assert "mpq/templates/firmware/startup.c.j2" in names
    assert "mpq/tools/icount/icount.c" in names
    assert "mpq/cli.py" in names and not any(n.startswith("tests/") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(wheels[0])], check=True, capture_output=True)
    assert (site / "bin" / "mpq").exists()  # the console script
    # Run from an empty directory so only the installed copy of mpq can be imported.
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import mpq.resources, mpq.cli; print(mpq.resources.data_dir('templates'));"
            "mpq.cli.main(['boards', '--json'])")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    first, rest = run.stdout.split("\n", 1)
    assert Path(first).is_relative_to(site)
    assert {b["name"] for b in json.loads(rest)} >= {"nano33ble", "stm32h743", "mps2-an386"}
