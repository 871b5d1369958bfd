"""`python -m tools.mpq_fuzz`: run the fuzzer, print the outcome table, optionally write a report.

Exit code 0 when no case ended as a finding (anything but ok or a clean one-line error), else 1.
`--replay N` runs case N alone in this process with MPQ_DEBUG=1 and prints what each command
printed, with the traceback of an escaped exception.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tools.mpq_fuzz.runner import Options, markdown, outcome_table, run_cases, summarise


def _replay(opts: Options, index: int, save: Path | None) -> int:
    import tempfile
    import traceback

    from tools.mpq_fuzz.mutate import make_case
    from tools.mpq_fuzz.seeds import seed_models
    from tools.mpq_fuzz.worker import Worker

    case = make_case(opts.seed, index, seed_models())
    print(f"case {index} (seed {opts.seed}): {case.seed_name}: {'; '.join(case.mutations)}")
    if save is not None:
        save.write_bytes(case.data)
        print(f"model written to {save}")
    worker = Worker(opts.seed, opts.deep_every, Path(tempfile.mkdtemp(prefix="mpq_fuzz_")))
    os.environ["MPQ_DEBUG"] = "1"
    original = worker.invoke

    def invoke(args: list[str]):  # type: ignore[no-untyped-def]
        code, out, err, exc, detail = original(args)
        print(f"$ mpq {' '.join(args)}  -> exit {code}")
        print(("stdout: " + out[:2000]) if out else "", end="")
        print(("stderr: " + err[:2000]) if err else "", end="")
        if exc is not None and not isinstance(exc, SystemExit):
            traceback.print_exception(exc)
        return code, out, err, exc, detail

    worker.invoke = invoke  # type: ignore[method-assign]
    result = worker.run_bytes(case)
    print(f"outcome: {result.outcome}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.mpq_fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="First case index.")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="Seconds per case for import + inspect (default 30).")
    ap.add_argument("--deep-timeout", type=float, default=120.0,
                    help="Seconds for the deep steps of a sampled case (default 120).")
    ap.add_argument("--deep-every", type=int, default=25,
                    help="Run eval, search, export and gcc -fsyntax-only on 1 in N cases "
                         "that import (0: never).")
    ap.add_argument("--memory-mb", type=int, default=6144,
                    help="Address-space cap per worker (0: none).")
    ap.add_argument("--report", type=Path,
                    help="Write a Markdown report here and its JSON beside it (.json).")
    ap.add_argument("--json", dest="json_out", type=Path, help="Write the JSON summary here.")
    ap.add_argument("--replay", type=int, metavar="N", help="Run case N alone, verbosely.")
    ap.add_argument("--save", type=Path, help="With --replay: write the case's model here.")
    ap.add_argument("-q", "--quiet", action="store_true", help="No progress lines.")
    args = ap.parse_args(argv)
    opts = Options(cases=args.cases, seed=args.seed, workers=args.workers,
                   timeout=args.timeout, deep_timeout=args.deep_timeout,
                   deep_every=args.deep_every, memory_mb=args.memory_mb, start=args.start,
                   progress=not args.quiet)
    if args.replay is not None:
        return _replay(opts, args.replay, args.save)
    t0 = time.perf_counter()
    results = run_cases(opts)
    summary = summarise(results, opts, time.perf_counter() - t0)
    print(outcome_table(summary))
    for c in summary["causes"]:
        ex = c["example"]
        print(f"{c['outcome']} [{c['command']}] x{c['count']}: {c['cause']}  "
              f"(case {ex['index']}: {'; '.join(ex['mutations'])[:120]})")
    command = "python -m tools.mpq_fuzz " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(markdown(summary, command))
        args.report.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
