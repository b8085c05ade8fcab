# The two commands of the README (demo, test). Each installs what it needs into .venv first.
.PHONY: demo test setup lint bench campaign

setup:
	bash scripts/setup.sh

demo:
	CHROMIUM=0 bash scripts/setup.sh
	.venv/bin/python examples/charlm.py --out demo-out

test: setup
	.venv/bin/python -m pytest -n 2 --dist loadfile

# What keeps the layers apart and the types honest; .ci/run runs it after the tests.
lint: setup
	.venv/bin/python -m pip install --quiet --disable-pip-version-check "ruff>=0.6" "mypy>=1.10"
	.venv/bin/ruff check ledger hooks verify tests examples benchmarks
	bash scripts/typecheck.sh

bench: setup
	.venv/bin/python benchmarks/ledger_core.py

# The long reliability campaigns (crashes, full disk, every cell mutated, hostile input, fuzzing);
# regenerates docs/RELIABILITY.md. About 30 minutes on 2 cores; QUICK=1 for a few minutes.
campaign: setup
	.venv/bin/python benchmarks/reliability.py $(if $(QUICK),--quick,)
