"""examples/firmware: the Makefile a user copies — mpq search and mpq export as make rules, a
firmware ELF built with arm-none-eabi-gcc and newlib, run under qemu-system-arm.

Needs make, arm-none-eabi-gcc with newlib (rdimon.specs) and qemu-system-arm; skipped without
them, except under CI (which installs them: see shared/research/qemu-cortex-m.md, "Install").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "firmware"
FASHION = REPO / "examples" / "fashion"
IMAGES = 8  # examples/firmware/Makefile: IMAGES
SRAM = 14000  # the README's budget: patches and 4/2-bit maps, the export's hardest path


def _missing() -> list[str]:
    missing = [t for t in ("make", "arm-none-eabi-gcc", "qemu-system-arm")
               if shutil.which(t) is None]
    if not missing:
        specs = subprocess.run(["arm-none-eabi-gcc", "-print-file-name=rdimon.specs"],
                               capture_output=True, text=True).stdout.strip()
        if not Path(specs).is_file():  # gcc echoes the bare name when it has no such file
            missing.append("newlib's rdimon.specs")
    return missing


_MISSING = _missing()
if _MISSING:
    _WHY = (f"the example firmware project needs {', '.join(_MISSING)} (apt-get install "
            "--no-install-recommends make gcc-arm-none-eabi libnewlib-arm-none-eabi "
            "qemu-system-arm)")
    if os.environ.get("CI"):  # CI installs them: a silent skip there would hide a broken image
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)


def _make(build: Path, *args: str) -> subprocess.CompletedProcess:
    mpq = Path(sys.executable).parent / "mpq"
    assert mpq.is_file(), f"{mpq}: the mpq entry point of this interpreter is missing"
    return subprocess.run(["make", "-C", str(EXAMPLE), f"MPQ={mpq}", f"PYTHON={sys.executable}",
                           f"BUILD={build}", *args],
                          capture_output=True, text=True, timeout=300, env=_plain_env())


def _plain_env() -> dict[str, str]:
    """The environment of a user's shell: under `make test` the outer make's variables would
    turn this into a sub-make (`make[1]: …`, its jobserver and flags)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}


def _tree(build: Path) -> dict[str, int]:
    return {str(p.relative_to(build)): p.stat().st_mtime_ns
            for p in sorted(build.rglob("*")) if p.is_file()}


def _reference_predictions(plan: Path, tmp: Path) -> tuple[list[int], list[int]]:
    """The integer reference's top-1 (mpq.evaluate) for the images the firmware embeds."""
    from mpq.evaluate import PlanRunner
    from mpq.frontend import load_model
    from mpq.plan import load_plan, resolve_model
    from mpq.quant.calibrate import load_dataset

    test = np.load(FASHION / "test.npz")
    np.savez(tmp / "first.npz", x=test["x"][:IMAGES], y=test["y"][:IMAGES])
    p = load_plan(plan)
    graph = load_model(resolve_model(p, plan, FASHION / "fashion_cnn.onnx"))
    predicted = PlanRunner(p, graph).predictions(load_dataset(tmp / "first.npz", graph))
    return [int(c) for c in predicted], [int(y) for y in test["y"][:IMAGES]]


def test_make_builds_once_and_the_firmware_prints_the_reference_classes(tmp_path: Path) -> None:
    build = tmp_path / "build"
    budget = f"SRAM={SRAM}"

    first = _make(build, budget)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "mpq search" in first.stdout and "mpq export" in first.stdout
    assert (build / "fashion.elf").is_file()
    plan = build / "fashion.plan.json"
    assert re.search(r"--sram 14000\b", first.stdout), "SRAM= must reach mpq search"

    # A second make is a no-op: nothing rebuilt, no file touched, and make -q agrees.
    before = _tree(build)
    second = _make(build, budget)
    assert second.returncode == 0, second.stderr
    said = [ln for ln in second.stdout.splitlines() if "ing directory" not in ln]
    assert said == ["make: Nothing to be done for 'all'."], second.stdout  # no recipe ran
    assert _make(build, budget, "-q").returncode == 0
    assert _tree(build) == before

    run = _make(build, budget, "run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = [(int(c), int(y)) for c, y in
               re.findall(r"^image \d+: class (\d+) \(label (\d+)\)$", run.stdout, re.M)]
    classes, labels = _reference_predictions(plan, tmp_path)
    assert [c for c, _ in printed] == classes
    assert [y for _, y in printed] == labels
    correct = sum(c == y for c, y in zip(classes, labels, strict=True))
    assert f"{correct} of {IMAGES} correct" in run.stdout
    assert _tree(build) == before  # running builds nothing either

    # The search options are inputs of the plan: another budget makes it out of date.
    assert _make(build, "SRAM=20000", "-q").returncode == 1
