#!/usr/bin/env bash
# mypy --strict over the package as it is installed: ledger/, with hooks/ as ledger/hooks and verify/
# as ledger/verify. The editable install maps those folders with an import hook mypy cannot follow
# (it would take every ledger.hooks/ledger.verify import as Any), so a tree of symlinks in the
# package layout is checked instead; paths in its messages start with build/typecheck/.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree"
mkdir -p "$tree/ledger"
for file in ledger/*.py ledger/py.typed; do ln -s "../../../$file" "$tree/ledger/"; done
ln -s ../../../hooks "$tree/ledger/hooks"
ln -s ../../../verify "$tree/ledger/verify"
MYPYPATH="$tree" .venv/bin/mypy --strict -p ledger
