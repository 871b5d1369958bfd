"""`mpq export --target zephyr,arduino,platformio`: the layouts those tools read, checked for
the files and fields they require (their own CLIs download toolchains, which tests cannot), and
compiled for Cortex-M4 with arm-none-eabi-gcc exactly as each tool would take them — the
Zephyr module through its CMakeLists.txt against stub zephyr_* functions, the Arduino library's
src/ without any -D flag and with no linker script, the PlatformIO sources through the
manifest's srcFilter and flags. The Arduino sketch also runs on the host against a stub
Arduino.h and prints the integer reference's bytes."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, run_mpq

from mpq import __version__
from mpq.codegen.export import library_name, render_export, write_export
from mpq.errors import MpqError
from mpq.evaluate import PlanRunner
from mpq.frontend import load_model
from mpq.plan import load_plan

EX = REPO / "examples" / "fashion"
M4 = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
WARN = ("-Wall", "-Wextra", "-Werror")
# The stub sketch needs no C++ runtime (the toolchain ships no libstdc++ for the M4 here).
NO_RUNTIME = ("-fno-exceptions", "-fno-rtti", "-fno-threadsafe-statics")
# The categories the Arduino Library Manager accepts (library specification 1.5).
ARDUINO_CATEGORIES = {"Display", "Communication", "Signal Input/Output", "Sensors",
                      "Device Control", "Timing", "Data Storage", "Data Processing", "Other"}


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


@pytest.fixture(scope="module")
def fw(fashion_demo, tmp_path_factory) -> dict:
    """The Fashion example's demo plan (patches, VDPC; `make demo`'s --sram 14000) exported
    with every target at once, and the names its C files have in the export."""
    root, plan = fashion_demo["root"], fashion_demo["plan"]
    out = tmp_path_factory.mktemp("deploy") / "fw"
    r = run_mpq("export", plan, "-o", out, "--target", "zephyr,arduino", "--target",
                "platformio", "--target", "cmake")
    assert r.returncode == 0, r.stderr
    c_files = sorted(p.name for p in out.glob("*.c"))
    h_files = sorted(p.name for p in out.glob("*.h"))
    assert "mpq_model.c" in c_files and "mpq_model.h" in h_files
    return {"root": root, "plan": plan, "out": out, "c": c_files, "h": h_files,
            "name": "mpq_fashion_cnn"}


def _properties(path: Path) -> dict[str, str]:
    """An Arduino library.properties as a dict (key=value lines)."""
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip()]
    assert all(len(p) == 2 for p in pairs), pairs
    return {k: v for k, v in pairs}


def _compile(cc: str, sources: list[Path], flags: list[str], work: Path) -> list[Path]:
    """Compile each source to an object with `cc`; the test fails with the compiler's log."""
    work.mkdir(parents=True, exist_ok=True)
    objects = []
    for src in sources:
        obj = work / (src.stem + ".o")
        r = subprocess.run([cc, *flags, "-c", str(src), "-o", str(obj)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        objects.append(obj)
    return objects


def _sections(obj: Path) -> str:
    return subprocess.run(["arm-none-eabi-objdump", "-h", str(obj)], capture_output=True,
                          text=True, check=True).stdout


def test_names_and_versions_agree_across_the_three_layouts(fw) -> None:
    """One library name (mpq_ + the model's stem) and mpq's version in module.yml,
    library.properties and library.json; the Arduino sketch is examples/<name>/<name>.ino."""
    out, name = fw["out"], fw["name"]
    module = yaml.safe_load((out / "zephyr" / "module.yml").read_text())
    props = _properties(out / "library.properties")
    manifest = json.loads((out / "library.json").read_text())
    assert module["name"] == props["name"] == manifest["name"] == name
    assert props["version"] == manifest["version"] == __version__
    assert (out / "examples" / name / f"{name}.ino").is_file()


def test_zephyr_module_builds_through_its_cmakelists(fw, tmp_path: Path) -> None:
    """module.yml points Zephyr at zephyr/ (build.cmake, build.kconfig), so the export's own
    CMakeLists.txt is untouched; Kconfig defines the bool MPQ_MODEL; the module's
    CMakeLists.txt, run by real cmake against stub zephyr_* functions, lists every exported .c
    and compiles them for Cortex-M4 with -Werror, the arena in .bss (no .mpq_arena section),
    and gives the application mpq_model.h."""
    _need("cmake", "make", "arm-none-eabi-gcc", "arm-none-eabi-nm")
    out = fw["out"]
    module = yaml.safe_load((out / "zephyr" / "module.yml").read_text())
    assert module["build"] == {"cmake": "zephyr", "kconfig": "zephyr/Kconfig"}
    assert "project(mpq_model" in (out / "CMakeLists.txt").read_text()  # cmake's, kept
    kconfig = (out / module["build"]["kconfig"]).read_text()
    assert re.search(r"^config MPQ_MODEL\n\tbool \"", kconfig, re.M), kconfig
    cmakelists = (out / module["build"]["cmake"] / "CMakeLists.txt").read_text()
    listed = re.findall(r"\$\{ZEPHYR_CURRENT_MODULE_DIR\}/(\S+\.c)", cmakelists)
    assert listed == fw["c"]
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.c").write_text('#include "mpq_model.h"\n'
                                "int app(const int8_t *x, int8_t *y) "
                                "{ int8_t *const outs[MPQ_NUM_OUTPUTS] = {y}; "
                                "return mpq_model_run(x, outs); }\n")
    (app / "CMakeLists.txt").write_text(f"""\
cmake_minimum_required(VERSION 3.13)
project(zephyr_stub C)
set(CONFIG_MPQ_MODEL y)
set(ZEPHYR_CURRENT_MODULE_DIR "{out}")
add_library(zephyr_interface INTERFACE)
macro(zephyr_library)
    set(ZEPHYR_CURRENT_LIBRARY mpq_zephyr)
    add_library(mpq_zephyr STATIC)
endmacro()
function(zephyr_library_sources)
    target_sources(${{ZEPHYR_CURRENT_LIBRARY}} PRIVATE ${{ARGN}})
endfunction()
function(zephyr_library_compile_definitions)
    target_compile_definitions(${{ZEPHYR_CURRENT_LIBRARY}} PRIVATE ${{ARGN}})
endfunction()
function(zephyr_include_directories)
    target_include_directories(zephyr_interface INTERFACE ${{ARGN}})
endfunction()
add_subdirectory("{out / module["build"]["cmake"]}" module)
add_library(app OBJECT main.c)
target_link_libraries(app PRIVATE zephyr_interface)
""")
    (tmp_path / "m4.cmake").write_text(
        "set(CMAKE_SYSTEM_NAME Generic)\nset(CMAKE_SYSTEM_PROCESSOR arm)\n"
        "set(CMAKE_C_COMPILER arm-none-eabi-gcc)\n"
        "set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)\n"
        f"set(CMAKE_C_FLAGS_INIT \"{' '.join(M4 + WARN)} -std=gnu11\")\n")
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(app), "-B", str(build), "-DCMAKE_BUILD_TYPE=MinSizeRel",
                 f"-DCMAKE_TOOLCHAIN_FILE={tmp_path / 'm4.cmake'}"],
                ["cmake", "--build", str(build)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    lib = build / "module" / "libmpq_zephyr.a"
    assert ".mpq_arena" not in _sections(lib)
    nm = subprocess.run(["arm-none-eabi-nm", str(lib)], capture_output=True, text=True,
                        check=True).stdout
    assert re.search(r" b mpq_arena$", nm, re.M), nm


def test_arduino_library_compiles_for_the_m4_without_flags_or_linker_script(
        fw, tmp_path: Path) -> None:
    """library.properties has every field the Arduino library specification requires; src/
    holds every exported .c and .h (mpq_model.c with MPQ_ARENA_STATIC defined, the rest as
    exported); src/ compiles with arm-none-eabi-gcc for Cortex-M4 with no -D flag, the sketch
    with arm-none-eabi-g++ against a stub of Arduino.h, and the whole links with the
    toolchain's default linker script, the arena an aligned array in .bss."""
    _need("arm-none-eabi-gcc", "arm-none-eabi-g++", "arm-none-eabi-nm")
    out, name = fw["out"], fw["name"]
    props = _properties(out / "library.properties")
    for key in ("name", "version", "author", "maintainer", "sentence", "paragraph",
                "category", "url", "architectures"):
        assert props.get(key), key
    assert props["category"] in ARDUINO_CATEGORIES
    assert "mbed_nano" in props["architectures"].split(",")  # the Nano 33 BLE's core
    assert props["includes"] == "mpq_model.h"
    src = out / "src"
    assert sorted(p.name for p in src.glob("*.c")) == fw["c"]
    assert sorted(p.name for p in src.glob("*.h")) == fw["h"]
    for f in fw["c"] + fw["h"]:
        if f != "mpq_model.c":
            assert (src / f).read_bytes() == (out / f).read_bytes(), f
    static = (src / "mpq_model.c").read_text()
    assert static.replace("#ifndef MPQ_ARENA_STATIC\n#define MPQ_ARENA_STATIC 1\n#endif\n",
                          "") != static
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "Arduino.h").write_text(ARDUINO_H)
    objects = _compile("arm-none-eabi-gcc", sorted(src.glob("*.c")),
                       [*M4, *WARN, "-std=gnu11", "-Os", "-ffunction-sections",
                        "-fdata-sections", f"-I{src}"], tmp_path / "obj")
    sketch = out / "examples" / name / f"{name}.ino"
    objects += _compile("arm-none-eabi-g++", [sketch],
                        [*M4, *WARN, *NO_RUNTIME, "-x", "c++", "-std=gnu++17", "-Os",
                         f"-I{src}", f"-I{stub}"], tmp_path / "obj")
    (tmp_path / "core.cpp").write_text(ARDUINO_CORE_M4)
    objects += _compile("arm-none-eabi-g++", [tmp_path / "core.cpp"],
                        [*M4, *NO_RUNTIME, "-Os", f"-I{stub}"], tmp_path / "obj")
    elf = tmp_path / "sketch.elf"
    r = subprocess.run(["arm-none-eabi-gcc", *M4, "--specs=nosys.specs", "-Wl,--gc-sections",
                        "-o", str(elf), *map(str, objects)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert ".mpq_arena" not in _sections(elf)
    header = (src / "mpq_model.h").read_text()
    arena = int(re.search(r"#define MPQ_ARENA_BYTES (\d+)", header).group(1))
    nm = subprocess.run(["arm-none-eabi-nm", "-S", str(elf)], capture_output=True, text=True,
                        check=True).stdout
    found = re.search(r"^([0-9a-f]+) ([0-9a-f]+) b mpq_arena$", nm, re.M)
    assert found and int(found.group(2), 16) == arena and int(found.group(1), 16) % 16 == 0


def test_arduino_sketch_prints_the_reference_output_on_the_host(fw, tmp_path: Path) -> None:
    """The example sketch, built for the host with a stub Arduino.h whose Serial writes to
    stdout, prints return code 0, the integer reference's output bytes for the constant input
    (every element the input zero point) and the export's arena size."""
    _need("gcc", "g++")
    out, name = fw["out"], fw["name"]
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "Arduino.h").write_text(ARDUINO_H)
    (tmp_path / "core.cpp").write_text(ARDUINO_CORE_HOST)
    src = out / "src"
    objects = _compile("gcc", sorted(src.glob("*.c")), ["-O1", "-std=c99", *WARN, f"-I{src}"],
                       tmp_path / "obj")
    objects += _compile("g++", [out / "examples" / name / f"{name}.ino", tmp_path / "core.cpp"],
                        ["-x", "c++", "-O1", *WARN, f"-I{src}", f"-I{stub}"],
                        tmp_path / "obj")
    exe = tmp_path / "sketch"
    subprocess.run(["g++", "-o", str(exe), *map(str, objects)], check=True, timeout=300)
    printed = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    plan, graph = load_plan(fw["plan"]), load_model(fw["root"] / "fashion_cnn.onnx")
    runner = PlanRunner(plan, graph)
    x = graph.inputs[0]
    zp = runner.mixed.acts[x].zero_point
    ref = runner.int_outputs(np.full((1, *graph.tensors[x].shape[1:]), zp, np.int64))
    expected = " ".join(str(v) for v in ref.reshape(-1).tolist())
    report = json.loads((out / "mpq_report.json").read_text())
    assert printed.splitlines()[:4] == [
        "mpq_model_run: 0", f"output 0 ({graph.outputs[0]}): {expected}",
        f"arena bytes: {report['predicted']['arena_bytes']}",
        f"scratch bytes: {report['predicted']['scratch_bytes']}"], printed


def test_platformio_manifest_selects_and_builds_the_exported_sources(fw, tmp_path: Path) -> None:
    """library.json: name, version, frameworks, platforms, and a build section whose srcDir and
    srcFilter select exactly the exported .c files (not the Arduino copies in src/), whose
    includeDir holds mpq_model.h and whose flags make the arena static; those sources compile
    for Cortex-M4 with -Werror and those flags, with no .mpq_arena section."""
    _need("arm-none-eabi-gcc")
    out = fw["out"]
    manifest = json.loads((out / "library.json").read_text())
    assert manifest["frameworks"] and manifest["platforms"]
    build = manifest["build"]
    base = out / build["srcDir"]
    assert (out / build["includeDir"] / "mpq_model.h").is_file()
    chosen: set[str] = set()
    every = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
    for rule in build["srcFilter"]:
        sign, pattern = rule[0], rule[2:-1]
        assert rule[1] == "<" and rule[-1] == ">" and sign in "+-", rule
        hit = {f for f in every if fnmatch.fnmatch(f, pattern)}
        chosen = chosen | hit if sign == "+" else chosen - hit
    assert sorted(chosen) == fw["c"]
    assert "-DMPQ_ARENA_STATIC" in build["flags"]
    objects = _compile("arm-none-eabi-gcc", [base / f for f in sorted(chosen)],
                       [*M4, *WARN, "-std=gnu11", "-Os", *build["flags"],
                        f"-I{out / build['includeDir']}"], tmp_path / "obj")
    assert all(".mpq_arena" not in _sections(o) for o in objects)


def test_library_targets_are_deterministic_and_untouched_when_unchanged(fw,
                                                                        tmp_path: Path) -> None:
    """Repeated and comma-separated --target give the same files; the same plan gives the same
    bytes with no absolute path; a second export rewrites nothing."""
    again = tmp_path / "again"
    r = run_mpq("export", fw["plan"], "-o", again, "--target", "cmake", "--target",
                "platformio,arduino", "--target", "zephyr")
    assert r.returncode == 0, r.stderr
    names = sorted(p.relative_to(fw["out"]).as_posix() for p in fw["out"].rglob("*")
                   if p.is_file())
    assert names == sorted(p.relative_to(again).as_posix() for p in again.rglob("*")
                           if p.is_file())
    for n in names:
        text = (fw["out"] / n).read_text()
        assert (again / n).read_text() == text, n
        assert str(fw["root"]) not in text, n
    before = {n: (again / n).stat().st_mtime_ns for n in names}
    plan, graph = load_plan(fw["plan"]), load_model(fw["root"] / "fashion_cnn.onnx")
    files = render_export(plan, graph, targets=("zephyr", "arduino", "platformio", "cmake"))
    assert write_export(files, again) == []
    assert before == {n: (again / n).stat().st_mtime_ns for n in names}


def test_library_names_and_text_from_a_hostile_model_name_are_inert(fw) -> None:
    """The model name is untrusted: the library name keeps letters, digits and `_`, and the
    text fields keep only characters that cannot quote or comment in YAML, Kconfig,
    properties, JSON or C++ (the render refuses anything else)."""
    plan, graph = load_plan(fw["plan"]), load_model(fw["root"] / "fashion_cnn.onnx")
    evil = dataclasses.replace(plan, model='x: "y"\n#$[1];{z}*.onnx')
    assert library_name(evil) == "mpq_x___y_____1___z__"
    files = render_export(evil, graph, targets=("zephyr", "arduino", "platformio"))
    module = yaml.safe_load(files["zephyr/module.yml"])
    assert module["name"] == library_name(evil)
    assert json.loads(files["library.json"])["name"] == library_name(evil)
    props = dict(line.split("=", 1) for line in files["library.properties"].splitlines())
    assert props["name"] == library_name(evil) and len(props) == 10


def test_library_targets_refuse_the_cmsis_nn_backend(fw) -> None:
    """Zephyr, Arduino and PlatformIO builds take the portable kernels: with --backend cmsis-nn
    one clear error, no files."""
    plan, graph = load_plan(fw["plan"]), load_model(fw["root"] / "fashion_cnn.onnx")
    for target in ("zephyr", "arduino", "platformio"):
        with pytest.raises(MpqError, match=f"--target {target} supports the portable backend"):
            render_export(plan, graph, "cmsis-nn", ("make", target))


# A stub of what the sketch uses from the Arduino core (Arduino.h: Serial, micros).
ARDUINO_H = r"""
#pragma once
#include <stdint.h>
unsigned long micros(void);
struct StubSerial {
    void begin(unsigned long);
    explicit operator bool() const { return true; }
    void print(const char *);
    void print(char);
    void print(int);
    void print(long);
    void print(unsigned long);
    template <typename T> void println(T v) { print(v); print('\n'); }
    void println() { print('\n'); }
};
extern StubSerial Serial;
void setup(void);
void loop(void);
"""

# The stub core on the M4: nowhere to print to, only link-complete.
ARDUINO_CORE_M4 = r"""
#include <Arduino.h>
StubSerial Serial;
unsigned long micros(void) { return 0; }
void StubSerial::begin(unsigned long) {}
void StubSerial::print(const char *) {}
void StubSerial::print(char) {}
void StubSerial::print(int) {}
void StubSerial::print(long) {}
void StubSerial::print(unsigned long) {}
int main() { setup(); loop(); return 0; }
"""

# The stub core on the host: Serial is stdout.
ARDUINO_CORE_HOST = r"""
#include <Arduino.h>
#include <stdio.h>
StubSerial Serial;
unsigned long micros(void) { return 0; }
void StubSerial::begin(unsigned long) {}
void StubSerial::print(const char *s) { fputs(s, stdout); }
void StubSerial::print(char c) { putchar(c); }
void StubSerial::print(int v) { printf("%d", v); }
void StubSerial::print(long v) { printf("%ld", v); }
void StubSerial::print(unsigned long v) { printf("%lu", v); }
int main() { setup(); loop(); return 0; }
"""
