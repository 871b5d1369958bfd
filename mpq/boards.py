"""Board descriptions: the TOML files in ``boards/`` and the :class:`Board` objects built from them.

A board file names the MCU and its core, FPU and clock, lists the memory regions the linker may
use, says which region holds weights and code (``budget.flash_region``) and which holds the
tensor arena, stack and ``.data``/``.bss`` (``budget.sram_region``), and how many bytes the rest of
the firmware needs there (``reserve``). The search budgets are what is left::

    sram_budget  = length(sram_region)  - reserve.stack - reserve.runtime_sram
    flash_budget = length(flash_region) - reserve.runtime_flash

Schema (exactly these keys; integers may be written in hex, e.g. ``0x20000000``)::

    name = "nano33ble"            # must equal the file stem
    description = "Arduino Nano 33 BLE (Nordic nRF52840)"
    mcu = "nRF52840"
    core = "cortex-m4"            # cortex-m4 | cortex-m7 | cortex-m33 | cortex-m55
    fpu = "fpv4-sp-d16"           # fpv4-sp-d16 | fpv5-d16 | fpv5-sp-d16 | none
    clock_hz = 64_000_000
    qemu_machine = "mps2-an386"   # optional: the QEMU machine that runs this board's code

    [[memory]]                    # one table per region, in address order or not
    name = "FLASH"                # linker-script identifier: A-Z, 0-9, _
    kind = "flash"                # flash | sram
    origin = 0x00010000
    length = 0x000F0000
    speed = 1                     # optional, sram only: speed rank (1 = fastest); the ranked
                                  # regions are the data regions the arena may go to
                                  # (`mpq.regions`)

    [budget]
    flash_region = "FLASH"
    sram_region = "RAM"

    [reserve]
    stack = 8192                  # bytes, taken from sram_region
    runtime_sram = 16384          # .data/.bss/heap of the rest of the firmware
    runtime_flash = 65536         # code of the rest of the firmware

Shipped boards live in :func:`board_dir`; a user adds a board by writing such a file and passing
its path wherever a board name is accepted. Every problem in a file raises
:class:`mpq.errors.MpqError` with a one-line message naming the file and the field.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.resources import data_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "CORES",
    "FPUS",
    "MEMORY_KINDS",
    "Board",
    "MemoryRegion",
    "board_dir",
    "board_from_dict",
    "get_board",
    "list_boards",
    "load_board_file",
    "plan_board",
]

#: Cores a board may name, each with the FPUs that core can have (``none`` = soft float).
CORES: dict[str, tuple[str, ...]] = {
    "cortex-m4": ("fpv4-sp-d16", "none"),
    "cortex-m7": ("fpv5-d16", "fpv5-sp-d16", "none"),
    "cortex-m33": ("fpv5-sp-d16", "none"),
    "cortex-m55": ("fpv5-d16", "fpv5-sp-d16", "none"),
}
#: Every FPU name accepted in a board file (GCC's ``-mfpu`` spelling, or ``none``).
FPUS: tuple[str, ...] = ("fpv4-sp-d16", "fpv5-d16", "fpv5-sp-d16", "none")
#: Memory region kinds.
MEMORY_KINDS: tuple[str, ...] = ("flash", "sram")

# The CPU each QEMU machine models; QEMU cannot swap it (``-cpu`` is refused), so a board's core
# must match. Machines not listed here are accepted unchecked.
_QEMU_MACHINE_CORES: dict[str, str] = {
    "mps2-an385": "cortex-m3",
    "mps2-an386": "cortex-m4",
    "mps2-an500": "cortex-m7",
    "mps2-an505": "cortex-m33",
    "mps2-an521": "cortex-m33",
    "mps3-an524": "cortex-m33",
    "mps3-an547": "cortex-m55",
    "netduinoplus2": "cortex-m4",
    "netduino2": "cortex-m3",
}

_TOP_KEYS = (
    "name",
    "description",
    "mcu",
    "core",
    "fpu",
    "clock_hz",
    "qemu_machine",
    "memory",
    "budget",
    "reserve",
)
_OPTIONAL_TOP_KEYS = ("qemu_machine",)
_REGION_KEYS = ("name", "kind", "origin", "length", "speed")
_OPTIONAL_REGION_KEYS = ("speed",)
_BUDGET_KEYS = ("flash_region", "sram_region")
_RESERVE_KEYS = ("stack", "runtime_sram", "runtime_flash")

# A board name becomes a file name (`<name>.ld`) and a make word in generated files: no path
# separator, no leading dot, nothing make or a shell would read, and short enough for any file
# system.
_BOARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REGION_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_ADDRESS_SPACE = 1 << 32


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous memory region as the linker sees it (a line of the ``MEMORY`` block)."""

    name: str
    kind: str  # "flash" | "sram"
    origin: int
    length: int
    speed: int | None = None  # speed rank of a data region (1 = fastest); None: not ranked

    @property
    def end(self) -> int:
        """First address after the region."""
        return self.origin + self.length

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, keys in schema order (`speed` only when ranked)."""
        out = {"name": self.name, "kind": self.kind, "origin": self.origin,
               "length": self.length}
        if self.speed is not None:
            out["speed"] = self.speed
        return out


@dataclass(frozen=True)
class Board:
    """A validated board description (see the module docstring for the file format)."""

    name: str
    description: str
    mcu: str
    core: str
    fpu: str
    clock_hz: int
    qemu_machine: str | None
    memory: tuple[MemoryRegion, ...]
    flash_region: str
    sram_region: str
    reserve_stack: int
    reserve_runtime_sram: int
    reserve_runtime_flash: int
    path: Path | None  # the TOML file; None for a board rebuilt from a plan

    def region(self, name: str) -> MemoryRegion:
        """The memory region called ``name``; :class:`MpqError` if the board has none."""
        for region in self.memory:
            if region.name == name:
                return region
        known = ", ".join(r.name for r in self.memory)
        raise MpqError(f"board '{self.name}' has no memory region '{name}' (it has: {known})")

    @property
    def sram_region_obj(self) -> MemoryRegion:
        """The region that holds the tensor arena, the stack and ``.data``/``.bss``."""
        return self.region(self.sram_region)

    @property
    def data_regions(self) -> list[MemoryRegion]:
        """The SRAM regions with a speed rank, fastest first (file order among equals): where
        the plan may place the arena and the scratch (`mpq.regions`)."""
        ranked = [r for r in self.memory if r.speed is not None]
        return sorted(ranked, key=lambda r: (r.speed, self.memory.index(r)))

    @property
    def flash_region_obj(self) -> MemoryRegion:
        """The region that holds weights and code."""
        return self.region(self.flash_region)

    @property
    def sram_budget(self) -> int:
        """Bytes of SRAM mpq may use: the SRAM region minus stack and runtime reserves."""
        return self.sram_region_obj.length - self.reserve_stack - self.reserve_runtime_sram

    @property
    def flash_budget(self) -> int:
        """Bytes of Flash mpq may use (weights and its kernels): the region minus the runtime."""
        return self.flash_region_obj.length - self.reserve_runtime_flash

    @property
    def cpu_flags(self) -> list[str]:
        """GCC flags selecting this board's core and floating-point ABI."""
        flags = [f"-mcpu={self.core}", "-mthumb"]
        if self.fpu == "none":
            flags.append("-mfloat-abi=soft")
        else:
            flags += ["-mfloat-abi=hard", f"-mfpu={self.fpu}"]
        return flags

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, deterministic description: the file's fields plus the two budgets.

        The file path is left out on purpose so that a plan embedding this does not depend on
        where the board file sits on disk.
        """
        return {
            "name": self.name,
            "description": self.description,
            "mcu": self.mcu,
            "core": self.core,
            "fpu": self.fpu,
            "clock_hz": self.clock_hz,
            "qemu_machine": self.qemu_machine,
            "memory": [region.to_dict() for region in self.memory],
            "budget": {"flash_region": self.flash_region, "sram_region": self.sram_region},
            "reserve": {
                "stack": self.reserve_stack,
                "runtime_sram": self.reserve_runtime_sram,
                "runtime_flash": self.reserve_runtime_flash,
            },
            "sram_budget": self.sram_budget,
            "flash_budget": self.flash_budget,
        }


# ---------------------------------------------------------------------------------------------
# Public functions


def board_dir() -> Path:
    """Directory of the boards shipped with mpq (``boards/`` in a checkout, ``mpq/boards`` in a
    wheel)."""
    return data_dir("boards")


def load_board_file(path: Path) -> Board:
    """Read, validate and return the board described by the TOML file ``path``.

    Raises :class:`MpqError` (one line, naming the file and the field) on any problem.
    """
    path = Path(path)
    src = _display(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MpqError(f"{src}: no such board file") from None
    except OSError as exc:
        raise MpqError(f"{src}: cannot read board file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MpqError(f"{src}: invalid TOML: not UTF-8 (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MpqError(f"{src}: invalid TOML: {_toml_reason(exc, text)}") from None
    return _parse(data, src, path)


def list_boards() -> list[Board]:
    """All boards shipped in :func:`board_dir`, sorted by name."""
    boards = [load_board_file(p) for p in sorted(board_dir().glob("*.toml"))]
    return sorted(boards, key=lambda b: b.name)


def get_board(name_or_path: str) -> Board:
    """The board called ``name_or_path`` in :func:`board_dir`, or the one in the TOML file at
    that path (anything ending in ``.toml`` or containing a path separator is a path).

    An unknown name raises :class:`MpqError` listing the known boards.
    """
    text = str(name_or_path)
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if text.endswith(".toml") or any(s in text for s in seps):
        return load_board_file(Path(text))
    candidate = board_dir() / f"{text}.toml"
    if _BOARD_NAME_RE.match(text) and candidate.is_file():
        return load_board_file(candidate)
    known = ", ".join(p.stem for p in sorted(board_dir().glob("*.toml"))) or "none"
    raise MpqError(
        f"unknown board '{text}'; known boards: {known} (or give the path of a .toml file)"
    )


#: Keys a plan's board carries besides the board file's: the search's budgets (the board's own,
#: or the ``--sram``/``--flash`` overrides), which are not part of the board's description.
PLAN_BUDGET_KEYS = ("sram_budget", "flash_budget")


def board_from_dict(data: Any, src: str) -> Board:
    """The board described by ``data`` — :meth:`Board.to_dict`'s form, as a plan stores it —
    validated exactly like a board file (shown as ``src`` in errors).

    A plan is as untrusted as a board file: its board names the linker script, goes into
    generated comments and decides the memory map, so it gets the same checks. The budget keys
    (:data:`PLAN_BUDGET_KEYS`) are derived or the search's overrides, not the board's, and are
    ignored; ``qemu_machine: null`` means the board has none (how ``to_dict`` writes it).
    """
    c = _Checker(src)
    data = c.table(data, "board")
    fields = {k: v for k, v in data.items() if k not in PLAN_BUDGET_KEYS}
    if fields.get("qemu_machine", "") is None:
        del fields["qemu_machine"]
    return _parse(fields, src, None)


def plan_board(board: Any) -> Board:
    """The board a plan was searched for, from the plan's ``board`` object.

    A plan carries its whole board (:func:`board_from_dict`), so a plan searched with
    ``--board ./myboard.toml`` exports anywhere and a file named like a shipped board is never
    swapped for it. Older plans carry only the name and budgets; they get the shipped board of
    that name (a name only — never a path from the plan).
    """
    src = "plan: board"
    if isinstance(board, dict) and "memory" not in board:
        name = board.get("name")
        if isinstance(name, str) and _BOARD_NAME_RE.match(name) \
                and (board_dir() / f"{name}.toml").is_file():
            return load_board_file(board_dir() / f"{name}.toml")
        known = ", ".join(p.stem for p in sorted(board_dir().glob("*.toml"))) or "none"
        raise MpqError(f"{src}: unknown board {_show(name)} (the plan carries only its name; "
                       f"known boards: {known}; search again with --board FILE)")
    return board_from_dict(board, src)


# ---------------------------------------------------------------------------------------------
# Validation


def _display(path: Path) -> str:
    """The path as shown in messages: relative to the working directory when below it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


def _toml_reason(exc: Exception, text: str) -> str:
    """``<reason> (line N)`` from a TOML decode error, on one line."""
    msg = " ".join(str(exc).split())
    lineno = getattr(exc, "lineno", None)
    m = re.search(r"\s*\(at line (\d+), column \d+\)$", msg)
    if m:
        msg, lineno = msg[: m.start()], int(m.group(1))
    else:
        m = re.search(r"\s*\(at end of document\)$", msg)
        if m:
            msg = msg[: m.start()]
            if lineno is None:
                lineno = max(1, len(text.splitlines()))
    return f"{msg} (line {lineno})" if lineno is not None else msg


def _show(value: Any) -> str:
    """A value as quoted in an error message: JSON-like, one line, at most 60 characters."""
    try:
        shown = json.dumps(value, default=str)
    except (TypeError, ValueError):
        shown = repr(value)
    shown = " ".join(shown.split())
    return shown if len(shown) <= 60 else shown[:57] + "..."


class _Checker:
    """Collects field access for one file and raises the one-line errors."""

    def __init__(self, src: str) -> None:
        self.src = src

    def fail(self, message: str) -> MpqError:
        return MpqError(f"{self.src}: {message}")

    def table(self, data: Any, field: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(f"field '{field}' must be a table, got {_show(data)}")
        return data

    def keys(self, data: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in data:
            if key not in allowed:
                raise self.fail(f"unknown field '{prefix}{key}' (allowed: {', '.join(allowed)})")

    def require(self, data: dict[str, Any], key: str, prefix: str) -> Any:
        if key not in data:
            raise self.fail(f"missing field '{prefix}{key}'")
        return data[key]

    def string(self, data: dict[str, Any], key: str, prefix: str = "") -> str:
        value = self.require(data, key, prefix)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"field '{prefix}{key}' must be a non-empty string, got {_show(value)}")
        return value

    def choice(
        self, data: dict[str, Any], key: str, choices: tuple[str, ...], prefix: str = ""
    ) -> str:
        value = self.require(data, key, prefix)
        if not isinstance(value, str) or value not in choices:
            raise self.fail(
                f"field '{prefix}{key}' must be one of {', '.join(choices)}, got {_show(value)}"
            )
        return value

    def integer(self, data: dict[str, Any], key: str, prefix: str = "", *, positive: bool) -> int:
        value = self.require(data, key, prefix)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < (1 if positive else 0):
            what = "a positive integer" if positive else "a non-negative integer"
            raise self.fail(f"field '{prefix}{key}' must be {what}, got {_show(value)}")
        return value


def _parse(data: dict[str, Any], src: str, path: Path | None) -> Board:
    """Validate the decoded TOML ``data`` of the file ``path`` (shown as ``src``); with no file
    (a board a plan carries), the name need not match a file name."""
    c = _Checker(src)
    c.keys(data, _TOP_KEYS, "")
    for key in _TOP_KEYS:
        if key not in _OPTIONAL_TOP_KEYS:
            c.require(data, key, "")

    name = c.string(data, "name")
    if not _BOARD_NAME_RE.match(name):
        raise c.fail(f"field 'name' must be at most 64 letters, digits, '.', '_' or '-' "
                     f"(not starting with '.', '_' or '-'), got {_show(name)}")
    if path is not None and name != path.stem:
        raise c.fail(f"field 'name' must equal the file name '{path.stem}', got {_show(name)}")
    description = c.string(data, "description")
    mcu = c.string(data, "mcu")
    core = c.choice(data, "core", tuple(CORES))
    fpu = c.choice(data, "fpu", FPUS)
    if fpu not in CORES[core]:
        raise c.fail(
            f"field 'fpu' must be one of {', '.join(CORES[core])} for core '{core}', "
            f"got {_show(fpu)}"
        )
    clock_hz = c.integer(data, "clock_hz", positive=True)
    qemu_machine: str | None = None
    if "qemu_machine" in data:
        qemu_machine = c.string(data, "qemu_machine")
        machine_core = _QEMU_MACHINE_CORES.get(qemu_machine)
        if machine_core is not None and machine_core != core:
            raise c.fail(
                f"field 'qemu_machine' {_show(qemu_machine)} emulates a {machine_core}, "
                f"but field 'core' is {_show(core)}"
            )

    memory = _parse_memory(c, data["memory"])
    by_name = {r.name: r for r in memory}

    budget = c.table(data["budget"], "budget")
    c.keys(budget, _BUDGET_KEYS, "budget.")
    regions: dict[str, MemoryRegion] = {}
    for key, kind in (("flash_region", "flash"), ("sram_region", "sram")):
        region_name = c.string(budget, key, "budget.")
        if region_name not in by_name:
            raise c.fail(
                f"field 'budget.{key}' names no memory region: {_show(region_name)} "
                f"(regions: {', '.join(by_name)})"
            )
        region = by_name[region_name]
        if region.kind != kind:
            raise c.fail(
                f"field 'budget.{key}' must name a region of kind '{kind}', "
                f"but {_show(region_name)} is '{region.kind}'"
            )
        regions[key] = region

    reserve = c.table(data["reserve"], "reserve")
    c.keys(reserve, _RESERVE_KEYS, "reserve.")
    stack = c.integer(reserve, "stack", "reserve.", positive=False)
    runtime_sram = c.integer(reserve, "runtime_sram", "reserve.", positive=False)
    runtime_flash = c.integer(reserve, "runtime_flash", "reserve.", positive=False)
    sram = regions["sram_region"]
    if stack + runtime_sram >= sram.length:
        raise c.fail(
            f"fields 'reserve.stack' + 'reserve.runtime_sram' ({stack + runtime_sram} bytes) "
            f"must be smaller than region '{sram.name}' ({sram.length} bytes)"
        )
    flash = regions["flash_region"]
    if runtime_flash >= flash.length:
        raise c.fail(
            f"field 'reserve.runtime_flash' ({runtime_flash} bytes) must be smaller than "
            f"region '{flash.name}' ({flash.length} bytes)"
        )

    return Board(
        name=name,
        description=description,
        mcu=mcu,
        core=core,
        fpu=fpu,
        clock_hz=clock_hz,
        qemu_machine=qemu_machine,
        memory=memory,
        flash_region=flash.name,
        sram_region=sram.name,
        reserve_stack=stack,
        reserve_runtime_sram=runtime_sram,
        reserve_runtime_flash=runtime_flash,
        path=path,
    )


def _parse_memory(c: _Checker, entries: Any) -> tuple[MemoryRegion, ...]:
    """Validate the ``[[memory]]`` array: field types, unique names, no overlaps."""
    if not isinstance(entries, list) or not entries:
        raise c.fail(f"field 'memory' must be a non-empty array of tables, got {_show(entries)}")
    regions: list[MemoryRegion] = []
    for i, entry in enumerate(entries):
        prefix = f"memory[{i}]."
        entry = c.table(entry, f"memory[{i}]")
        c.keys(entry, _REGION_KEYS, prefix)
        for key in _REGION_KEYS:
            if key not in _OPTIONAL_REGION_KEYS:
                c.require(entry, key, prefix)
        name = c.string(entry, "name", prefix)
        if not _REGION_NAME_RE.match(name):
            raise c.fail(
                f"field '{prefix}name' must be a linker identifier (A-Z, 0-9, _, not starting "
                f"with a digit), got {_show(name)}"
            )
        kind = c.choice(entry, "kind", MEMORY_KINDS, prefix)
        origin = c.integer(entry, "origin", prefix, positive=False)
        length = c.integer(entry, "length", prefix, positive=True)
        if origin + length > _ADDRESS_SPACE:
            raise c.fail(
                f"field '{prefix}length' takes region '{name}' past the 4 GiB address space "
                f"(0x{origin:08X} + 0x{length:X})"
            )
        for j, other in enumerate(regions):
            if other.name == name:
                raise c.fail(f"field '{prefix}name' repeats {_show(name)} from memory[{j}]")
            if origin < other.end and other.origin < origin + length:
                raise c.fail(
                    f"field 'memory[{i}]' ({name} 0x{origin:08X}..0x{origin + length - 1:08X}) "
                    f"overlaps memory[{j}] ({other.name} "
                    f"0x{other.origin:08X}..0x{other.end - 1:08X})"
                )
        speed = None
        if "speed" in entry:
            speed = c.integer(entry, "speed", prefix, positive=True)
            if kind != "sram":
                raise c.fail(f"field '{prefix}speed' ranks data memory: region {_show(name)} "
                             f"is '{kind}'")
        regions.append(MemoryRegion(name=name, kind=kind, origin=origin, length=length,
                                    speed=speed))
    return tuple(regions)
