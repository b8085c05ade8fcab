# The two commands of the README. Each installs what it needs into .venv first.
.PHONY: demo test setup lint bench

setup:
	bash scripts/setup.sh

demo:
	CHROMIUM=0 bash scripts/setup.sh
	.venv/bin/python examples/charlm.py --out demo-out

test: setup
	.venv/bin/python -m pytest -n 2 --dist loadfile

lint: setup
	.venv/bin/python -m pip install --quiet ruff mypy
	.venv/bin/ruff check ledger hooks verify tests examples benchmarks
	.venv/bin/mypy ledger verify hooks

bench: setup
	.venv/bin/python benchmarks/ledger_core.py
