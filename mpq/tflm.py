"""TensorFlow Lite Micro as an oracle: the arena its planner allocates for an int8 `.tflite`.

Uses PyPI `tflite-micro` (`tflite_micro.python.tflite_micro.runtime.Interpreter`). Its
`print_allocations()` writes from C++ straight to the process's stdout, so it runs in a child
process and the numbers are read from that output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mpq.errors import MpqError

_SCRIPT = """
import sys
from tflite_micro.python.tflite_micro import runtime
interp = runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2]))
sys.stdout.flush()
interp.print_allocations()
sys.stdout.flush()
"""


@dataclass(frozen=True)
class TflmArena:
    """Arena bytes TFLM's RecordingMicroAllocator reports: planned head and persistent tail."""

    total: int
    head: int
    tail: int


def tflm_arena(model: str | Path, arena_size: int = 4 << 20) -> TflmArena:
    """Run TFLM's allocator on `model` and return the arena it planned."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(model), str(arena_size)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MpqError(f"{model}: TFLM interpreter failed: {last}")
    found = {}
    printed = proc.stdout + proc.stderr  # TFLM's MicroPrintf goes to either, by build
    for key in ("total", "head", "tail"):
        m = re.search(rf"Arena allocation {key} (\d+) bytes", printed)
        if m is None:
            raise MpqError(f"{model}: TFLM did not report its arena {key}")
        found[key] = int(m.group(1))
    return TflmArena(**found)
