# Everything goes through scripts/setup.sh, which is idempotent (a few seconds when all is in place).
.PHONY: setup test demo bench

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/lmscope demo

bench: setup
	.venv/bin/python scripts/bench.py
