# Everything goes through scripts/setup.sh, which is idempotent (a few seconds when all is in place).
.PHONY: setup lint test test-fast demo bench

setup:
	bash scripts/setup.sh

# The linter first (seconds; config in pyproject.toml), then the whole suite.
lint: setup
	.venv/bin/ruff check .

test: lint
	.venv/bin/python -m pytest -q

# Tests that start no server (tests/unit): the contracts, the codec, the registry, the docs; under a minute.
test-fast: lint
	.venv/bin/python -m pytest -q tests/unit

demo: setup
	.venv/bin/lmscope demo

bench: setup
	.venv/bin/python scripts/bench_transformers.py
