"""Tests for the board files in boards/ and their loader, mpq.boards."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from mpq.boards import (
    Board,
    MemoryRegion,
    board_dir,
    board_from_dict,
    get_board,
    list_boards,
    load_board_file,
    plan_board,
)
from mpq.errors import MpqError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KB = 1024
MB = 1024 * KB

# SRAM region and Flash region sizes as DESIGN.md §9 gives them (the H743's arena region is its
# 512 KB AXI SRAM). nano33ble: the Arduino bootloader takes the first 64 KB of its 1 MB flash.
# The QEMU machines: 4 MiB code memory and 4 MiB SSRAM (shared/research/qemu-cortex-m.md).
DESIGN = {
    "nano33ble": {
        "core": "cortex-m4",
        "clock": 64_000_000,
        "sram": 256 * KB,
        "flash": 1 * MB - 64 * KB,
    },
    "stm32h743": {"core": "cortex-m7", "clock": 480_000_000, "sram": 512 * KB, "flash": 2 * MB},
    # stm32f746: RAM = SRAM1 + SRAM2 (256 KB); its 64 KB DTCM is a separate data region
    "stm32f746": {"core": "cortex-m7", "clock": 216_000_000, "sram": 256 * KB, "flash": 1 * MB},
    "stm32f412": {"core": "cortex-m4", "clock": 100_000_000, "sram": 256 * KB, "flash": 1 * MB},
    "mps2-an386": {"core": "cortex-m4", "clock": None, "sram": 4 * MB, "flash": 4 * MB},
    "mps2-an500": {"core": "cortex-m7", "clock": None, "sram": 4 * MB, "flash": 4 * MB},
}


def _raw(name: str) -> dict:
    """The board file as plain TOML, without going through the loader."""
    return tomllib.loads((board_dir() / f"{name}.toml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Shipped boards


def test_all_shipped_boards_load():
    boards = list_boards()
    names = [b.name for b in boards]
    assert names == sorted(names)
    assert set(DESIGN) <= set(names)
    for board in boards:
        assert isinstance(board, Board)
        assert board.path.stem == board.name
        assert all(isinstance(r, MemoryRegion) for r in board.memory)


@pytest.mark.parametrize("name", sorted(DESIGN))
def test_budgets_follow_design(name):
    board = get_board(name)
    want = DESIGN[name]
    reserve = _raw(name)["reserve"]
    assert board.core == want["core"]
    if want["clock"] is not None:
        assert board.clock_hz == want["clock"]
    assert board.sram_region_obj.length == want["sram"]
    assert board.flash_region_obj.length == want["flash"]
    assert board.sram_budget == want["sram"] - reserve["stack"] - reserve["runtime_sram"]
    assert board.flash_budget == want["flash"] - reserve["runtime_flash"]
    assert 0 < board.sram_budget < want["sram"]
    assert 0 < board.flash_budget < want["flash"]
    assert board.sram_region_obj.kind == "sram"
    assert board.flash_region_obj.kind == "flash"


def test_board_specifics():
    nano = get_board("nano33ble")
    assert nano.flash_region_obj.origin == 0x10000
    assert nano.flash_region_obj.origin + nano.flash_region_obj.length == 1 * MB
    assert nano.sram_region_obj.origin == 0x20000000

    h7 = get_board("stm32h743")
    assert h7.sram_region_obj.origin == 0x24000000
    assert h7.flash_region_obj.origin == 0x08000000
    assert [r.length for r in h7.memory if r.origin == 0x20000000] == [128 * KB]  # DTCM

    for name in ("stm32f746", "stm32f412"):
        assert get_board(name).flash_region_obj.origin == 0x08000000

    an386, an500 = get_board("mps2-an386"), get_board("mps2-an500")
    assert (an386.qemu_machine, an500.qemu_machine) == ("mps2-an386", "mps2-an500")
    for board in (an386, an500):
        assert board.flash_region_obj.origin == 0x0
        assert board.sram_region_obj.origin == 0x20000000
    assert 0x21000000 in {r.origin for r in an386.memory}  # PSRAM on an386
    assert 0x60000000 in {r.origin for r in an500.memory}  # PSRAM on an500


def test_cpu_flags():
    assert get_board("nano33ble").cpu_flags == [
        "-mcpu=cortex-m4",
        "-mthumb",
        "-mfloat-abi=hard",
        "-mfpu=fpv4-sp-d16",
    ]
    assert get_board("stm32h743").cpu_flags == [
        "-mcpu=cortex-m7",
        "-mthumb",
        "-mfloat-abi=hard",
        "-mfpu=fpv5-d16",
    ]
    assert get_board("stm32f746").cpu_flags[-1] == "-mfpu=fpv5-sp-d16"


def test_to_dict_is_json_and_deterministic():
    for board in list_boards():
        d = board.to_dict()
        text = json.dumps(d, sort_keys=True)
        assert text == json.dumps(get_board(board.name).to_dict(), sort_keys=True)
        assert str(board.path) not in text
        assert d["sram_budget"] == board.sram_budget
        assert d["flash_budget"] == board.flash_budget
        assert [r["name"] for r in d["memory"]] == [r.name for r in board.memory]


def test_a_plans_board_is_the_board_file_again():
    """A plan stores `to_dict()` with the search's budgets; rebuilding it gives the same board
    (without a file), whatever the budgets were overridden to."""
    for board in list_boards():
        d = {**board.to_dict(), "sram_budget": 1, "flash_budget": 2}
        again = board_from_dict(d, "plan: board")
        assert again == dataclasses.replace(board, path=None)
        assert plan_board(d) == again


def test_a_plans_board_fails_like_a_board_file():
    """The same checks and one-line messages as a TOML file, naming the plan's board."""
    d = get_board("nano33ble").to_dict()
    regions = d["memory"]
    overlap = [regions[0], {**regions[1], "origin": regions[0]["origin"]}]
    for change, fragment in (({"name": "a/b"}, "'name'"), ({"core": "cortex-m0"}, "'core'"),
                             ({"memory": overlap}, "overlaps"), ({"extra": 1}, "'extra'"),
                             ({"qemu_machine": "mps2-an500"}, "'qemu_machine'")):
        with pytest.raises(MpqError) as info:
            board_from_dict({**d, **change}, "plan: board")
        msg = str(info.value)
        assert msg.startswith("plan: board: ") and fragment in msg and "\n" not in msg
    with pytest.raises(MpqError, match="must be a table"):
        plan_board(["nano33ble"])


def test_an_older_plans_board_is_a_shipped_name_only():
    """Plans that stored only the name and budgets get the shipped board of that name; a
    name that is a path or no shipped board is an error, never a file read."""
    old = {"name": "stm32f412", "core": "cortex-m4", "sram_budget": 1, "flash_budget": 2}
    assert plan_board(old) == get_board("stm32f412")
    for name in ("esp32", "../boards/nano33ble", "nano33ble.toml", 7):
        with pytest.raises(MpqError, match="unknown board"):
            plan_board({**old, "name": name})


def test_board_is_frozen():
    board = get_board("stm32f412")
    with pytest.raises(dataclasses.FrozenInstanceError):
        board.name = "other"  # type: ignore[misc]


def test_unknown_board_lists_known():
    with pytest.raises(MpqError) as info:
        get_board("esp32")
    msg = str(info.value)
    assert "esp32" in msg and "nano33ble" in msg and "stm32h743" in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------------------------
# User boards and malformed files

VALID = """\
name = "myboard"
description = "My board"
mcu = "STM32F401"
core = "cortex-m4"
fpu = "fpv4-sp-d16"
clock_hz = 84_000_000

[[memory]]
name = "FLASH"
kind = "flash"
origin = 0x08000000
length = 0x00080000

[[memory]]
name = "RAM"
kind = "sram"
origin = 0x20000000
length = 0x00018000

[budget]
flash_region = "FLASH"
sram_region = "RAM"

[reserve]
stack = 4096
runtime_sram = 8192
runtime_flash = 32768
"""


def _write(tmp_path: Path, text: str, stem: str = "myboard") -> Path:
    path = tmp_path / f"{stem}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_user_board_by_path(tmp_path):
    path = _write(tmp_path, VALID)
    board = get_board(str(path))
    assert board == load_board_file(path)
    assert board.name == "myboard"
    assert board.path == path
    assert board.qemu_machine is None
    assert board.sram_budget == 0x18000 - 4096 - 8192
    assert board.flash_budget == 0x80000 - 32768


def test_user_board_relative_path(tmp_path, monkeypatch):
    _write(tmp_path, VALID)
    monkeypatch.chdir(tmp_path)
    assert get_board("myboard.toml").name == "myboard"
    assert get_board("./myboard.toml").name == "myboard"


def test_fpu_none_is_soft_float(tmp_path):
    board = get_board(str(_write(tmp_path, VALID.replace('"fpv4-sp-d16"', '"none"'))))
    assert board.cpu_flags == ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"]


def test_hex_and_decimal_integers_agree(tmp_path):
    text = VALID.replace("length = 0x00018000", "length = 98304")
    assert get_board(str(_write(tmp_path, text))).sram_region_obj.length == 0x18000


OVERLAP = VALID.replace("origin = 0x20000000", "origin = 0x08070000")

# (case id, new file text, text the message must contain)
MALFORMED = [
    ("missing core", VALID.replace('core = "cortex-m4"\n', ""), "missing field 'core'"),
    (
        "missing region length",
        VALID.replace("length = 0x00018000\n", ""),
        "missing field 'memory[1].length'",
    ),
    ("missing reserve table", VALID.split("[reserve]")[0], "missing field 'reserve'"),
    (
        "length is a string",
        VALID.replace("length = 0x00018000", 'length = "abc"'),
        "field 'memory[1].length' must be a positive integer, got \"abc\"",
    ),
    ("length is zero", VALID.replace("length = 0x00018000", "length = 0"), "'memory[1].length'"),
    (
        "clock is a string",
        VALID.replace("clock_hz = 84_000_000", 'clock_hz = "84MHz"'),
        "'clock_hz'",
    ),
    ("clock is a bool", VALID.replace("clock_hz = 84_000_000", "clock_hz = true"), "'clock_hz'"),
    ("description not a string", VALID.replace('"My board"', "3"), "'description'"),
    (
        "memory not an array",
        VALID.split("[[memory]]")[0]
        + 'memory = "lots"\n'
        + "[budget]"
        + VALID.split("[budget]")[1],
        "'memory'",
    ),
    ("unknown core", VALID.replace('"cortex-m4"', '"cortex-m3"'), "'core'"),
    ("unknown fpu", VALID.replace('"fpv4-sp-d16"', '"vfpv3"'), "'fpu'"),
    ("fpu the core lacks", VALID.replace('"fpv4-sp-d16"', '"fpv5-d16"'), "'fpu'"),
    ("unknown kind", VALID.replace('kind = "sram"', 'kind = "eeprom"'), "'memory[1].kind'"),
    ("overlapping regions", OVERLAP, "'memory[1]'"),
    (
        "duplicate region name",
        VALID.replace('name = "RAM"', 'name = "FLASH"'),
        "'memory[1].name'",
    ),
    (
        "region name not an identifier",
        VALID.replace('name = "RAM"', 'name = "ram-1"'),
        "'memory[1].name'",
    ),
    (
        "region past 4 GiB",
        VALID.replace("origin = 0x20000000", "origin = 0xFFFF0000"),
        "'memory[1].length'",
    ),
    (
        "sram budget region is flash",
        VALID.replace('sram_region = "RAM"', 'sram_region = "FLASH"'),
        "'budget.sram_region'",
    ),
    (
        "flash budget region is sram",
        VALID.replace('flash_region = "FLASH"', 'flash_region = "RAM"'),
        "'budget.flash_region'",
    ),
    (
        "budget region missing",
        VALID.replace('sram_region = "RAM"', 'sram_region = "SRAM1"'),
        "'budget.sram_region'",
    ),
    ("negative reserve", VALID.replace("stack = 4096", "stack = -1"), "'reserve.stack'"),
    (
        "sram reserve too large",
        VALID.replace("runtime_sram = 8192", "runtime_sram = 0x18000"),
        "'reserve.runtime_sram'",
    ),
    (
        "flash reserve too large",
        VALID.replace("runtime_flash = 32768", "runtime_flash = 0x80000"),
        "'reserve.runtime_flash'",
    ),
    ("unknown field", VALID.replace("clock_hz", 'colour = "blue"\nclock_hz'), "'colour'"),
    (
        "unknown region field",
        VALID.replace("length = 0x00018000", "length = 0x00018000\nwait_states = 1"),
        "'memory[1].wait_states'",
    ),
    (
        "qemu machine with another core",
        VALID.replace("clock_hz", 'qemu_machine = "mps2-an500"\nclock_hz'),
        "'qemu_machine'",
    ),
    (
        "name differs from file stem",
        VALID.replace('name = "myboard"', 'name = "otherboard"'),
        "field 'name'",
    ),
    ("invalid TOML", VALID.replace('mcu = "STM32F401"', "mcu = = STM32F401"), "invalid TOML: "),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_board_is_one_line_error(tmp_path, text, expected):
    path = _write(tmp_path, text)
    for load in (lambda: load_board_file(path), lambda: get_board(str(path))):
        with pytest.raises(MpqError) as info:
            load()
        msg = str(info.value)
        assert "\n" not in msg and "\r" not in msg
        where, _, what = msg.partition(": ")
        assert where.endswith("myboard.toml"), msg
        assert expected in what, msg


def test_invalid_toml_names_the_line(tmp_path):
    path = _write(tmp_path, VALID.replace('mcu = "STM32F401"', "mcu = = STM32F401"))
    with pytest.raises(MpqError, match=r"invalid TOML: .*\(line 3\)$"):
        load_board_file(path)


def test_error_names_file_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "boards").mkdir()
    _write(tmp_path / "boards", VALID.replace('core = "cortex-m4"\n', ""))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MpqError) as info:
        get_board("boards/myboard.toml")
    assert str(info.value) == "boards/myboard.toml: missing field 'core'"


def test_missing_file(tmp_path):
    with pytest.raises(MpqError, match="nothere.toml"):
        get_board(str(tmp_path / "nothere.toml"))
