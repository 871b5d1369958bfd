"""Several SRAM regions (issue 16 item 4, `mpq.regions`): boards rank their data regions, the
plan places the arena and the scratch in the fastest region that holds each, the linker script
puts them there (symbol addresses in the linked ELF), `mpq boards` shows the regions, and a
plan placed in the MPS2's block RAM still verifies under qemu-m4 at 0 mismatches."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_builders as B
import pytest
from conftest import REPO, run_mpq
from test_bad_input import assert_clean_failure

from mpq import firmware
from mpq.boards import board_dir, get_board
from mpq.codegen.render import render
from mpq.errors import MpqError
from mpq.regions import place_buffers, region_room

KB = 1024


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI")
        pytest.skip(f"{', '.join(missing)} not installed")


def test_shipped_boards_rank_their_data_regions() -> None:
    """RM0433 / RM0385 memory maps: DTCM first, then the AXI SRAM (H743) or SRAM1/2 (F746)."""
    h7 = [(r.name, r.origin, r.length) for r in get_board("stm32h743").data_regions]
    assert h7 == [("DTCMRAM", 0x20000000, 128 * KB), ("RAM_D1", 0x24000000, 512 * KB),
                  ("RAM_D2", 0x30000000, 288 * KB), ("RAM_D3", 0x38000000, 64 * KB)]
    f7 = [(r.name, r.origin, r.length) for r in get_board("stm32f746").data_regions]
    assert f7 == [("DTCMRAM", 0x20000000, 64 * KB), ("RAM", 0x20010000, 256 * KB)]
    assert get_board("nano33ble").data_regions == []


def test_mpq_boards_shows_the_regions() -> None:
    r = run_mpq("boards", "--json")
    assert r.returncode == 0, r.stderr
    h7 = next(b for b in json.loads(r.stdout) if b["name"] == "stm32h743")
    assert [(m["name"], m.get("speed")) for m in h7["memory"]] == [
        ("ITCMRAM", None), ("FLASH", None), ("DTCMRAM", 1), ("RAM_D1", 2), ("RAM_D2", 3),
        ("RAM_D3", 4)]
    r = subprocess.run([sys.executable, "-m", "mpq.cli", "boards"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "260"})
    assert r.returncode == 0, r.stderr
    assert "DTCMRAM 128 KiB, RAM_D1 512 KiB, RAM_D2 288 KiB, RAM_D3 64 KiB" in r.stdout
    assert "DTCMRAM 64 KiB, RAM 256 KiB" in r.stdout


def test_the_fastest_region_that_holds_each_part() -> None:
    """Arena first, then the scratch beside it; the main region offers its length less the
    stack, runtime reserve and input/output buffers."""
    h7 = get_board("stm32h743")
    assert place_buffers(h7, 100 * KB, 1000, 5000) == {"arena": "DTCMRAM", "scratch": "DTCMRAM"}
    assert place_buffers(h7, 128 * KB, 1000, 0) == {"arena": "DTCMRAM", "scratch": "RAM_D1"}
    assert place_buffers(h7, 200 * KB, 1000, 0) == {"arena": "RAM_D1", "scratch": "DTCMRAM"}
    assert region_room(h7, "RAM_D1", 700) == 512 * KB - 8192 - 16384 - 700
    assert region_room(h7, "RAM_D2", 700) == 288 * KB
    assert place_buffers(get_board("nano33ble"), 1000, 16, 0) is None


def test_a_speed_on_flash_is_refused(tmp_path: Path) -> None:
    text = (board_dir() / "stm32f412.toml").read_text().replace(
        'name = "stm32f412"', 'name = "bad"').replace(
        "length = 0x00100000     # 1 MB", "length = 0x00100000\nspeed = 1")
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(MpqError, match=r"memory\[0\]\.speed' ranks data memory"):
        get_board(str(tmp_path / "bad.toml"))


@pytest.fixture(scope="module")
def placed(tmp_path_factory) -> dict:
    """The two-head model searched (qe, layer-based) for stm32h743 and for an MPS2-AN386 board
    file that ranks its 16 KiB block RAM (0x01000000) before its SSRAM."""
    root = tmp_path_factory.mktemp("regions")
    onnx.save(B.two_head_model(), root / "heads.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "test.npz", x=rng.standard_normal((4, 3, 16, 16)).astype(np.float32))
    an386 = (board_dir() / "mps2-an386.toml").read_text()
    an386 = an386.replace('name = "mps2-an386"', 'name = "an386-bram"')
    an386 = an386.replace("length = 0x00004000     # 16 KiB block RAM",
                          "length = 0x00004000\nspeed = 1")
    an386 = an386.replace("length = 0x00400000     # 4 MiB ZBT SSRAM2/3",
                          "length = 0x00400000\nspeed = 2")
    (root / "an386-bram.toml").write_text(an386)
    plans = {}
    for name, board in (("h743", "stm32h743"), ("bram", str(root / "an386-bram.toml"))):
        plans[name] = root / f"{name}.plan.json"
        r = run_mpq("search", "heads.onnx", "--board", board, "--strategy", "qe",
                    "--patches", "none", "-o", plans[name], "-q", cwd=root)
        assert r.returncode == 0, r.stderr
    return {"root": root, "plans": plans}


def _elf_symbols(plan: Path, board, work: Path) -> dict[str, int]:
    """Export `plan`, link it for `board` (its linker script) with the firmware harness and
    return the addresses of the arena and scratch arrays (arm-none-eabi-nm)."""
    out = work / "export"
    r = run_mpq("export", plan, "-o", out)
    assert r.returncode == 0, r.stderr
    (out / "main.c").write_text(render("firmware/verify_main.c.j2", target="board", samples=1))
    sources = [out / "main.c", *sorted(out.glob("mpq_*.c"))]
    elf = firmware.build_elf(sources, [out], board, work / "build")
    nm = subprocess.run(["arm-none-eabi-nm", str(elf)], capture_output=True, text=True,
                        check=True).stdout
    return {m.group(2): int(m.group(1), 16)
            for m in re.finditer(r"^([0-9a-f]+) [bB] (mpq_arena|mpq_scratch)$", nm, re.M)}


def test_stm32h743_links_the_arena_into_dtcm(placed, tmp_path: Path) -> None:
    _need("arm-none-eabi-gcc", "arm-none-eabi-nm")
    plan = json.loads(placed["plans"]["h743"].read_text())
    assert plan["schedule"]["regions"] == {"arena": "DTCMRAM", "scratch": "DTCMRAM"}
    assert "scratch" in plan["schedule"]  # the kernels' scratch is inside the arena
    syms = _elf_symbols(placed["plans"]["h743"], get_board("stm32h743"), tmp_path)
    assert set(syms) == {"mpq_arena"}
    assert all(0x20000000 <= a < 0x20020000 for a in syms.values()), syms


def test_block_ram_placement_links_there_and_verifies_under_qemu(placed, tmp_path: Path) -> None:
    """QEMU's mps2-an386 linker script puts the arrays at 0x0100xxxx, where the plan placed
    them; the firmware runs from there with every output byte equal to the integer
    reference."""
    _need("arm-none-eabi-gcc", "arm-none-eabi-nm", "qemu-system-arm")
    path = placed["plans"]["bram"]
    assert json.loads(path.read_text())["schedule"]["regions"] == {"arena": "BRAM",
                                                                   "scratch": "BRAM"}
    syms = _elf_symbols(path, "qemu-m4", tmp_path)  # the script the verify firmware links with
    assert set(syms) == {"mpq_arena"}  # the kernels' scratch is inside the arena
    assert all(0x01000000 <= a < 0x01004000 for a in syms.values()), syms
    r = run_mpq("verify", path, "--data", placed["root"] / "test.npz", "--target", "qemu-m4",
                "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["mismatches"] == 0 and result["samples"] == 4


def test_a_tampered_placement_is_refused_in_one_line(placed, tmp_path: Path) -> None:
    data = json.loads(placed["plans"]["h743"].read_text())
    data["schedule"]["regions"]["arena"] = "RAM_D2"
    bad = placed["root"] / "bad-regions.plan.json"
    bad.write_text(json.dumps(data))
    r = run_mpq("export", bad, "-o", tmp_path / "out")
    assert_clean_failure(r, "schedule.regions", "DTCMRAM")
    assert not (tmp_path / "out").exists()
