"""Run fuzz cases in-process through the real CLI (click's CliRunner), one interpreter per worker.

The runner starts this module as a subprocess and feeds it case indices on stdin, one per line;
the worker answers with one JSON line per case on a private copy of its stdout. Everything a
user would see is captured: the CLI's stdout and stderr (CliRunner), an exception that escapes
the CLI (a traceback), and native writes to file descriptor 2 (onnxruntime's C++ log), which
would otherwise interleave with the protocol.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.mpq_fuzz.mutate import Case, case_rng, make_case
from tools.mpq_fuzz.seeds import seed_models

# Worst first: a case's outcome is the worst outcome of the commands it ran.
OUTCOMES = ["crash", "timeout", "traceback", "internal error", "multi-line error",
            "partial output", "bad C", "other", "clean error", "ok"]
BAD_OUTCOMES = OUTCOMES[:8]
BOARD = "mps2-an386"  # 4 MiB SRAM and Flash: a mutated model that imports also fits


@dataclass
class Step:
    """One CLI command of a case and what the user saw."""

    command: str
    outcome: str
    exit_code: int
    line: str  # the first stderr line (or the exception), trimmed
    detail: str = ""  # the traceback's last line, for an exception that escaped


@dataclass
class CaseResult:
    index: int
    seed_name: str
    mutations: list[str]
    outcome: str
    steps: list[Step] = field(default_factory=list)


def worst(outcomes: list[str]) -> str:
    """The most severe of several outcomes (OUTCOMES order)."""
    return min(outcomes, key=OUTCOMES.index) if outcomes else "ok"


def classify(exit_code: int, stdout: str, stderr: str, exception: BaseException | None) -> str:
    """What a user saw, as one outcome. Rule: success is exit 0; a user error is exit 1 with
    exactly one `error:` line on stderr; anything else is a finding."""
    if exception is not None and not isinstance(exception, SystemExit):
        return "traceback"
    if "Traceback (most recent call last)" in stderr + stdout:
        return "traceback"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if exit_code == 0:
        return "ok"
    if exit_code != 1:
        return "other"
    if lines and "internal error" in lines[0]:
        return "internal error"
    if len(lines) != 1:
        return "multi-line error"
    return "clean error" if lines[0].startswith("error:") else "other"


def _trim(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + "…"


class Worker:
    """One interpreter: the CLI imported once, the seeds built once, a private scratch folder."""

    def __init__(self, run_seed: int, deep_every: int, workdir: Path) -> None:
        from click.testing import CliRunner

        from mpq.cli import main

        self.run_seed = run_seed
        self.deep_every = deep_every
        self.workdir = workdir
        self.seeds = seed_models()
        self.main = main
        self.runner = CliRunner()
        self.native_err: Any = None  # file that fd 2 points to while cases run

    def invoke(self, args: list[str]) -> tuple[int, str, str, BaseException | None, str]:
        result = self.runner.invoke(self.main, args, catch_exceptions=True)
        native = ""
        if self.native_err is not None:
            self.native_err.seek(0)
            native = self.native_err.read().decode("utf-8", "replace")
            self.native_err.seek(0)
            self.native_err.truncate()
        detail = ""
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            import traceback

            frames = traceback.extract_tb(result.exc_info[2]) if result.exc_info else []
            where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
            detail = f"{type(exc).__name__}: {_trim(str(exc), 200)}{where}"
        return result.exit_code, result.stdout, result.stderr + native, exc, detail

    def step(self, name: str, args: list[str]) -> Step:
        code, stdout, stderr, exc, detail = self.invoke(args)
        outcome = classify(code, stdout, stderr, exc)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        line = _trim(lines[0]) if lines else (detail or "")
        if outcome == "ok" and name == "inspect":
            try:
                json.loads(stdout)
            except ValueError:
                outcome, line = "other", "inspect --json printed no JSON"
        return Step(name, outcome, code, line, detail)

    def run_case(self, index: int, notify: Any = None) -> CaseResult:
        case = make_case(self.run_seed, index, self.seeds)
        return self.run_bytes(case, notify)

    def run_bytes(self, case: Case, notify: Any = None) -> CaseResult:
        os.chdir(self.workdir)
        for p in Path(".").iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        Path("case.onnx").write_bytes(case.data)
        steps = [self.step("import", ["import", "case.onnx", "-o", "out.mpq.onnx"])]
        if steps[0].outcome != "ok" and Path("out.mpq.onnx").exists():
            steps[0].outcome, steps[0].line = "partial output", "failed import left its output"
        steps.append(self.step("inspect", ["inspect", "case.onnx", "--json"]))
        deep = self.deep_every > 0 and \
            case_rng(self.run_seed, index_salt(case.index)).randrange(self.deep_every) == 0
        if deep and steps[0].outcome == "ok" and self._write_data(case.index):
            if notify is not None:
                notify()
            # eval runs the original model in onnxruntime: what mpq accepts, onnxruntime must run.
            steps.append(self.step("eval", ["eval", "case.onnx", "--data", "data.npz", "--calib",
                                            "data.npz", "--json", "-q"]))
            steps.append(self.step("search", [
                "search", "case.onnx", "--board", BOARD, "--data", "data.npz", "-o", "plan.json",
                "--strategy", "int8", "--patches", "none", "-q"]))
            if steps[-1].outcome == "ok":
                steps.append(self.step("export", ["export", "plan.json", "-o", "c", "-q"]))
            if steps[-1].outcome == "ok" and shutil.which("gcc"):
                steps.append(compile_export(Path("c")))
        return CaseResult(case.index, case.seed_name, case.mutations,
                          worst([s.outcome for s in steps]), steps)

    def _write_data(self, index: int) -> bool:
        """Random calibration data of the imported model's input shape (False: none to make)."""
        from mpq.frontend import load_model
        from mpq.quant.calibrate import onnx_input_shape

        try:
            graph = load_model("out.mpq.onnx")
            shape = onnx_input_shape(graph)
        except Exception:  # the steps above already judged this model
            return False
        if len(graph.inputs) != 1 or int(np.prod(shape)) > 1 << 20:
            return False
        rng = np.random.default_rng(index)
        classes = graph.tensors[graph.outputs[0]].shape[-1] if graph.outputs else 1
        np.savez("data.npz", x=rng.normal(0, 1, (4, *shape)).astype(np.float32),
                 y=rng.integers(0, max(int(classes), 1), 4))
        return True


def compile_export(folder: Path) -> Step:
    """Syntax-check the exported C with the host gcc: node and value names reach comments,
    strings and symbols there, so a hostile name must not break (or inject into) the code."""
    import subprocess

    sources = sorted(str(p) for p in folder.glob("*.c"))
    try:
        proc = subprocess.run(["gcc", "-fsyntax-only", "-std=c99", "-I", str(folder), *sources],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return Step("compile", "bad C", -1, "gcc -fsyntax-only timed out")
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    if proc.returncode == 0:
        return Step("compile", "ok", 0, "")
    return Step("compile", "bad C", proc.returncode, _trim(errors[0] if errors else proc.stderr))


def index_salt(index: int) -> int:
    """A second, independent stream per case for the deep-run draw."""
    return -1 - index


def _limit_memory(megabytes: int) -> None:
    """Cap the address space so a huge allocation fails in-process instead of swapping."""
    import resource

    if megabytes > 0:
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(run_seed: int, deep_every: int, memory_mb: int, workdir: Path) -> None:
    """The worker loop: case index in on stdin, one JSON line out per case. The runner owns
    `workdir` (and removes it even when this process dies)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _limit_memory(memory_mb)
        worker = Worker(run_seed, deep_every, workdir)
        native = tempfile.TemporaryFile(dir=workdir.parent)  # outside the per-case cleanup
        os.dup2(native.fileno(), 2)
        worker.native_err = native
        proto.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            if not line.strip():
                break
            index = int(line)

            def notify(index: int = index) -> None:
                proto.write(json.dumps({"deep": index}) + "\n")

            result = worker.run_case(index, notify)
            proto.write(json.dumps({"result": asdict(result)}) + "\n")
    finally:
        os.chdir(tempfile.gettempdir())


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
