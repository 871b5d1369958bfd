"""`mpq export --target cmake`: a CMakeLists.txt a user's CMake project takes with
`add_subdirectory(fw)` and `target_link_libraries(app mpq_model)`, built by real cmake for the
host (gcc) and for Cortex-M4 (a toolchain file for arm-none-eabi-gcc, run under QEMU), giving
the integer reference's bytes on both."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_mpq

from mpq.boards import get_board
from mpq.codegen.export import render_export, write_order
from mpq.codegen.render import linker_script, render
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.plan import load_plan
from mpq.verify import reference_outputs

EX = REPO / "examples" / "fashion"
SAMPLES = 3

# The user's project: the export in fw/, an app linking mpq_model. For QEMU the app adds the
# start-up and semihosting code mpq renders for mps2-an386 and links with its linker script.
APP_CMAKE = """\
cmake_minimum_required(VERSION 3.13)
project(app C)
add_subdirectory(fw)
message(STATUS "app: MPQ_LDSCRIPT=${MPQ_LDSCRIPT} MPQ_CPU_FLAGS=${MPQ_CPU_FLAGS}")
add_executable(app main.c)
target_link_libraries(app PRIVATE mpq_model)
if(APP_QEMU_DIR)
    target_sources(app PRIVATE "${APP_QEMU_DIR}/mpq_startup.c" "${APP_QEMU_DIR}/mpq_semihost.c")
    target_include_directories(app PRIVATE "${APP_QEMU_DIR}")
    target_compile_definitions(app PRIVATE APP_QEMU)
    target_link_options(app PRIVATE -T "${APP_QEMU_DIR}/mps2-an386.ld")
    target_link_libraries(app PRIVATE gcc)
endif()
"""

# Runs the model on the compiled-in samples and prints each output byte (signed decimal).
APP_MAIN = r"""
#include <stdint.h>
#include "mpq_model.h"
#include "inputs.h"
#ifdef APP_QEMU
#include "mpq_semihost.h"
static void put(const char *s) { mpq_sh_write0(s); }
#else
#include <stdio.h>
static void put(const char *s) { fputs(s, stdout); }
#endif

static int8_t output[MPQ_OUTPUT0_BYTES];
static int8_t *const outputs[MPQ_NUM_OUTPUTS] = {output};

static void put_int(int v) {
    char buf[8], *p = buf + sizeof buf;
    unsigned u = v < 0 ? (unsigned)-v : (unsigned)v;
    *--p = '\0';
    do { *--p = (char)('0' + u % 10u); u /= 10u; } while (u);
    if (v < 0) *--p = '-';
    put(p);
    put(" ");
}

int main(void) {
    for (int n = 0; n < APP_SAMPLES; n++) {
        if (mpq_model_run(app_inputs[n], outputs) != 0) return 3;
        for (int i = 0; i < MPQ_OUTPUT0_BYTES; i++) put_int(output[i]);
        put("\n");
    }
    return 0;
}
"""

TOOLCHAIN = """\
set(CMAKE_SYSTEM_NAME Generic)
set(CMAKE_SYSTEM_PROCESSOR arm)
set(CMAKE_C_COMPILER arm-none-eabi-gcc)
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
set(CMAKE_C_FLAGS_INIT "-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 \
-ffreestanding -fbuiltin -ffunction-sections -fdata-sections")
set(CMAKE_EXE_LINKER_FLAGS_INIT "-nostdlib -Wl,--gc-sections")
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """The Fashion example's int8 plan, exported with `--target cmake` into a CMake project's
    fw/, and the integer reference's outputs for the first test images."""
    root = tmp_path_factory.mktemp("cmake")
    shutil.copy(EX / "fashion_cnn.onnx", root / "fashion_cnn.onnx")
    plan = root / "fashion.plan.json"
    r = run_mpq("search", "fashion_cnn.onnx", "--board", "nano33ble", "--strategy", "int8",
                "--patches", "none", "--data", EX / "calib.npz", "-o", plan, "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    app = root / "app"
    r = run_mpq("export", plan, "-o", app / "fw", "--target", "cmake", "--target", "make")
    assert r.returncode == 0, r.stderr
    xq, ref = reference_outputs(load_plan(plan), load_model(root / "fashion_cnn.onnx"),
                                np.load(EX / "test.npz")["x"][:SAMPLES])
    rows = ",\n".join("{" + ",".join(map(str, x.reshape(-1).tolist())) + "}" for x in xq)
    (app / "inputs.h").write_text(
        f"#define APP_SAMPLES {SAMPLES}\n"
        f"static const int8_t app_inputs[{SAMPLES}][MPQ_INPUT_BYTES] = {{\n{rows}\n}};\n")
    (app / "main.c").write_text(APP_MAIN)
    (app / "CMakeLists.txt").write_text(APP_CMAKE)
    (ref,) = ref.values()  # the classifier's one output
    expected = "".join(" ".join(map(str, y.reshape(-1).tolist())) + " \n" for y in ref)
    return {"root": root, "plan": plan, "app": app, "expected": expected}


def _cmake_build(source: Path, build: Path, *options: str) -> str:
    """Configure and build with real cmake; returns the configure output."""
    r = subprocess.run(["cmake", "-S", str(source), "-B", str(build),
                        "-DCMAKE_BUILD_TYPE=Release", *options],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    b = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True,
                       timeout=300)
    assert b.returncode == 0, b.stdout + b.stderr
    return r.stdout


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI (see .ci/run)")
        pytest.skip(f"{', '.join(missing)} not installed")


def test_cmake_project_on_the_host_gives_the_reference_bytes(project, tmp_path: Path) -> None:
    """add_subdirectory(fw) + target_link_libraries(app mpq_model): the app compiles with
    host gcc (-Wall -Wextra -Werror; no -mcpu is imposed by the export), sees mpq_model.h,
    and prints exactly the reference's output bytes; the board's flags and linker script
    reach the calling directory."""
    _need("cmake", "gcc", "make")
    log = _cmake_build(project["app"], tmp_path / "build", "-DCMAKE_C_COMPILER=gcc",
                       "-DCMAKE_C_FLAGS=-Wall -Wextra -Werror")
    fw = project["app"] / "fw"
    assert (f"app: MPQ_LDSCRIPT={fw}/nano33ble.ld "
            "MPQ_CPU_FLAGS=-mcpu=cortex-m4;-mthumb;-mfloat-abi=hard;-mfpu=fpv4-sp-d16") in log
    run = subprocess.run([str(tmp_path / "build" / "app")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == project["expected"]


def test_cmake_project_for_cortex_m4_under_qemu(project, tmp_path: Path) -> None:
    """The same project cross-built with a user's toolchain file for arm-none-eabi-gcc
    (Cortex-M4), linked with mps2-an386's script and mpq's start-up and semihosting code, runs
    under qemu-system-arm -M mps2-an386 and prints the reference's bytes."""
    _need("cmake", "arm-none-eabi-gcc", "qemu-system-arm", "make")
    from mpq import firmware

    board = get_board("mps2-an386")
    qemu = tmp_path / "qemu"
    qemu.mkdir()
    for name, template in (("mpq_startup.c", "firmware/startup.c.j2"),
                           ("mpq_semihost.c", "firmware/semihost.c.j2"),
                           ("mpq_semihost.h", "firmware/semihost.h.j2")):
        (qemu / name).write_text(render(template, board=board))
    (qemu / "mps2-an386.ld").write_text(linker_script(board))
    (tmp_path / "cortex-m4.cmake").write_text(TOOLCHAIN)
    _cmake_build(project["app"], tmp_path / "build",
                 f"-DCMAKE_TOOLCHAIN_FILE={tmp_path / 'cortex-m4.cmake'}",
                 f"-DAPP_QEMU_DIR={qemu}")
    run = firmware.run_qemu(tmp_path / "build" / "app", "mps2-an386", tmp_path / "run")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == project["expected"]


def test_cmake_export_is_deterministic_and_keeps_the_make_stamp_last(project,
                                                                     tmp_path: Path) -> None:
    """Same plan ⇒ the same CMakeLists.txt, with no absolute path; a second export rewrites
    nothing; the default target is make alone; an unknown target is one clean line."""
    fw = project["app"] / "fw"
    again = tmp_path / "fw"
    assert run_mpq("export", project["plan"], "-o", again, "--target", "cmake").returncode == 0
    text = (fw / "CMakeLists.txt").read_text()
    assert (again / "CMakeLists.txt").read_text() == text
    assert str(project["root"]) not in text and "-mcpu" not in text.split("set(MPQ_CPU")[0]
    before = {p.name: p.stat().st_mtime_ns for p in fw.iterdir()}
    r = run_mpq("export", project["plan"], "-o", fw, "--target", "cmake")
    assert r.returncode == 0 and "0 written" in r.stdout, r.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in fw.iterdir()}
    plain = tmp_path / "plain"
    assert run_mpq("export", project["plan"], "-o", plain).returncode == 0
    assert not (plain / "CMakeLists.txt").exists() and (plain / "mpq.mk").is_file()
    r = run_mpq("export", project["plan"], "-o", tmp_path / "x", "--target", "bazel")
    assert r.returncode == 2 and "Invalid value for '--target'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
    plan, graph = load_plan(project["plan"]), load_model(project["root"] / "fashion_cnn.onnx")
    with pytest.raises(MpqError, match="unknown build target 'bazel'"):
        render_export(plan, graph, targets=("bazel",))
    order = write_order(list(render_export(plan, graph, targets=("cmake",))))
    assert order[-1] == "mpq.mk" and order.index("CMakeLists.txt") < len(order) - 1


def test_cmsis_nn_export_needs_cmsis_nn_path(project, tmp_path: Path) -> None:
    """With the cmsis-nn backend the library compiles the CMSIS-NN sources the export calls
    from CMSIS_NN_PATH; configuring without it stops with one message naming the variable."""
    _need("cmake")
    files = render_export(load_plan(project["plan"]),
                          load_model(project["root"] / "fashion_cnn.onnx"), "cmsis-nn",
                          ("cmake",))
    text = files["CMakeLists.txt"]
    assert '"${CMSIS_NN_PATH}/Source/' in text
    fw = tmp_path / "fw"
    fw.mkdir()
    for name, content in files.items():
        (fw / name).write_text(content)
    env = {k: v for k, v in os.environ.items() if k != "CMSIS_NN_PATH"}
    r = subprocess.run(["cmake", "-S", str(fw), "-B", str(tmp_path / "build")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "this export calls CMSIS-NN: set CMSIS_NN_PATH" in r.stderr
