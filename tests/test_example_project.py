"""examples/firmware: the Makefile a user copies — mpq search and mpq export as make rules, a
firmware ELF built with arm-none-eabi-gcc and newlib, run under qemu-system-arm.

Needs make, arm-none-eabi-gcc with newlib (rdimon.specs) and qemu-system-arm; skipped without
them, except under CI (which installs them: see shared/research/qemu-cortex-m.md, "Install").
"""

from __future__ import annotations

import json
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


def _assert_prints_reference(run: subprocess.CompletedProcess, plan: Path, tmp: Path) -> None:
    """`make run` succeeded and printed, per image, the integer reference's class and the label,
    then the count of correct ones."""
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = [(int(c), int(y)) for c, y in
               re.findall(r"^image \d+: class (\d+) \(label (\d+)\)$", run.stdout, re.M)]
    classes, labels = _reference_predictions(plan, tmp)
    assert [c for c, _ in printed] == classes
    assert [y for _, y in printed] == labels
    correct = sum(c == y for c, y in zip(classes, labels, strict=True))
    assert f"{correct} of {IMAGES} correct" in run.stdout


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
    _assert_prints_reference(run, plan, tmp_path)
    assert "-M mps2-an386 " in run.stdout
    assert _tree(build) == before  # running builds nothing either

    # The search options are inputs of the plan: another budget makes it out of date.
    assert _make(build, "SRAM=20000", "-q").returncode == 1


def _boards() -> list[dict]:
    """What `mpq boards --json` says, as the Makefile reads it."""
    mpq = Path(sys.executable).parent / "mpq"
    out = subprocess.run([str(mpq), "boards", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_make_run_runs_a_cortex_m7_board_on_its_own_qemu_machine(tmp_path: Path) -> None:
    m7 = [b["name"] for b in _boards() if b.get("qemu_machine") and b["core"] == "cortex-m7"]
    assert m7, "no shipped Cortex-M7 board names a qemu_machine"
    build = tmp_path / "build"
    run = _make(build, f"SRAM={SRAM}", f"BOARD={m7[0]}", "run")  # builds, then runs
    _assert_prints_reference(run, build / "fashion.plan.json", tmp_path)
    machine = next(b["qemu_machine"] for b in _boards() if b["name"] == m7[0])
    assert f"-M {machine} " in run.stdout
    assert "-mcpu=cortex-m7" in run.stdout


def test_make_run_refuses_a_board_qemu_does_not_emulate_and_runs_it_on_a_qemu_board(
        tmp_path: Path) -> None:
    # nano33ble is the case: `make run` used to reach QEMU and fail there
    # ("Use -machine help"); the board file has no qemu_machine because QEMU has no nRF52840.
    boards = _boards()
    board = next(b for b in boards if b["name"] == "nano33ble")
    assert not board.get("qemu_machine")
    emulated = sorted(b["name"] for b in boards if b.get("qemu_machine"))
    same_core = next(b["name"] for b in boards
                     if b.get("qemu_machine") and b["core"] == board["core"])
    other_core = next(b["name"] for b in boards
                      if b.get("qemu_machine") and b["core"] != board["core"])
    build = tmp_path / "build"

    refused = _make(build, "BOARD=nano33ble", "run")
    assert refused.returncode != 0
    said = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert len(said) == 1, refused.stderr
    assert "board 'nano33ble' has no qemu_machine" in said[0]
    assert f"boards QEMU emulates: {', '.join(emulated)} (QEMU_BOARD={same_core} " in said[0]
    assert "mpq search" not in refused.stdout and not build.exists()  # nothing was built

    # An unknown board, or a QEMU board of another core, is refused the same way.
    for args, why in ((["BOARD=no-such-board"], "unknown board 'no-such-board'"),
                      (["BOARD=nano33ble", f"QEMU_BOARD={other_core}"],
                       f"board 'nano33ble' a {board['core']}")):
        bad = _make(build, *args, "run")
        said = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert bad.returncode != 0 and len(said) == 1 and why in said[0], bad.stderr
        assert not build.exists()

    # Building without running still works for it: only `make run` needs QEMU.
    budget = f"SRAM={SRAM}"
    built = _make(build, budget, "BOARD=nano33ble")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (build / "fashion.elf").is_file()

    # QEMU_BOARD runs this plan's objects, linked for the QEMU board's memory map, on its
    # machine, without searching or compiling again.
    run = _make(build, budget, "BOARD=nano33ble", f"QEMU_BOARD={same_core}", "run")
    _assert_prints_reference(run, build / "fashion.plan.json", tmp_path)
    assert "mpq search" not in run.stdout and " -c " not in run.stdout
    machine = next(b["qemu_machine"] for b in boards if b["name"] == same_core)
    assert f"-M {machine} " in run.stdout
    assert f"qemu-{same_core}/fashion.elf" in run.stdout
