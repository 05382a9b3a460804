#!/usr/bin/env bash
# Set up this host and run the built-in default scenario: `kvmksm bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec kvmksm bench "$@"
