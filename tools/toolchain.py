"""Versions of the tools every measured number depends on (cross compiler, QEMU).

One place for the probe, shared by the table generators in `tools/` and by
`benchmarks/run.py`, so a result file and a measured table record them the same way.
"""
from __future__ import annotations

import re
import subprocess


def tool_version(cmd: list[str], pattern: str) -> str:
    """The first match of `pattern` in a tool's version banner, "absent" when the tool is not
    installed, "unknown" when the banner does not match."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    found = re.search(pattern, proc.stdout + proc.stderr)
    return found.group(1) if found else "unknown"


def cross_versions() -> dict[str, str]:
    """{"gcc_arm": arm-none-eabi-gcc's version, "qemu": qemu-system-arm's version}."""
    return {"gcc_arm": tool_version(["arm-none-eabi-gcc", "--version"], r"\) (\d[\w.\-]*)"),
            "qemu": tool_version(["qemu-system-arm", "--version"], r"version (\S+)")}
