"""`mpq eval` / `mpq run --engine`: run a plan through its own exported C (issue 17, item 3).

The plan is exported (portable backend) into a temporary directory, compiled by the host C
compiler into a shared library with the arena as a plain static array (`-DMPQ_ARENA_STATIC`),
loaded with ctypes, and `mpq_model_run` is called once per sample. The export is what the
firmware runs and `mpq verify` checks byte for byte against the integer reference, so this
engine gives the numpy reference's bytes (`mpq.evaluate.PlanRunner`, still the oracle of the
tests) at compiled speed. It builds once per runner; the build directory is removed as soon as
the library is loaded (the loaded code stays mapped). Compiled objects are kept in
`<tmp>/mpq-<uid>/engine/` under the sha256 of everything they depend on (compiler binary,
flags, the C file, every header of the export), so the same plan evaluated again skips the
compile and a changed one can never hit a stale object.

Engines: `numpy` (the integer reference), `c` (this), `auto` (c when `cc` or `gcc` is on PATH
and the plan exports, else numpy with a one-line note).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpq.codegen.export import export_sources, render_export, write_export
from mpq.errors import MpqError
from mpq.evaluate import PlanRunner
from mpq.interpreter import from_ir_layout, to_ir_layout
from mpq.ir import Graph

_LOG = logging.getLogger(__name__)  # `mpq -v`: the compile command

ENGINES = ("auto", "c", "numpy")
#: Position-independent objects for a shared library, the arena a static array (no
#: .mpq_arena linker section). -O3, not -O2: GCC 12 vectorises the kernels' inner loops only
#: there, measured about 2× faster on VWW (benchmarks/engine_speed.py); the code is
#: integer-only, so the bytes do not depend on it. -DMPQ_HOST_FAST takes the kernels' host-only
#: paths (kernels/mpq_support.h: the 8-bit dot product by SSE2's PMADDWD, 3×3 depthwise rows
#: the compiler vectorises): the same sums modulo 2^32 in another order, so the same bytes
#: (tests/test_c_kernels.py runs every kernel test on that build too), about 2.5× faster on
#: VWW. No -march: the objects stay portable across the hosts that share a cache directory.
C_FLAGS = ("-O3", "-fPIC", "-std=c99", "-DMPQ_ARENA_STATIC", "-DMPQ_HOST_FAST")


def host_compiler() -> str | None:
    """The host C compiler: `cc`, else `gcc`, from PATH; None if neither is there."""
    for name in ("cc", "gcc"):
        path = shutil.which(name)
        if path:
            return path
    return None


def resolve_engine(engine: str, note: Callable[[str], None] | None = None) -> str | None:
    """The compiler the engine runs with, or None for the numpy reference.

    `c` without a compiler is MpqError; `auto` without one falls back to numpy and says so
    through `note` (one line).
    """
    if engine not in ENGINES:
        raise MpqError(f"--engine must be one of {', '.join(ENGINES)}, not '{engine}'")
    if engine == "numpy":
        return None
    cc = host_compiler()
    if cc is None:
        if engine == "c":
            raise MpqError("--engine c: no host C compiler (cc or gcc) on PATH; install one "
                           "or use --engine numpy")
        if note is not None:
            note("no host C compiler (cc or gcc) on PATH: running the plan with the numpy "
                 "reference (slower; --engine numpy says so explicitly)")
    return cc


class CPlanRunner(PlanRunner):
    """A `PlanRunner` whose integer outputs come from the plan's exported C, compiled for the
    host; input quantisation and layouts stay PlanRunner's, so `outputs` and `predictions`
    are the same bytes and classes as the numpy reference."""

    def __init__(self, plan, graph: Graph, cc: str) -> None:
        super().__init__(plan, graph)
        x = graph.inputs[0]
        self._in_shape = tuple(graph.tensors[x].shape[1:])
        self._out_shapes = {y: tuple(graph.tensors[y].shape[1:]) for y in graph.outputs}
        self._lib = _compile(plan, graph, cc)
        self._run = self._lib.mpq_model_run
        self._run.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        self._run.restype = ctypes.c_int
        # The export's own float -> int8 input helper (byte for byte mpq.sim.quantize_input on
        # float32 data), used when the plan's input is 8-bit, the only width it writes.
        self._quantize = None
        if _input_bits(self) == 8 and hasattr(self._lib, "mpq_quantize_input"):
            self._quantize = self._lib.mpq_quantize_input
            self._quantize.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
            self._quantize.restype = None

    #: Samples quantised and run per step by `output_dict`.
    CHUNK = 16

    def output_dict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """PlanRunner.output_dict (the same quantisation and layouts). The input is quantised by
        the export's `mpq_quantize_input`, one call per sample, on the float32 batch in the IR
        layout (`to_ir_layout` makes it that), which is what the numpy reference quantises:
        same bytes, a fifth of the CPU time of the reference's float64 passes on VWW. Without
        the helper, CHUNK samples at a time: the float64 temporaries of `quantize_input` then
        stay a few MB (over a batch of 300 VWW images they were 66 MB arrays, whose first-touch
        page faults cost more CPU time than running the model)."""
        if self._quantize is not None:
            g = self.graph
            x = to_ir_layout(g, g.inputs[0], batch)  # float32, C order, shape checked
            xq = np.empty(x.shape, np.int8)
            step_x, step_q = (x[0].nbytes, xq[0].nbytes) if len(x) else (0, 0)
            for i in range(len(x)):
                self._quantize(x.ctypes.data + i * step_x, xq.ctypes.data + i * step_q)
            return {y: from_ir_layout(g, y, v) for y, v in self.int_output_dict(xq).items()}
        if len(batch) <= self.CHUNK:
            return super().output_dict(batch)
        parts = [super(CPlanRunner, self).output_dict(batch[i:i + self.CHUNK])
                 for i in range(0, len(batch), self.CHUNK)]
        return {y: np.concatenate([part[y] for part in parts]) for y in parts[0]}

    def int_output_dict(self, x_ir: np.ndarray) -> dict[str, np.ndarray]:
        """The compiled model's outputs — every graph output, int64 as the reference's, in the
        IR layout — for a batch of int8 inputs in the IR layout: one `mpq_model_run` per
        sample, `outputs[k]` pointing into output k's batch array."""
        x = np.ascontiguousarray(x_ir, dtype=np.int8)
        n = len(x)
        if x.shape[1:] != self._in_shape:
            raise MpqError(f"--engine c: input batch of shape {list(x.shape)}, the model "
                           f"takes {[n, *self._in_shape]}")
        outs = {y: np.empty((n, *shape), np.int8) for y, shape in self._out_shapes.items()}
        arrays = list(outs.values())
        pointers = (ctypes.c_void_p * len(arrays))()
        step_in = x[0].nbytes if n else 0
        for i in range(n):
            for k, a in enumerate(arrays):
                pointers[k] = a.ctypes.data + i * a[0].nbytes
            rc = self._run(x.ctypes.data + i * step_in, pointers)
            if rc != 0:
                raise MpqError(f"--engine c: the exported model failed on sample {i} "
                               f"(mpq_model_run returned {rc})")
        return {y: a.astype(np.int64) for y, a in outs.items()}

    def int_outputs(self, x_ir: np.ndarray) -> np.ndarray:
        """Integer first output (int64, as the reference's) for a batch of int8 inputs in the
        IR layout (`int_output_dict` has every output)."""
        return self.int_output_dict(x_ir)[self.graph.outputs[0]]


def _input_bits(runner: PlanRunner) -> int:
    """The bit width of the plan's (first) input activation."""
    return runner.mixed.acts[runner.graph.inputs[0]].bits


def _cache_dir() -> Path | None:
    """`<tmp>/mpq-<uid>/engine`, for compiled objects keyed by content; None (nothing cached)
    when it cannot be made or is not this user's alone (another user could plant code)."""
    directory = Path(tempfile.gettempdir()) / f"mpq-{os.getuid()}" / "engine"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (directory.parent, directory):
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                return None
    except OSError:
        return None
    return directory


def _compiler_identity(cc: str) -> bytes:
    """What a cached object depends on besides its sources: the compiler binary (resolved
    path, size, mtime) and the flags."""
    real = Path(cc).resolve()
    try:
        st = real.stat()
    except OSError:
        return f"{real}|{' '.join(C_FLAGS)}".encode()
    return f"{real}|{st.st_size}|{st.st_mtime_ns}|{' '.join(C_FLAGS)}".encode()


def _object(cc: str, source: Path, key: str, cache: Path | None) -> Path:
    """`source` compiled to an object (C_FLAGS), or the cached object of the same key."""
    if cache is not None and (cache / f"{key}.o").is_file():
        return cache / f"{key}.o"
    obj = source.with_suffix(".o")
    cmd = [cc, *C_FLAGS, "-I", str(source.parent), "-c", str(source), "-o", str(obj)]
    _LOG.info("$ %s", shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MpqError(f"--engine c: cannot run {cc} ({exc})") from None
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["?"])[0]
        raise MpqError(f"--engine c: host build of the export failed: {first}")
    if cache is not None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".obj-", suffix=".o", dir=cache)
            with os.fdopen(fd, "wb") as f:
                f.write(obj.read_bytes())
            os.replace(tmp, cache / f"{key}.o")  # atomic: a parallel run sees all or nothing
        except OSError:
            pass  # not cached; this run still has its object
    return obj


def _compile(plan, graph: Graph, cc: str) -> ctypes.CDLL:
    """Export the plan into a temporary directory, compile each C file (or take its object
    from the content-keyed cache: compiler, flags, the file and every header of the export),
    link a shared library and load it; the directory is gone when this returns."""
    files = render_export(plan, graph, "portable")
    names = export_sources(files)
    ident = _compiler_identity(cc)
    headers = b"".join(f"{n}\0{files[n]}\0".encode() for n in names["h"])
    cache = _cache_dir()
    with tempfile.TemporaryDirectory(prefix="mpq-engine-") as tmp:
        work = Path(tmp)
        write_export(files, work)
        objects = []
        for name in names["c"]:
            key = hashlib.sha256(b"\0".join([ident, name.encode(), files[name].encode(),
                                              headers])).hexdigest()
            objects.append(_object(cc, work / name, key, cache))
        lib = work / "libmpq_model.so"
        cmd = [cc, "-shared", "-o", str(lib), *map(str, objects)]
        _LOG.info("$ %s", shlex.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["?"])[0]
            raise MpqError(f"--engine c: linking the export failed: {first}")
        try:
            return ctypes.CDLL(str(lib))
        except OSError as exc:
            raise MpqError(f"--engine c: cannot load the compiled export ({exc})") from None


def plan_runner(plan, graph: Graph, engine: str = "auto",
                note: Callable[[str], None] | None = None) -> PlanRunner:
    """The runner of a plan for `--engine` (see the module docstring). Under `auto`, a plan
    the export refuses (or a failed build) runs on the numpy reference, with a note why; under
    `c` that is the error."""
    cc = resolve_engine(engine, note)
    if cc is None:
        return PlanRunner(plan, graph)
    try:
        return CPlanRunner(plan, graph, cc)
    except MpqError as exc:
        if engine == "c":
            raise
        if note is not None:
            note(f"the C engine cannot run this plan ({exc}); running the numpy reference")
        return PlanRunner(plan, graph)
