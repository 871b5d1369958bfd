"""Developer tools kept with the project (not installed): the instruction counter, the fuzzer."""
