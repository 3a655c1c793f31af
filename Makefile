.PHONY: setup test demo serve bench

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q tests

demo: setup
	.venv/bin/sensepack generate --demo "The capital of Mauritius is"
