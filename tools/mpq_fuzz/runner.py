"""Keep worker subprocesses busy, bound each case in time, and summarise the outcomes.

A case that does not answer within its time bound is a `timeout` (its worker is killed and
replaced); a worker that dies mid-case is a `crash` (with the signal). Results are gathered by
case index, so the summary does not depend on the number of workers or on scheduling.
"""

from __future__ import annotations

import json
import os
import platform
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.mpq_fuzz.mutate import make_case
from tools.mpq_fuzz.seeds import seed_models
from tools.mpq_fuzz.worker import BAD_OUTCOMES, OUTCOMES

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 180.0


@dataclass
class Options:
    cases: int
    seed: int
    workers: int = 2
    timeout: float = 30.0  # per case: import + inspect
    deep_timeout: float = 120.0  # extra once a case goes on to eval/search/export
    deep_every: int = 25
    memory_mb: int = 6144
    start: int = 0
    progress: bool = False


@dataclass
class _Slot:
    proc: subprocess.Popen
    index: int | None = None
    deadline: float = 0.0
    buffer: bytes = b""
    workdir: Path = field(default_factory=Path)


def _spawn(opts: Options, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.pop("MPQ_DEBUG", None)
    env["PYTHONHASHSEED"] = "0"
    return subprocess.Popen(
        [sys.executable, "-m", "tools.mpq_fuzz.worker", str(opts.seed), str(opts.deep_every),
         str(opts.memory_mb), str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        cwd=REPO)


def _lost(index: int, outcome: str, line: str, opts: Options, seeds: dict[str, bytes]
          ) -> dict[str, Any]:
    """The result of a case whose worker never answered (regenerated here for its description)."""
    case = make_case(opts.seed, index, seeds)
    return {"index": index, "seed_name": case.seed_name, "mutations": case.mutations,
            "outcome": outcome, "steps": [{"command": "case", "outcome": outcome,
                                           "exit_code": -1, "line": line, "detail": ""}]}


def run_cases(opts: Options) -> list[dict[str, Any]]:
    """Run cases start .. start+cases-1 on `opts.workers` workers; results in index order."""
    seeds = seed_models()
    pending = list(range(opts.start, opts.start + opts.cases))[::-1]
    results: dict[int, dict[str, Any]] = {}
    root = Path(tempfile.mkdtemp(prefix="mpq_fuzz_"))
    sel = selectors.DefaultSelector()
    slots: list[_Slot] = []
    counter = 0

    def start_slot() -> _Slot:
        nonlocal counter
        counter += 1
        workdir = root / f"w{counter}"
        slot = _Slot(_spawn(opts, workdir), workdir=workdir)
        slot.deadline = time.monotonic() + STARTUP_SECONDS
        sel.register(slot.proc.stdout, selectors.EVENT_READ, slot)
        return slot

    def retire(slot: _Slot) -> None:
        sel.unregister(slot.proc.stdout)
        if slot.proc.poll() is None:
            slot.proc.kill()
        slot.proc.wait()
        slot.proc.stdout.close()
        slot.proc.stdin.close()
        shutil.rmtree(slot.workdir, ignore_errors=True)

    def feed(slot: _Slot) -> None:
        if not pending:
            slot.index = None
            return
        slot.index = pending.pop()
        slot.deadline = time.monotonic() + opts.timeout
        slot.proc.stdin.write(f"{slot.index}\n".encode())
        slot.proc.stdin.flush()

    def replace(slot: _Slot) -> None:
        retire(slot)
        slots.remove(slot)
        if pending:
            slots.append(start_slot())

    def progress() -> None:
        if opts.progress and len(results) % 200 == 0:
            bad = sum(r["outcome"] in BAD_OUTCOMES for r in results.values())
            print(f"  {len(results)}/{opts.cases} cases, {bad} findings", file=sys.stderr,
                  flush=True)

    try:
        for _ in range(max(1, min(opts.workers, opts.cases))):
            slots.append(start_slot())
        ready: set[int] = set()
        while slots and (pending or any(s.index is not None for s in slots)
                         or any(id(s) not in ready for s in slots)):
            now = time.monotonic()
            wait = max(0.0, min(s.deadline for s in slots) - now)
            for key, _ in sel.select(timeout=min(wait, 1.0)):
                slot: _Slot = key.data
                chunk = os.read(slot.proc.stdout.fileno(), 1 << 16)
                if not chunk:  # the worker died
                    code = slot.proc.wait()
                    if slot.index is not None:
                        sig = signal.Signals(-code).name if code < 0 else f"exit {code}"
                        results[slot.index] = _lost(slot.index, "crash",
                                                    f"worker died ({sig})", opts, seeds)
                        progress()
                    elif id(slot) not in ready:
                        raise RuntimeError("a fuzz worker failed to start (run "
                                           "`python -m tools.mpq_fuzz --replay 0` to see why)")
                    replace(slot)
                    continue
                slot.buffer += chunk
                while b"\n" in slot.buffer:
                    line, slot.buffer = slot.buffer.split(b"\n", 1)
                    msg = json.loads(line)
                    if "ready" in msg:
                        ready.add(id(slot))
                        feed(slot)
                    elif "deep" in msg:
                        slot.deadline = time.monotonic() + opts.deep_timeout
                    elif "result" in msg:
                        results[msg["result"]["index"]] = msg["result"]
                        progress()
                        feed(slot)
            now = time.monotonic()
            for slot in list(slots):
                if now < slot.deadline:
                    continue
                if slot.index is not None:
                    results[slot.index] = _lost(slot.index, "timeout",
                                                "no answer within the time bound", opts, seeds)
                    progress()
                    replace(slot)
                elif id(slot) not in ready:
                    raise RuntimeError("a fuzz worker did not start in time")
            if not pending and all(s.index is None for s in slots) and \
                    all(id(s) in ready for s in slots):
                break
    finally:
        for slot in slots:
            if slot.proc.poll() is None:
                try:
                    slot.proc.stdin.write(b"\n")
                    slot.proc.stdin.flush()
                except OSError:
                    pass
            try:
                slot.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            retire(slot)
        shutil.rmtree(root, ignore_errors=True)
    return [results[i] for i in sorted(results)]


# -- summary --------------------------------------------------------------------------------------

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")


def cause(line: str) -> str:
    """A message with its particulars (file, quoted names, numbers) blanked, so that one cause
    met by many cases counts once."""
    line = line.replace("case.onnx", "<model>").replace("out.mpq.onnx", "<normalised>")
    line = _QUOTED.sub("'…'", line)
    line = _NUMBER.sub("N", line)
    return line[:200]


def summarise(results: list[dict[str, Any]], opts: Options, seconds: float) -> dict[str, Any]:
    """Counts by outcome, by command, and every distinct cause of a finding with an example."""
    outcomes = Counter(r["outcome"] for r in results)
    by_step: dict[str, Counter] = {}
    causes: dict[tuple[str, str, str], dict[str, Any]] = {}
    clean: Counter = Counter()
    for r in results:
        for s in r["steps"]:
            by_step.setdefault(s["command"], Counter())[s["outcome"]] += 1
            if s["outcome"] == "clean error":
                clean[cause(s["line"])] += 1
            if s["outcome"] not in BAD_OUTCOMES:
                continue
            key = (s["outcome"], s["command"], cause(s["detail"] or s["line"]))
            entry = causes.setdefault(key, {
                "outcome": s["outcome"], "command": s["command"], "cause": key[2], "count": 0,
                "example": {"index": r["index"], "seed_model": r["seed_name"],
                            "mutations": r["mutations"], "line": s["line"],
                            "detail": s["detail"]}})
            entry["count"] += 1
    return {
        "seed": opts.seed, "cases": len(results), "first_case": opts.start,
        "workers": opts.workers, "timeout_s": opts.timeout, "deep_every": opts.deep_every,
        "seconds": round(seconds, 1), "machine": machine(),
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "findings": sum(outcomes.get(o, 0) for o in BAD_OUTCOMES),
        "by_command": {c: {o: n for o, n in sorted(v.items(), key=lambda kv: OUTCOMES.index(
            kv[0]))} for c, v in by_step.items()},
        "causes": sorted(causes.values(), key=lambda e: (OUTCOMES.index(e["outcome"]),
                                                          -e["count"], e["cause"])),
        "clean_error_causes": [{"cause": c, "count": n} for c, n in
                               sorted(clean.items(), key=lambda kv: (-kv[1], kv[0]))],
    }


def _version(distribution: str) -> str:
    """The installed version of a distribution, or "?" when it is not installed."""
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:
        return "?"


def machine() -> dict[str, Any]:
    """The machine and the versions that produced a report."""
    import mpq

    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "mpq_commit": commit,
            # mpq's own version is the checkout's that ran, whatever distribution is installed.
            "versions": {"mpq": mpq.__version__,
                         **{m: _version(m) for m in ("onnx", "onnxruntime", "numpy",
                                                     "protobuf", "click", "rich")}}}


def outcome_table(summary: dict[str, Any]) -> str:
    rows = ["| outcome | cases |", "| --- | ---: |"]
    rows += [f"| {o} | {n:,} |" for o, n in summary["outcomes"].items()]
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n").replace("`", "'")[:160]


def markdown(summary: dict[str, Any], command: str) -> str:
    """The human-readable report."""
    m = summary["machine"]
    lines = [
        "# mpq fuzz run", "",
        f"`{command}`", "",
        f"{summary['cases']:,} cases (seed {summary['seed']}, from case {summary['first_case']}), "
        f"{summary['workers']} workers, {summary['timeout_s']:g} s per case; eval, search, "
        f"export and a gcc syntax check of the C on 1 in {summary['deep_every']} cases that "
        f"import; {summary['seconds']:,} s.", "",
        f"Machine: {m['platform']}, {m['cores']} cores, Python {m['python']}, mpq commit "
        f"{m['mpq_commit'] or '?'}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".", "",
        "## Outcomes (worst per case)", "", outcome_table(summary), "",
        "## By command", "",
        "| command | " + " | ".join(OUTCOMES) + " |",
        "| --- |" + " ---: |" * len(OUTCOMES),
    ]
    for cmd, counts in summary["by_command"].items():
        lines.append(f"| {cmd} | " + " | ".join(f"{counts.get(o, 0):,}" for o in OUTCOMES) + " |")
    lines += ["", "## Findings by cause", ""]
    if not summary["causes"]:
        lines.append("None.")
    else:
        lines += ["| outcome | command | cases | cause | example case (seed model: mutations) |",
                  "| --- | --- | ---: | --- | --- |"]
        for c in summary["causes"]:
            ex = c["example"]
            lines.append(f"| {c['outcome']} | {c['command']} | {c['count']:,} | "
                         f"{_cell(c['cause'])} | {ex['index']} ({ex['seed_model']}: "
                         f"{_cell('; '.join(ex['mutations']))}) |")
    lines += ["", "## Most frequent clean errors", "",
              "Counted per command (import and inspect each see every case).", "",
              "| commands | message (particulars blanked) |",
              "| ---: | --- |"]
    lines += [f"| {c['count']:,} | {_cell(c['cause'])} |"
              for c in summary["clean_error_causes"][:40]]
    return "\n".join(lines) + "\n"
