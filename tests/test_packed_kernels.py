"""The packed sub-byte kernels (kernels/mpq_packed.c) against the library's reference kernels.

tests/packed_cases.c runs 200 random layers per kernel (1x1 conv, KxK conv, fully connected)
and bit mix (a4w4, a2w2, a4w2, a2w4) through mpq_packed_* and through mpq_conv2d /
mpq_fully_connected, byte for byte, in one program: on the host (plain C, and the emulated DSP
loops with -fsanitize=address,undefined) and as one firmware run under QEMU's M4 and M7
(the real SMLAD). Every target must print the same lines, i.e. the same outputs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from mpq import firmware

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
CASES_C = REPO / "tests" / "packed_cases.c"
FLAGS = ("-std=c99", "-O0", "-Wall", "-Wextra", "-Werror")  # -O0: compiles fast
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")
KINDS = ("conv1x1", "convkxk", "fc")
MIXES = ("a4w4", "a2w2", "a4w2", "a2w4")
#: what the cases call: the packed kernels and the reference ones
SOURCES = tuple(KERNELS / n for n in ("mpq_packed.c", "mpq_conv.c", "mpq_dot.c",
                                      "mpq_fully_connected.c", "mpq_support.c"))
LINE = re.compile(r"^(\w+) (a\dw\d) cases=(\d+) bad=(\d+) sum=(\d+)$")


def _check(stdout: str) -> list[tuple[str, ...]]:
    """The result lines: one per kind and mix, 200 cases each, none mismatching."""
    rows = [LINE.match(line) for line in stdout.splitlines()]
    assert all(rows), stdout
    got = [r.groups() for r in rows if r]
    assert [(k, m) for k, m, *_ in got] == [(k, m) for k in KINDS for m in MIXES], stdout
    for kind, mix, cases, bad, _ in got:
        assert int(cases) >= 200, (kind, mix)
        assert int(bad) == 0, f"{kind} {mix}: {bad} of {cases} cases differ from the reference"
    return got


@cache
def _host_run(dsp: bool, tmp: str) -> list[tuple[str, ...]]:
    exe = Path(tmp) / ("cases_dsp" if dsp else "cases")
    # the DSP loops (the code the Cortex-M runs) under the sanitizers; the plain ones as is
    cmd = ["gcc", *FLAGS, *(SANITIZE + ("-DMPQ_EMULATE_DSP",) if dsp else ()), "-DPACKED_HOST",
           f"-I{KERNELS}", str(CASES_C), *map(str, SOURCES), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={"ASAN_OPTIONS": "detect_leaks=0"})
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stdout + run.stderr
    return _check(run.stdout)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> list[tuple[str, ...]]:
    if shutil.which("gcc") is None:
        pytest.skip("needs host gcc")
    tmp = str(tmp_path_factory.mktemp("packed"))
    plain = _host_run(False, tmp)
    # the DSP loops (emulated intrinsics) compute the very same bytes as the plain C ones
    assert _host_run(True, tmp) == plain
    return plain


def test_packed_kernels_match_reference_on_host(host) -> None:
    assert len(host) == len(KINDS) * len(MIXES)


@pytest.mark.parametrize("target", ["qemu-m4", "qemu-m7"])
def test_packed_kernels_match_reference_under_qemu(host, tmp_path: Path, target: str) -> None:
    try:
        tools = firmware.require_tools(target)
    except Exception as exc:  # noqa: BLE001 - a missing toolchain skips, as test_firmware
        pytest.skip(str(exc))
    elf = firmware.build_elf([CASES_C, *SOURCES], [KERNELS], target, tmp_path / "build",
                             extra_flags=["-Werror", "-std=c99"], toolchain=tools)
    objdump = tools.nm[: -len("nm")] + "objdump"
    dis = subprocess.run([objdump, "-d", str(elf)], capture_output=True, text=True,
                         check=True).stdout
    assert "smlad" in dis  # the real DSP path runs here
    run = firmware.run_qemu(elf, target, tmp_path / "run", timeout=300, toolchain=tools)
    assert run.returncode == 0, run.stdout + run.stderr
    # the same outputs (checksums) as the host: bit-exact across targets
    assert _check(run.stdout) == host
