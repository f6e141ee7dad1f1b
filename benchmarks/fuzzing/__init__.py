"""A fuzz suite over every file the project reads (benchmarks/fuzz.py runs it; tests/test_fuzz.py
runs a fast slice in CI): seed model files, seeded mutators, and a fork server that runs each
mutated case through `fanformer generate` in a child with a memory cap and a time limit."""
