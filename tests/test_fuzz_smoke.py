"""A seeded run of the repository's fuzzer (tools/mpq_fuzz): every mutated ONNX model ends as a
success or as one `error:` line with exit 1 — no traceback, no internal error, no multi-line
error, no crash, no timeout, no half-written output, no exported C that fails to compile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO))

from tools.mpq_fuzz.mutate import make_case  # noqa: E402
from tools.mpq_fuzz.seeds import seed_models  # noqa: E402
from tools.mpq_fuzz.worker import BAD_OUTCOMES, classify  # noqa: E402

CASES = 300
SEED = 12


def test_seeded_fuzz_run_has_no_findings(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.mpq_fuzz", "--cases", str(CASES), "--seed", str(SEED),
         "--workers", "2", "--timeout", "60", "--deep-every", "5", "--json", str(out), "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = json.loads(out.read_text())
    outcomes = summary["outcomes"]
    assert summary["cases"] == CASES
    findings = {o: outcomes[o] for o in BAD_OUTCOMES}
    assert {"crash", "timeout", "traceback", "internal error", "multi-line error"} <= set(findings)
    assert all(n == 0 for n in findings.values()), (findings, proc.stdout[-3000:])
    assert proc.returncode == 0
    # The run reached deep code, not only the parser: clean imports, then eval, search, export
    # and a syntax check of the exported C.
    assert outcomes["ok"] > 20 and outcomes["clean error"] > 100
    assert summary["by_command"]["export"].get("ok", 0) > 0
    if shutil.which("gcc"):
        assert summary["by_command"]["compile"].get("ok", 0) > 0


def test_cases_are_deterministic_and_mix_both_levels() -> None:
    seeds = seed_models()
    a = [make_case(SEED, i, seeds) for i in range(60)]
    b = [make_case(SEED, i, seeds) for i in range(60)]
    assert [c.data for c in a] == [c.data for c in b]
    descs = " ".join("; ".join(c.mutations) for c in a)
    assert "attr" in descs and any(w in descs for w in ("flip", "insert", "truncate", "delete"))
    assert len({c.seed_name for c in a}) == len(seeds)


def test_classify_rules() -> None:
    assert classify(0, "", "", None) == "ok"
    assert classify(1, "", "error: x.onnx: bad\n", SystemExit(1)) == "clean error"
    assert classify(1, "", "internal error: KeyError: 3\n", SystemExit(1)) == "internal error"
    assert classify(1, "", "error: a\nb\n", SystemExit(1)) == "multi-line error"
    assert classify(1, "", "", ValueError("x")) == "traceback"
    assert classify(2, "", "Usage: mpq\n", SystemExit(2)) == "other"
