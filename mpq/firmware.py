"""Building bare-metal Cortex-M firmware and running it under QEMU with exact instruction counts.

This is the machinery behind ``mpq verify --target qemu-m4|qemu-m7`` and the export tests:

* :func:`require_tools` finds the cross compiler, binutils, ``qemu-system-arm`` and host ``gcc``;
* :func:`build_elf` renders the start-up code and semihosting helpers (``templates/firmware/``)
  and the board's linker script (``templates/linker/board.ld.j2``), then compiles and links
  with ``arm-none-eabi-gcc -nostdlib``; a linker region overflow becomes one :class:`MpqError`
  line;
* :func:`library_objects` compiles third-party sources (CMSIS-NN, for the cmsis-nn backend)
  with the board's flags into cached objects that :func:`build_elf` links;
* :func:`section_sizes` / :func:`memory_usage` report what the ELF needs in flash and SRAM;
* :func:`run_qemu` runs the ELF on an MPS2 machine with semihosting (console, host files, exit
  code) and the ``tools/icount/icount.c`` TCG plugin, which :func:`icount_plugin` builds with the
  host compiler on first use.

The facts this relies on are in ``shared/research/qemu-cortex-m.md`` (QEMU 7.2, Debian bookworm):
``mps2-an386`` is the Cortex-M4 and ``mps2-an500`` the Cortex-M7 machine; QEMU takes SP/PC from the
vector table at address 0 and ignores the ELF entry point; semihosting ``SYS_EXIT_EXTENDED``
sets QEMU's exit status; a fault without a usable handler aborts QEMU (SIGABRT, rc 134); with
``-icount shift=0,align=off,sleep=off`` and the per-instruction plugin the counts are identical
from run to run.

A firmware program is ordinary C with ``int main(void)``; it includes ``mpq_semihost.h`` for
console output, host files and the instruction-count window markers ``mpq_window_start()`` /
``mpq_window_stop()``. Exiting ``main`` exits QEMU with its return value; a fault prints the
fault status registers and exits with :data:`FAULT_EXIT_CODE`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpq.boards import Board, get_board
from mpq.codegen.render import linker_script, render
from mpq.errors import MpqError
from mpq.resources import data_dir

_LOG = logging.getLogger(__name__)  # `mpq -v`: the commands run

__all__ = [
    "DEFAULT_WINDOW",
    "FAULT_EXIT_CODE",
    "TARGETS",
    "QemuRun",
    "Toolchain",
    "build_elf",
    "icount_plugin",
    "library_objects",
    "memory_usage",
    "require_tools",
    "run_qemu",
    "section_sizes",
    "symbol_addresses",
    "target_board",
]

_TARGET_BOARDS: dict[str, str] = {"qemu-m4": "mps2-an386", "qemu-m7": "mps2-an500"}

#: ``--target`` name -> (board file = QEMU machine, GCC CPU flags of that board).
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    target: (board, tuple(get_board(board).cpu_flags)) for target, board in _TARGET_BOARDS.items()
}

#: Exit code of the start-up code's fault handler (``templates/firmware/startup.c.j2``).
FAULT_EXIT_CODE = 99

#: Marker functions of the instruction-count window (defined weak in ``mpq_semihost.c``).
DEFAULT_WINDOW: tuple[str, str] = ("mpq_window_start", "mpq_window_stop")

# Common flags for every firmware build. -ffreestanding: GCC's own stdint.h/stddef.h, no C
# library assumed; -fbuiltin re-enables the builtin memcpy/memset that -ffreestanding turns off
# (a 4-byte memcpy stays one unaligned load instead of a call: research "DSP extension" pitfalls).
_CFLAGS: tuple[str, ...] = (
    "-O2",
    "-g",
    "-ffreestanding",
    "-fbuiltin",
    "-ffunction-sections",
    "-fdata-sections",
    "-Wall",
    "-Wextra",
)
_LDFLAGS: tuple[str, ...] = (
    "-nostdlib",
    "-Wl,--gc-sections",
    "-Wl,--print-memory-usage",
)

# (Toolchain field, executable, Debian package that provides it)
_TOOLS: tuple[tuple[str, str, str], ...] = (
    ("cc", "arm-none-eabi-gcc", "gcc-arm-none-eabi"),
    ("size", "arm-none-eabi-size", "binutils-arm-none-eabi"),
    ("nm", "arm-none-eabi-nm", "binutils-arm-none-eabi"),
    ("qemu", "qemu-system-arm", "qemu-system-arm"),
    ("host_cc", "gcc", "gcc"),
)

_PLUGIN_CFLAGS: tuple[str, ...] = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden")


@dataclass(frozen=True)
class Toolchain:
    """Absolute paths of the programs :func:`build_elf` and :func:`run_qemu` call."""

    cc: str
    size: str
    nm: str
    qemu: str
    host_cc: str


@dataclass(frozen=True)
class QemuRun:
    """Result of :func:`run_qemu`.

    ``files`` holds every file the guest created or changed in the working directory (path
    relative to it, POSIX separators). ``instructions_total`` counts every executed guest
    instruction from reset to exit; ``instructions_window`` those from each entry of the start
    marker to the next entry of the stop marker, summed over ``windows`` windows (0 and 0 when the
    ELF has no markers).
    """

    returncode: int
    stdout: str
    files: dict[str, bytes]
    instructions_total: int
    instructions_window: int
    windows: int
    stderr: str = field(default="", repr=False)
    #: With ``marks``: instructions per segment id summed over the windows (id 0: from the
    #: window's start to the first mark); they add up to ``instructions_window``.
    segments: dict[int, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Targets and tools


def target_board(target: str) -> Board:
    """The board of a ``--target`` name (``qemu-m4`` -> ``mps2-an386``, ``qemu-m7`` ->
    ``mps2-an500``); :class:`MpqError` for an unknown target."""
    if target not in TARGETS:
        raise MpqError(f"unknown target '{target}'; known targets: {', '.join(TARGETS)}")
    return get_board(TARGETS[target][0])


def require_tools(target: str | None = None) -> Toolchain:
    """Find the cross toolchain, QEMU and the host compiler on ``PATH``.

    ``target`` (when given) must be one of :data:`TARGETS`. A missing program raises
    :class:`MpqError` naming it and the Debian package to install (the install line of the
    research note: ``apt-get install --no-install-recommends gcc-arm-none-eabi
    libnewlib-arm-none-eabi qemu-system-arm``).
    """
    if target is not None:
        target_board(target)
    found: dict[str, str] = {}
    for key, exe, package in _TOOLS:
        path = shutil.which(exe)
        if path is None:
            raise MpqError(
                f"{exe} not found on PATH: install the Debian package '{package}' "
                f"(apt-get install --no-install-recommends {package})"
            )
        found[key] = path
    return Toolchain(**found)


# ---------------------------------------------------------------------------------------------
# Building


def _resolve_board(board: Board | str) -> Board:
    """A :class:`Board`, a board name/path, or a target name -> the :class:`Board`."""
    if isinstance(board, Board):
        return board
    if board in TARGETS:
        return target_board(board)
    return get_board(board)


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds it (keeps mtimes stable for make)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    path.write_text(text, encoding="utf-8")


def _define_flags(defines: Mapping[str, object] | None) -> list[str]:
    """``{"N": 3, "FLAG": None}`` -> ``["-DN=3", "-DFLAG"]`` (sorted: deterministic command)."""
    flags = []
    for name, value in sorted((defines or {}).items()):
        flags.append(f"-D{name}" if value is None else f"-D{name}={value}")
    return flags


_OVERFLOW_RE = re.compile(r"region [`'\"]?(\w+)['\"]? overflowed by (\d+) bytes?")
_NOFIT_RE = re.compile(r"section [`'\"]?([\w.]+)['\"]? will not fit in region [`'\"]?(\w+)")


def _link_failure(log: str, board: Board) -> str | None:
    """One line describing every ``region ... overflowed`` in a failed link, or None."""
    overflows: dict[str, int] = {}
    for m in _OVERFLOW_RE.finditer(log):
        overflows[m.group(1)] = max(overflows.get(m.group(1), 0), int(m.group(2)))
    if not overflows:
        return None
    sections: dict[str, list[str]] = {}
    for m in _NOFIT_RE.finditer(log):
        sections.setdefault(m.group(2), [])
        if m.group(1) not in sections[m.group(2)]:
            sections[m.group(2)].append(m.group(1))
    parts = []
    for region, excess in overflows.items():
        size = next((f" ({r.length} bytes)" for r in board.memory if r.name == region), "")
        what = f" (section {', '.join(sections[region])})" if region in sections else ""
        parts.append(f"region {region}{size} overflowed by {excess} bytes{what}")
    return f"firmware does not fit board '{board.name}': " + "; ".join(parts)


def _first_error(log: str) -> str:
    """The first compiler/linker diagnostic that is an error (else the first line) of a log."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() or "undefined reference" in line:
            return line
    return lines[0] if lines else "no output"


def build_elf(
    sources: Sequence[Path | str],
    include_dirs: Sequence[Path | str],
    board: Board | str,
    out_dir: Path | str,
    defines: Mapping[str, object] | None = None,
    extra_flags: Sequence[str] = (),
    *,
    name: str = "firmware",
    toolchain: Toolchain | None = None,
) -> Path:
    """Compile and link ``sources`` for ``board`` into ``out_dir/<name>.elf`` and return its path.

    ``board`` is a :class:`Board`, a board name or file, or a target (``qemu-m4``). Rendered into
    ``out_dir``: ``mpq_startup.c`` (vector table, reset handler, fault handlers, memcpy/memset),
    ``mpq_semihost.c``/``mpq_semihost.h`` and ``<board>.ld``; ``out_dir`` is on the include path.
    Flags: the board's CPU flags, ``-O2 -ffreestanding -fbuiltin -ffunction-sections
    -fdata-sections -Wall -Wextra``, ``defines`` as ``-D``, then ``extra_flags``; link with
    ``-nostdlib -Wl,--gc-sections -Wl,--print-memory-usage -lgcc`` (research: "Bare-metal program
    facts", "Linker script and size checks"). The linker's memory-usage table is kept in
    ``<name>.memory.txt`` (see :func:`memory_usage`), the map in ``<name>.map``, all compiler
    output in ``<name>.build.log``.

    A region overflow raises :class:`MpqError` naming the region and the excess bytes; any other
    failure raises it with the first error line.
    """
    tools = toolchain or require_tools()
    board = _resolve_board(board)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    rendered = {
        "mpq_startup.c": render("firmware/startup.c.j2", board=board),
        "mpq_semihost.c": render("firmware/semihost.c.j2", board=board),
        "mpq_semihost.h": render("firmware/semihost.h.j2", board=board),
        f"{board.name}.ld": linker_script(board),
    }
    for file_name, text in rendered.items():
        _write_if_changed(out / file_name, text)

    elf = out / f"{name}.elf"
    map_file = out / f"{name}.map"
    log_file = out / f"{name}.build.log"
    cmd = [
        tools.cc,
        *board.cpu_flags,
        *_CFLAGS,
        f"-I{out}",
        *(f"-I{Path(d).resolve()}" for d in include_dirs),
        *_define_flags(defines),
        *extra_flags,
        *(str(Path(s).resolve()) for s in sources),
        str(out / "mpq_startup.c"),
        str(out / "mpq_semihost.c"),
        *_LDFLAGS,
        f"-Wl,-Map={map_file}",
        "-T",
        str(out / f"{board.name}.ld"),
        "-o",
        str(elf),
        "-lgcc",
    ]
    _LOG.info("$ %s", shlex.join(map(str, cmd)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    log = proc.stdout + proc.stderr
    log_file.write_text(" ".join(cmd) + "\n" + log, encoding="utf-8")
    if proc.returncode != 0:
        elf.unlink(missing_ok=True)
        (out / f"{name}.memory.txt").unlink(missing_ok=True)
        overflow = _link_failure(log, board)
        if overflow is not None:
            raise MpqError(overflow)
        raise MpqError(
            f"arm-none-eabi-gcc failed for board '{board.name}': {_first_error(log)} "
            f"(full log: {log_file})"
        )
    _write_if_changed(out / f"{name}.memory.txt", proc.stdout)
    return elf


def _tree_digest(directories: Sequence[Path]) -> str:
    """sha256 over the names and bytes of every header below `directories` (what an object
    compiled with them on the include path may depend on)."""
    h = hashlib.sha256()
    for d in directories:
        for path in sorted(Path(d).rglob("*.h")):
            h.update(str(path.relative_to(d)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def call_graph_file(obj: Path) -> Path:
    """Where `-fcallgraph-info` leaves an object's call graph: beside it, `<object stem>.ci`
    (GCC names it after the output; `library_objects` keeps it under the cached object's)."""
    return Path(obj).with_suffix(".ci")


def library_objects(
    sources: Sequence[Path | str],
    include_dirs: Sequence[Path | str],
    board: Board | str | None,
    out_dir: Path | str,
    *,
    toolchain: Toolchain | None = None,
    extra_flags: Sequence[str] = (),
) -> list[Path]:
    """Compile third-party C sources (CMSIS-NN) to objects for ``board`` — its CPU flags and the
    flags of :func:`build_elf`, warnings not fatal: the code is the user's, not mpq's — or for
    the host (``board=None``: ``gcc -O2``), with ``extra_flags`` after them. Returns the objects
    to link. A compiler output beside the object (``-fcallgraph-info``'s ``.ci``, the model's
    stack bound needs the library's frames too) is kept under the object's name.

    Objects are cached in the cache directory under a name that hashes the compiler, the flags,
    the source and every header of ``include_dirs``, so repeated builds of the same library
    compile nothing; without a writable cache they are compiled into ``out_dir``.
    """
    tools = toolchain or require_tools()
    if board is None:
        cc, flags = tools.host_cc, ("-O2",)
    else:
        b = _resolve_board(board)
        cc, flags = tools.cc, (*b.cpu_flags, *_CFLAGS)
    flags = (*flags, *extra_flags)
    call_graph = any(f.startswith("-fcallgraph-info") for f in extra_flags)
    includes = [Path(d).resolve() for d in include_dirs]
    headers = _tree_digest(includes)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = _cache_dir() / "objects"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = out
    objects = []
    for src in map(Path, sources):
        key = hashlib.sha256("\0".join([cc, *flags, headers]).encode() + b"\0"
                             + src.read_bytes()).hexdigest()[:20]
        obj = cache / f"{src.stem}-{key}.o"
        if not obj.is_file() or (call_graph and not call_graph_file(obj).is_file()):
            fd, tmp = tempfile.mkstemp(prefix=f".{src.stem}-", suffix=".o", dir=cache)
            os.close(fd)
            cmd = [cc, *flags, *(f"-I{d}" for d in includes), "-c", str(src.resolve()),
                   "-o", tmp]
            _LOG.info("$ %s", shlex.join(map(str, cmd)))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                call_graph_file(Path(tmp)).unlink(missing_ok=True)
                raise MpqError(f"{Path(cc).name} failed on {src}: "
                               f"{_first_error(proc.stdout + proc.stderr)}")
            aux = call_graph_file(Path(tmp))
            if aux.is_file():  # before the object: a cached object always has its .ci
                os.replace(aux, call_graph_file(obj))
            os.replace(tmp, obj)
        objects.append(obj)
    return objects


# ---------------------------------------------------------------------------------------------
# Sizes

_SHF_WRITE = 0x1
_SHF_ALLOC = 0x2
_SHT_NOBITS = 8


def _elf_sections(elf: Path) -> dict[str, tuple[int, int]]:
    """``{section name: (sh_type, sh_flags)}`` of a 32-bit little-endian ELF file."""
    data = elf.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 1 or data[5] != 1:
        raise MpqError(f"{elf}: not a 32-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)

    def header(i: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIIIIIIIII", data, shoff + i * shentsize)

    strtab_off = header(shstrndx)[4]
    result: dict[str, tuple[int, int]] = {}
    for i in range(1, shnum):
        sh_name, sh_type, sh_flags = header(i)[:3]
        end = data.index(b"\0", strtab_off + sh_name)
        result[data[strtab_off + sh_name : end].decode()] = (sh_type, sh_flags)
    return result


def section_sizes(elf: Path | str, toolchain: Toolchain | None = None) -> dict[str, int]:
    """Bytes per allocated section and the flash/SRAM totals of a linked ELF.

    Sizes come from ``arm-none-eabi-size -A -d`` (research: "Linker script and size checks";
    Berkeley ``size`` would fold ``.rodata`` into text and ``.stack`` into bss). Keys are section
    names without the leading dot (``isr_vector``, ``text``, ``rodata``, ``ARM.exidx``, ``data``,
    ``bss``, ``mpq_arena``, ``heap``, ``stack``, ...), plus

    * ``flash_bytes``: every allocated section with contents (code, constants, vector table and
      the initial values of ``.data``), i.e. what is loaded into flash;
    * ``sram_bytes``: every writable or NOLOAD allocated section (``.data``, ``.bss``, arena,
      heap, stack).

    Section flags come from the ELF section headers; debug and other non-allocated sections are
    left out. Alignment gaps between sections are not counted, so :func:`memory_usage` can be a
    few bytes larger.
    """
    elf = Path(elf)
    tools = toolchain or require_tools()
    proc = subprocess.run([tools.size, "-A", "-d", str(elf)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MpqError(f"arm-none-eabi-size failed on {elf}: {_first_error(proc.stderr)}")
    flags = _elf_sections(elf)
    sizes: dict[str, int] = {}
    flash = sram = 0
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit() or parts[0] not in flags:
            continue
        sh_type, sh_flags = flags[parts[0]]
        if not sh_flags & _SHF_ALLOC:
            continue
        size = int(parts[1])
        sizes[parts[0].lstrip(".")] = size
        if sh_type != _SHT_NOBITS:
            flash += size
        if sh_type == _SHT_NOBITS or sh_flags & _SHF_WRITE:
            sram += size
    sizes["flash_bytes"] = flash
    sizes["sram_bytes"] = sram
    return sizes


_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
_USAGE_RE = re.compile(r"^\s*(\w+):\s+(\d+)\s*(B|KB|MB|GB)\s+(\d+)\s*(B|KB|MB|GB)\s", re.M)


def memory_usage(elf_or_text: Path | str) -> dict[str, tuple[int, int]]:
    """``{region: (used bytes, region bytes)}`` from the linker's ``--print-memory-usage``.

    Takes the ELF that :func:`build_elf` produced (reads ``<name>.memory.txt`` beside it) or the
    table's text itself. GNU ld prints a size in the largest unit that divides it exactly, so
    the numbers are exact.
    """
    if isinstance(elf_or_text, Path):
        text = elf_or_text.with_suffix(".memory.txt").read_text(encoding="utf-8")
    else:
        text = elf_or_text
    return {
        m.group(1): (int(m.group(2)) * _UNITS[m.group(3)], int(m.group(4)) * _UNITS[m.group(5)])
        for m in _USAGE_RE.finditer(text)
    }


def symbol_addresses(
    elf: Path | str, names: Sequence[str], toolchain: Toolchain | None = None
) -> dict[str, int]:
    """Addresses of the named symbols (``arm-none-eabi-nm``), Thumb bit cleared; names the ELF
    does not define are left out (e.g. markers removed by ``--gc-sections``)."""
    tools = toolchain or require_tools()
    proc = subprocess.run([tools.nm, str(elf)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MpqError(f"arm-none-eabi-nm failed on {elf}: {_first_error(proc.stderr)}")
    wanted = set(names)
    found: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in wanted and parts[1] in "TtWw":
            found[parts[2]] = int(parts[0], 16) & ~1
    return found


# ---------------------------------------------------------------------------------------------
# The instruction-count plugin


def _cache_dir() -> Path:
    """``$MPQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpq``, else ``~/.cache/mpq``."""
    if os.environ.get("MPQ_CACHE_DIR"):
        return Path(os.environ["MPQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpq"


def icount_plugin(toolchain: Toolchain | None = None) -> Path:
    """Path of the compiled ``tools/icount/icount.c`` plugin, building it on first use.

    Built with ``gcc -O2 -shared -fPIC -fvisibility=hidden`` (needs no QEMU or glib headers:
    research "Deterministic instruction counting", item 3) into the cache directory under a name
    that hashes the source, atomically (parallel test workers may race); falls back to the
    temporary directory when the cache is not writable.
    """
    tools = toolchain or require_tools()
    try:
        source = data_dir("tools") / "icount" / "icount.c"
        code = source.read_bytes()
    except (FileNotFoundError, OSError):
        raise MpqError("mpq installation is missing tools/icount/icount.c") from None
    digest = hashlib.sha256(code + " ".join(_PLUGIN_CFLAGS).encode()).hexdigest()[:16]
    so_name = f"icount-{digest}.so"
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"mpq-{os.getuid()}"):
        target = directory / so_name
        if target.is_file():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".icount-", suffix=".so", dir=directory)
            os.close(fd)
        except OSError:
            continue
        proc = subprocess.run(
            [tools.host_cc, *_PLUGIN_CFLAGS, "-o", tmp, str(source)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            raise MpqError(f"building the QEMU icount plugin failed: {_first_error(proc.stderr)}")
        os.replace(tmp, target)
        return target
    raise MpqError(f"no writable directory to build the QEMU icount plugin in ({_cache_dir()})")


# ---------------------------------------------------------------------------------------------
# Running


def _qemu_opt(value: str) -> str:
    """Escape a value for a QEMU ``-opt a=b,c=d`` list (a comma is written twice)."""
    return value.replace(",", ",,")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root``."""
    result = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            result[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return result


def _parse_counts(text: str) -> dict[str, int]:
    """``key=value`` lines of the plugin's output file -> ints."""
    counts = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.strip().isdigit():
            counts[key.strip()] = int(value)
    return counts


def run_qemu(
    elf: Path | str,
    machine: str,
    workdir: Path | str,
    input_files: Mapping[str, bytes] | None = None,
    timeout: float = 120,
    count_window: tuple[str, str] | None = DEFAULT_WINDOW,
    *,
    toolchain: Toolchain | None = None,
    marks: Sequence[tuple[int, int]] = (),
) -> QemuRun:
    """Run ``elf`` on the QEMU ``machine`` (``mps2-an386``, ``mps2-an500``, or a target name such
    as ``qemu-m4``) in ``workdir`` and return its exit code, console output, written files and
    instruction counts.

    The command is the research note's ("Run command")::

        qemu-system-arm -M <machine> -display none -monitor none -serial none
            -chardev stdio,id=sh0 -semihosting-config enable=on,target=native,chardev=sh0
            -icount shift=0,align=off,sleep=off
            -plugin icount.so,start=<addr>,stop=<addr>,out=<file> -kernel <elf>

    run under ``sh -c 'ulimit -c 0; exec ...'`` (no core dump when QEMU aborts) with stdin from
    /dev/null. ``input_files`` are written into ``workdir`` first; the guest opens host files
    relative to it (semihosting ``SYS_OPEN``). Every file the guest creates or changes there is
    returned in :attr:`QemuRun.files`, so ``workdir`` should be a directory of its own.

    ``count_window`` names the marker functions whose addresses (``arm-none-eabi-nm``) open and
    close the counting window; markers absent from the ELF give no window. Same ELF and same
    inputs give the same counts ("Deterministic instruction counting": ``-icount`` makes timers
    follow the instruction count, not host time).

    ``marks`` — ``(address, segment id ≥ 1)`` pairs, in program order (at a shared address the
    last pair wins) — split each window into segments: reaching a marked instruction starts its
    segment (``tools/icount/icount.c``); :attr:`QemuRun.segments` holds the sums.

    :class:`MpqError` when QEMU does not finish within ``timeout`` seconds, when the guest faults
    (exit code 99 from the start-up code's handler, whose CFSR line is quoted; or a lockup, QEMU
    aborting with rc 134), or when QEMU itself fails. Any other exit code is returned.
    """
    tools = toolchain or require_tools()
    elf = Path(elf).resolve()
    if machine in TARGETS:
        machine = target_board(machine).qemu_machine or machine
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for rel, content in (input_files or {}).items():
        path = (work / rel).resolve()
        if work not in path.parents:
            raise MpqError(f"input file '{rel}' must be a relative path inside the work directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    plugin = icount_plugin(tools)
    before = _snapshot(work)
    with tempfile.TemporaryDirectory(prefix="mpq-qemu-") as tmp:
        count_file = Path(tmp) / "icount.txt"
        plugin_args = [str(plugin)]
        if count_window is not None:
            addrs = symbol_addresses(elf, count_window, tools)
            if all(name in addrs for name in count_window):
                plugin_args += [
                    f"start=0x{addrs[count_window[0]]:x}",
                    f"stop=0x{addrs[count_window[1]]:x}",
                ]
        if marks:
            marks_file = Path(tmp) / "marks.txt"
            marks_file.write_text("".join(f"{a:x} {i}\n" for a, i in marks))
            plugin_args.append(f"marks={marks_file}")
        plugin_args.append(f"out={count_file}")
        cmd = [
            tools.qemu, "-M", machine,
            "-display", "none", "-monitor", "none", "-serial", "none",
            "-chardev", "stdio,id=sh0",
            "-semihosting-config", "enable=on,target=native,chardev=sh0",
            "-icount", "shift=0,align=off,sleep=off",
            "-plugin", ",".join(_qemu_opt(a) for a in plugin_args),
            "-kernel", str(elf),
        ]  # fmt: skip
        _LOG.info("$ %s", shlex.join(map(str, cmd)))
        try:
            proc = subprocess.run(
                ["sh", "-c", 'ulimit -c 0; exec "$@"', "sh", *cmd],
                cwd=work,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise MpqError(
                f"{elf.name} did not finish within {timeout:g} s on {machine} "
                "(endless loop, or waiting for an interrupt?)"
            ) from None
        counts_text = count_file.read_text() if count_file.is_file() else None

    stdout = proc.stdout.decode("utf-8", errors="replace")
    stderr = proc.stderr.decode("utf-8", errors="replace")
    if proc.returncode == FAULT_EXIT_CODE:
        line = next((ln for ln in stdout.splitlines() if ln.startswith("mpq: fault:")), None)
        if line is not None:
            raise MpqError(f"{elf.name} faulted on {machine}: {line[len('mpq: fault: ') :]}")
    if proc.returncode in (134, -6):
        fatal = next((ln for ln in stderr.splitlines() if ln.strip()), "aborted")
        raise MpqError(f"{elf.name} crashed QEMU on {machine} (lockup or abort): {fatal.strip()}")
    if counts_text is None:
        # The plugin writes its file at any orderly exit, so QEMU never ran the guest.
        reason = next((ln.strip() for ln in stderr.splitlines() if ln.strip()), "no output")
        raise MpqError(f"qemu-system-arm failed on {machine} (rc {proc.returncode}): {reason}")
    counts = _parse_counts(counts_text)

    after = _snapshot(work)
    files = {
        rel: (work / rel).read_bytes()
        for rel, stamp in sorted(after.items())
        if before.get(rel) != stamp
    }
    return QemuRun(
        returncode=proc.returncode,
        stdout=stdout,
        files=files,
        instructions_total=counts.get("total", 0),
        instructions_window=counts.get("window", 0),
        windows=counts.get("windows", 0),
        stderr=stderr,
        segments={int(k.split(".", 1)[1]): v for k, v in counts.items()
                  if k.startswith("segment.")},
    )
