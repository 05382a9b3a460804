#!/usr/bin/env bash
# Run the whole test suite: installs and starts what the tests need first (scripts/setup.sh).
# Tests that use the host's real KSM run one at a time (never use pytest -n here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check kvmksm tests bench
exec python3 -m pytest -rs "$@"
