#!/usr/bin/env bash
# Set up this host, build the tiny base image, and run the built-in default scenario
# (scenarios/tiny3.yaml: three tiny guests, KSM on until the merge curve levels off).
# Extra arguments go to `kvmksm bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
kvmksm image build
exec kvmksm bench "$@"
