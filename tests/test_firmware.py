"""Bare-metal firmware built with mpq.firmware and run under qemu-system-arm (M4 and M7).

Needs arm-none-eabi-gcc, binutils-arm-none-eabi, qemu-system-arm and host gcc; the module is
skipped without them, except under CI (which installs them: see
shared/research/qemu-cortex-m.md, "Install").
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from mpq import firmware
from mpq.errors import MpqError

_MISSING = [t for t in ("arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm",
                        "qemu-system-arm", "gcc") if shutil.which(t) is None]
if _MISSING:
    _WHY = (f"firmware tests need {', '.join(_MISSING)} (apt-get install "
            "--no-install-recommends gcc-arm-none-eabi qemu-system-arm gcc)")
    if os.environ.get("CI"):  # CI installs them: a silent skip there would hide a broken image
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

N = 1024  # int8 elements per vector

DOT_PROGRAM = r"""
#include <stdint.h>
#include "mpq_semihost.h"

#define N __N__
static int8_t input[2 * N + 16];

int main(void)
{
    int n = mpq_sh_read_file("input.bin", input, sizeof input);
    if (n != 2 * N) {
        mpq_sh_write0("bad input size\n");
        return 2;
    }
    const int8_t *a = input;
    const int8_t *b = input + N;

    mpq_window_start();
    int32_t dot = 0;
    uint32_t checksum = 0;
    for (int i = 0; i < N; i++) {
        dot += (int32_t)a[i] * (int32_t)b[i];
    }
    for (int i = 0; i < 2 * N; i++) {
        checksum += (uint32_t)(i + 1) * (uint8_t)input[i];
    }
    __asm__ volatile("" : "+r"(dot), "+r"(checksum));
    mpq_window_stop();

    int32_t out[2] = {dot, (int32_t)checksum};
    if (mpq_sh_write_file("output.bin", out, sizeof out) != 0) {
        return 3;
    }
    mpq_sh_write0("dot done\n");
    return 0;
}
""".replace("__N__", str(N))

SMLAD_PROGRAM = r"""
#include <arm_acle.h>
#include <stdint.h>
#include "mpq_semihost.h"

static uint32_t state = 12345u;
static uint32_t next(void)
{
    state = state * 1664525u + 1013904223u;
    return state;
}

static int32_t smlad_c(uint32_t x, uint32_t y, int32_t acc)
{
    int32_t lo = (int32_t)(int16_t)(x & 0xFFFFu) * (int16_t)(y & 0xFFFFu);
    int32_t hi = (int32_t)(int16_t)(x >> 16) * (int16_t)(y >> 16);
    return (int32_t)((uint32_t)acc + (uint32_t)lo + (uint32_t)hi);
}

int main(void)
{
#ifndef __ARM_FEATURE_DSP
    return 5;
#else
    int32_t out[4 * 8];
    for (int i = 0; i < 8; i++) {
        uint32_t x = next(), y = next();
        int32_t acc = (int32_t)next();
        __asm__ volatile("" : "+r"(x), "+r"(y), "+r"(acc));
        int32_t hw = __smlad(x, y, acc);
        int32_t c = smlad_c(x, y, acc);
        if (hw != c) {
            return 10 + i;
        }
        out[4 * i] = (int32_t)x;
        out[4 * i + 1] = (int32_t)y;
        out[4 * i + 2] = acc;
        out[4 * i + 3] = hw;
    }
    return mpq_sh_write_file("smlad.bin", out, sizeof out) == 0 ? 0 : 3;
#endif
}
"""

NOP_PROGRAM = r"""
#include "mpq_semihost.h"

int main(void)
{
    mpq_window_start();
    __asm__ volatile(".rept __NOPS__\n\tnop\n\t.endr" ::: "memory");
    mpq_window_stop();
    return 0;
}
"""

FAULT_PROGRAM = r"""
int main(void)
{
    __asm__ volatile("udf #0");
    return 0;
}
"""

BIG_PROGRAM = r"""
#include <stdint.h>

static int8_t big[5u << 20]; /* 5 MiB of .bss on a 4 MiB RAM */

int main(void)
{
    big[7] = 1;
    return *(volatile int8_t *)&big[((uintptr_t)big >> 4) & 0xFF];
}
"""


@pytest.fixture(scope="module")
def tools() -> firmware.Toolchain:
    return firmware.require_tools("qemu-m4")


def _build(tmp_path: Path, name: str, code: str, target: str, tools: firmware.Toolchain,
           **kwargs: object) -> Path:
    src = tmp_path / f"{name}.c"
    src.write_text(code)
    return firmware.build_elf([src], [], target, tmp_path / f"build-{name}-{target}",
                              toolchain=tools, **kwargs)


def _reference(data: np.ndarray) -> tuple[int, int]:
    """The firmware's computation in numpy: int8 dot of the two halves, weighted byte sum."""
    a = data[:N].astype(np.int32)
    b = data[N:].astype(np.int32)
    dot = int(np.dot(a, b))
    weights = np.arange(1, 2 * N + 1, dtype=np.uint32)
    checksum = int(np.sum(weights * data.view(np.uint8).astype(np.uint32), dtype=np.uint32))
    return dot, checksum


@pytest.mark.parametrize("target", ["qemu-m4", "qemu-m7"])
def test_dot_product_runs_and_counts_deterministically(tmp_path: Path, tools, target) -> None:
    elf = _build(tmp_path, "dot", DOT_PROGRAM, target, tools)
    data = np.random.default_rng(7).integers(-128, 128, size=2 * N, dtype=np.int8)
    runs = [firmware.run_qemu(elf, target, tmp_path / f"run{i}", {"input.bin": data.tobytes()},
                              timeout=30, toolchain=tools)
            for i in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout == "dot done\n"
        assert set(run.files) == {"output.bin"}
        assert struct.unpack("<iI", run.files["output.bin"]) == _reference(data)
        assert run.windows == 1
        assert 0 < run.instructions_window < run.instructions_total
        # Two loops over 1024 and 2048 elements: at least a few instructions per element.
        assert run.instructions_window > 3 * N
    first, second = runs
    assert (first.instructions_total, first.instructions_window) == \
           (second.instructions_total, second.instructions_window)


def test_window_counts_exactly(tmp_path: Path, tools) -> None:
    counts = {}
    for nops in (0, 1000):
        elf = _build(tmp_path, f"nop{nops}", NOP_PROGRAM.replace("__NOPS__", str(nops)),
                     "qemu-m4", tools)
        run = firmware.run_qemu(elf, "qemu-m4", tmp_path / f"nop{nops}", timeout=30,
                                toolchain=tools)
        assert run.returncode == 0 and run.windows == 1
        counts[nops] = (run.instructions_total, run.instructions_window)
    assert counts[1000][1] - counts[0][1] == 1000
    assert counts[1000][0] - counts[0][0] == 1000
    assert counts[0][1] <= 4  # the markers themselves: start's return and the call of stop


def test_dsp_smlad_matches_c_on_m4(tmp_path: Path, tools) -> None:
    elf = _build(tmp_path, "smlad", SMLAD_PROGRAM, "qemu-m4", tools)
    run = firmware.run_qemu(elf, "qemu-m4", tmp_path / "smlad", timeout=30, toolchain=tools)
    assert run.returncode == 0, f"rc {run.returncode}: {run.stdout}"
    rows = np.frombuffer(run.files["smlad.bin"], dtype="<u4").reshape(8, 4).astype(np.int64)
    for x, y, acc, hw in rows:
        halves = [((v & 0xFFFF) ^ 0x8000) - 0x8000 for v in (x, y)] + \
                 [((v >> 16) ^ 0x8000) - 0x8000 for v in (x, y)]
        expected = (acc + halves[0] * halves[1] + halves[2] * halves[3]) & 0xFFFFFFFF
        assert hw == expected
    assert len({int(r[3]) for r in rows}) == 8  # distinct random inputs, not a constant


def test_fault_reports_cfsr(tmp_path: Path, tools) -> None:
    elf = _build(tmp_path, "fault", FAULT_PROGRAM, "qemu-m7", tools)
    with pytest.raises(MpqError) as info:
        firmware.run_qemu(elf, "qemu-m7", tmp_path / "fault", timeout=30, toolchain=tools)
    message = str(info.value)
    assert "\n" not in message
    assert "UsageFault" in message and "CFSR=0x00010000" in message  # UNDEFINSTR


def test_oversized_array_fails_link_with_one_line(tmp_path: Path, tools) -> None:
    with pytest.raises(MpqError) as info:
        _build(tmp_path, "big", BIG_PROGRAM, "qemu-m4", tools)
    message = str(info.value)
    assert "\n" not in message
    m = re.search(r"region RAM \(4194304 bytes\) overflowed by (\d+) bytes", message)
    assert m, message
    excess = int(m.group(1))
    stack = firmware.target_board("qemu-m4").reserve_stack
    assert (5 << 20) + stack - (4 << 20) <= excess < (5 << 20) + stack - (4 << 20) + 1024
    assert "FLASH" not in message
    assert not (tmp_path / "build-big-qemu-m4" / "firmware.elf").exists()


def test_section_sizes_match_linker_memory_usage(tmp_path: Path, tools) -> None:
    elf = _build(tmp_path, "dot", DOT_PROGRAM, "qemu-m4", tools)
    sizes = firmware.section_sizes(elf, tools)
    usage = firmware.memory_usage(elf)
    board = firmware.target_board("qemu-m4")
    assert sizes["bss"] >= 2 * N + 16
    assert sizes["stack"] == board.reserve_stack
    assert sizes["text"] > 0 and sizes["isr_vector"] > 0
    assert sizes["flash_bytes"] == sum(sizes[k] for k in ("isr_vector", "text", "rodata", "data")
                                       if k in sizes) + sizes.get("ARM.exidx", 0)
    assert sizes["sram_bytes"] == sum(sizes.get(k, 0) for k in
                                      ("data", "bss", "mpq_arena", "heap", "stack"))
    flash_used, flash_size = usage["FLASH"]
    ram_used, ram_size = usage["RAM"]
    assert (flash_size, ram_size) == (board.flash_region_obj.length, board.sram_region_obj.length)
    assert 0 <= flash_used - sizes["flash_bytes"] < 64  # ld also counts alignment gaps
    assert 0 <= ram_used - sizes["sram_bytes"] < 64
    assert "debug_info" not in sizes and "comment" not in sizes
