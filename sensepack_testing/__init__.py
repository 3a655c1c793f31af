"""Helpers for the tests and benchmarks, kept out of the wheel (pyproject's package list leaves this package
out): `sensepack_testing.serve` runs a real server on 127.0.0.1 and publishes demo packs;
`sensepack_testing.vllm` saves the tiny GPT-J that vLLM loads and makes random packs. Import them from the
repo root (pytest's rootdir, or `sys.path` as bench/ scripts set it)."""
