#!/usr/bin/env bash
# kvmksm fleet on one machine: Debian guests with different kernels stand in for hosts.
#
#   scripts/fleet-demo.sh [-o DIR] [--kernels PKG...] [--scenario S] [--no-localhost]
#                         [--memory MIB] [--guest IMAGE:KERNEL:INITRD]...
#
# 1. builds the Debian guest image once per kernel package (kvmksm image build debian
#    --kernel PKG; default: linux-image-amd64 (6.1) and linux-image-6.12-amd64), or takes
#    ready images with --guest;
# 2. boots one guest per kernel under TCG, SSH forwarded from 127.0.0.1 (scripts/fleet_lab.py),
#    and writes the inventory (the guests, and this host unless --no-localhost);
# 3. runs `kvmksm fleet run` with the scenario (default ltp-ksm03-small: LTP ksm03's rounds
#    on 3 x 16 MiB, 3 repeats) on every host at once, into DIR (default reports/);
# 4. compares the kernels (kvmksm compare on the fleet folder) and prints where it is.
# The guests are always taken down. Timings between the guests are comparable (one emulated
# CPU); against this host they are not, and the comparison says so.
# Everything runs under the real-KSM lock (/tmp/kvmksm-realksm.lock) unless
# KVMKSM_REALKSM_LOCK_HELD=1 (a test that holds it already).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=reports
KERNELS=()
GUESTS=()
SCENARIO=ltp-ksm03-small
LOCALHOST=1
MEMORY=1024
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--output) OUT=$2; shift 2 ;;
    --scenario) SCENARIO=$2; shift 2 ;;
    --no-localhost) LOCALHOST=0; shift ;;
    --memory) MEMORY=$2; shift 2 ;;
    --guest) GUESTS+=("$2"); shift 2 ;;
    --kernels) shift; while [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; do KERNELS+=("$1"); shift; done ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "fleet-demo.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ${#KERNELS[@]} -eq 0 ] && [ ${#GUESTS[@]} -eq 0 ]; then
  KERNELS=(linux-image-amd64 linux-image-6.12-amd64)
fi
say() { printf '[fleet-demo] %s\n' "$*" >&2; }

if [ "${KVMKSM_FLEET_DEMO_NO_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=${KVMKSM_DATA_DIR:-/var/lib/kvmksm}
KEY=${KVMKSM_FLEET_KEY:-$DATA/ssh/id_ed25519}

for pkg in "${KERNELS[@]}"; do
  # Debian's default kernel is the plain Debian base (the one the tests and debian3 use: built
  # once); another kernel gets a base of its own.
  if [ "$pkg" = linux-image-amd64 ]; then
    name=kvmksm-debian
  else
    name="kvmksm-debian-$(printf '%s' "${pkg#linux-image-}" | tr -c 'A-Za-z0-9.\n-' '-')"
  fi
  say "guest image $name (kernel package $pkg)"
  kvmksm image build debian --kernel "$pkg" --name "$name" >&2
  GUESTS+=("$DATA/images/$name.qcow2:$DATA/images/$name.vmlinuz:$DATA/images/$name.initrd")
done

INVENTORY=$OUT/fleet-inventory.ini
LAB=(python3 scripts/fleet_lab.py --key "$KEY" --inventory "$INVENTORY" --memory "$MEMORY")
for g in "${GUESTS[@]}"; do LAB+=(--guest "$g"); done
[ "$LOCALHOST" = 1 ] || LAB+=(--no-localhost)
LAB+=(-- kvmksm fleet run "$INVENTORY" "$SCENARIO" -o "$OUT")
if [ "${KVMKSM_REALKSM_LOCK_HELD:-0}" != 1 ]; then
  LAB=(flock /tmp/kvmksm-realksm.lock "${LAB[@]}")
fi
status=0
"${LAB[@]}" || status=$?

name=$(kvmksm validate "$SCENARIO" | sed -n 's/.*scenario \([^;]*\);.*/\1/p')
FLEET=$(ls -td "$OUT/$name"/*-fleet 2>/dev/null | head -1 || true)
if [ -z "$FLEET" ]; then
  say "no fleet folder was written (exit status $status)"
  exit $(( status ? status : 1 ))
fi
cmp=0
kvmksm compare "$FLEET" || cmp=$?
say "fleet folder: $FLEET (fleet.json, one record per host)"
say "kernel comparison: $FLEET/kernels.html"
[ "$cmp" -eq 3 ] && say "the comparison cannot tell every difference (see above)"
exit "$status"
