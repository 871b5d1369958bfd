"""mpq_fuzz: mutate small ONNX models and run each through the real `mpq` CLI.

Run it like a benchmark: ``python -m tools.mpq_fuzz --cases 10000 --seed 1 --report
benchmarks/results/fuzz.md``. Every bad input must end as one `error:` line on stderr with exit
code 1; the fuzzer counts every other outcome (internal error, traceback, multi-line error,
timeout, crash) and names its causes. The same seed gives the same cases and, timeouts aside,
the same outcomes.

Modules: `seeds` builds the seed models, `mutate` turns (seed, case index) into the bytes of
one mutated model, `worker` runs cases in-process through click's CliRunner, `runner` keeps
worker subprocesses busy under a per-case time bound and writes the report.
"""
