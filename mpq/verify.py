"""`mpq verify`: the exported C against the integer reference, byte for byte (DESIGN §8).

The plan is exported into a temporary directory, built with a small harness — host gcc for
`host`; `arm-none-eabi-gcc`, mpq's start-up code and semihosting for `qemu-m4` / `qemu-m7`
(`mpq.firmware`) — and run on the given inputs. Every byte of every graph output is compared
with what `mpq.evaluate.PlanRunner` computes, and the mismatches are counted per output. Under
QEMU the icount plugin counts the instructions of each inference exactly, and the linked
sections are measured against the board.

With `backend="cmsis-nn"` the export calls CMSIS-NN from the checkout named by $CMSIS_NN_PATH;
its sources (only those the export calls) are compiled with the target's flags and linked in.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpq.codegen import cmsis
from mpq.codegen.export import c_sources, render_export, write_export
from mpq.codegen.render import render
from mpq.errors import MpqError
from mpq.evaluate import PlanRunner
from mpq.interpreter import to_ir_layout
from mpq.ir import Graph
from mpq.plan import Plan
from mpq.sim import quantize_input

_LOG = logging.getLogger(__name__)  # `mpq -v`: the commands run

TARGETS = ("host", "qemu-m4", "qemu-m7")
C_FLAGS = ("-O2", "-std=c99", "-Wall", "-Wextra", "-Werror")


@dataclass
class VerifyResult:
    """What `mpq verify` reports (`--json` keys)."""

    target: str
    samples: int
    mismatches: int
    instructions: int | None = None  # per inference (QEMU targets)
    flash_bytes: int | None = None
    sram_bytes: int | None = None
    backend: str = "portable"
    #: Per graph output, in order: name, bytes compared (all samples) and mismatched bytes;
    #: `mismatches` is their sum, so it counts every output.
    outputs: list[dict] = field(default_factory=list)
    # QEMU targets, measured (`budget.build_breakdown`): the model's SRAM (arena, scratch, its
    # own .data/.bss) apart from the harness's test vectors (every sample's input and output
    # linked into verify_main.c) and the stack.
    model_sram_bytes: int | None = None
    test_vector_bytes: int | None = None
    stack_bytes: int | None = None
    model_flash_bytes: int | None = None
    #: `--per-layer` (QEMU targets): one row per layer (`mpq.per_layer.rows`); their
    #: `instructions_all` add up to `instructions_all`, every inference's instructions.
    per_layer: list[dict] | None = None
    instructions_all: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def reference_outputs(plan: Plan, graph: Graph, x: np.ndarray
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The int8 inputs (IR layout) and the integer reference's outputs for float inputs: every
    graph output, int8 in the IR layout (what the export writes), by name in graph order."""
    runner = PlanRunner(plan, graph)
    name = graph.inputs[0]
    xq = quantize_input(runner.mixed.acts[name], to_ir_layout(graph, name, x))
    outs = runner.int_output_dict(xq)
    return xq.astype(np.int8), {o: outs[o].astype(np.int8) for o in graph.outputs}


def split_outputs(raw: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The harness's output file — per sample every output back to back, in graph order
    (`MPQ_OUTPUTS_BYTES`) — split into one [samples, bytes] array per output; MpqError when its
    size is not what the reference's outputs add up to."""
    samples = len(next(iter(ref.values())))
    sizes = [int(np.prod(r.shape[1:], dtype=np.int64)) for r in ref.values()]
    if raw.size != samples * sum(sizes):
        raise MpqError(f"the exported model wrote {raw.size} output bytes, expected "
                       f"{samples * sum(sizes)} ({samples} samples × {len(sizes)} outputs)")
    per = raw.reshape(samples, sum(sizes))
    bounds = np.cumsum([0, *sizes])
    return {name: per[:, bounds[k]:bounds[k + 1]] for k, name in enumerate(ref)}


def compare_outputs(raw: np.ndarray, ref: dict[str, np.ndarray]) -> list[dict]:
    """Byte-for-byte comparison of every output (`split_outputs`) with the reference: per
    output its name, the bytes compared and how many differ."""
    got = split_outputs(raw, ref)
    return [{"name": name, "bytes": int(got[name].size),
             "mismatches": int((got[name] != r.reshape(len(r), -1)).sum())}
            for name, r in ref.items()]


@dataclass
class _Built:
    """An export written for a build: its sources, and the CMSIS-NN it calls."""

    sources: list[Path]
    library: list[Path]  # CMSIS-NN sources to compile as a library
    includes: list[Path]


def _export(plan: Plan, graph: Graph, out_dir: Path, backend: str) -> _Built:
    files = render_export(plan, graph, backend)
    write_export(files, out_dir)
    sources = [out_dir / n for n in c_sources(files)]
    used = json.loads(files["mpq_report.json"]).get("cmsis_nn")
    if not used:
        return _Built(sources, [], [])
    root = cmsis.cmsis_nn_root(used["sources"])
    return _Built(sources, [root / s for s in used["sources"]], [root / "Include"])


def _failure(rc: int) -> str:
    """What the harness's exit status 2 − rc says about mpq_model_run's return code rc."""
    code = 2 - rc
    if code == -16:
        return "a CMSIS-NN kernel needs more scratch than MPQ_CMSIS_SCRATCH_BYTES"
    if code == -17:
        return "a CMSIS-NN kernel refused its arguments"
    return f"kernel error {code}"


def run_host(plan: Plan, graph: Graph, xq: np.ndarray, work: Path,
             backend: str = "portable") -> np.ndarray:
    """Build the export with host gcc and run it on the int8 inputs."""
    from mpq import firmware

    built = _export(plan, graph, work, backend)
    objects = firmware.library_objects(built.library, built.includes, None, work / "lib") \
        if built.library else []
    (work / "mpq_host_main.c").write_text(render("c/mpq_host_main.c.j2"))
    exe = work / "mpq_host"
    cmd = ["gcc", *C_FLAGS, "-I", str(work), *(f"-I{d}" for d in built.includes), "-o",
           str(exe), str(work / "mpq_host_main.c"), *map(str, built.sources),
           *map(str, objects)]
    _LOG.info("$ %s", shlex.join(map(str, cmd)))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["?"])[0]
        raise MpqError(f"host build of the export failed: {first}")
    (work / "in.bin").write_bytes(xq.tobytes())
    proc = subprocess.run([str(exe), str(work / "in.bin"), str(work / "out.bin")],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise MpqError(f"the exported model failed on the host (exit {proc.returncode}: "
                       f"{_failure(proc.returncode)})")
    return np.frombuffer((work / "out.bin").read_bytes(), np.int8)


def run_qemu_target(plan: Plan, graph: Graph, xq: np.ndarray, work: Path,
                    target: str, backend: str = "portable",
                    per_layer: bool = False) -> tuple[np.ndarray, int, dict]:
    """Cross-build the export for the target's QEMU machine and run it there. With
    `per_layer` the same build's run is split into layers (`mpq.per_layer`) and the sizes dict
    also holds `per_layer` rows and `instructions_all`."""
    from mpq import firmware
    from mpq import per_layer as pl

    tools = firmware.require_tools(target)
    machine, _ = firmware.TARGETS[target]
    built = _export(plan, graph, work, backend)
    board = firmware.target_board(target)
    objects = firmware.library_objects(built.library, built.includes, board, work / "lib",
                                       toolchain=tools) if built.library else []
    samples = len(xq)
    (work / "verify_main.c").write_text(render("firmware/verify_main.c.j2", target=target,
                                               samples=samples))
    elf = firmware.build_elf([work / "verify_main.c", *built.sources, *objects],
                             [work, *built.includes], board, work / "build", toolchain=tools,
                             extra_flags=("-Werror",))
    context = keys = None
    marks: list[tuple[int, int]] = []
    if per_layer:
        from mpq.codegen.export import export_context

        context = export_context(plan, graph, backend)
        keys = pl.segment_keys(context)
        binutils = Path(tools.nm).name[:-2]  # arm-none-eabi-: objdump, addr2line beside nm
        marks = pl.marks(pl.code_lines(elf, str(Path(tools.nm).with_name(binutils + "objdump")),
                                       str(Path(tools.nm).with_name(binutils + "addr2line"))),
                         pl.line_segments((work / pl.MODEL_FILE).read_text()), keys)
    run = firmware.run_qemu(elf, machine, work / "run", {"in.bin": xq.tobytes()},
                            toolchain=tools, marks=marks)
    if run.returncode != 0:
        raise MpqError(f"the exported model failed on {machine} (exit {run.returncode}: "
                       f"{_failure(run.returncode)})")
    out = np.frombuffer(run.files["out.bin"], np.int8)
    per = run.instructions_window // max(run.windows, 1)
    from mpq.budget import build_breakdown

    sizes = firmware.section_sizes(elf, tools)
    extra: dict = {}
    if per_layer:
        if sum(run.segments.values()) != run.instructions_window:
            raise MpqError(f"internal error: the per-layer segments add up to "
                           f"{sum(run.segments.values())}, the window to "
                           f"{run.instructions_window} instructions")
        extra = {"per_layer": pl.rows(plan, graph, context, run.segments, samples),
                 "instructions_all": run.instructions_window}
    return out, per, {**sizes, **build_breakdown(elf, sizes, tools.nm), **extra}


def verify(plan: Plan, graph: Graph, x: np.ndarray, target: str,
           backend: str = "portable", per_layer: bool = False) -> VerifyResult:
    """Export for `backend`, build, run on `x` (float inputs, model layout) and compare with the
    reference. The cmsis-nn backend needs $CMSIS_NN_PATH (checked first). `per_layer` (QEMU
    targets only) counts every layer's instructions too (`mpq.per_layer`)."""
    if target not in TARGETS:
        raise MpqError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    if per_layer and target == "host":
        raise MpqError("verify: --per-layer counts instructions under QEMU: use --target "
                       "qemu-m4 or qemu-m7")
    if cmsis.check_backend(backend) == "cmsis-nn":
        cmsis.cmsis_nn_root([])  # the checkout itself; the sources the export needs come later
    xq, ref = reference_outputs(plan, graph, x)
    with tempfile.TemporaryDirectory(prefix="mpq-verify-") as tmp:
        work = Path(tmp)
        if target == "host":
            out = run_host(plan, graph, xq, work, backend)
            instructions, sizes = None, {}
        else:
            out, instructions, sizes = run_qemu_target(plan, graph, xq, work, target, backend,
                                                       per_layer)
    per_output = compare_outputs(out, ref)
    mismatches = sum(o["mismatches"] for o in per_output)
    vectors = sizes.get("io_buffer_bytes")
    return VerifyResult(target, len(xq), mismatches, instructions,
                        sizes.get("flash_bytes"), sizes.get("sram_bytes"), backend, per_output,
                        model_sram_bytes=None if vectors is None
                        else sizes["model_sram_bytes"] - vectors,
                        test_vector_bytes=vectors, stack_bytes=sizes.get("stack_bytes"),
                        model_flash_bytes=sizes.get("model_flash_bytes"),
                        per_layer=sizes.get("per_layer"),
                        instructions_all=sizes.get("instructions_all"))
