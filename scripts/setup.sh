#!/usr/bin/env bash
# Install and start everything kvmksm and its tests need, on a fresh Debian 12 host.
# Idempotent: safe to run again. Needs root (it installs packages and starts daemons).
set -euo pipefail
cd "$(dirname "$0")/.."

# mmdebstrap, dpkg-dev (its eatmydata hook), debian-archive-keyring and openssh-client
# (ssh-keygen, ssh) build and reach the Debian guest image (kvmksm image build debian).
PKGS=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
      qemu-utils libvirt-dev pkg-config linux-image-amd64 busybox-static e2fsprogs zstd cpio
      chromium mmdebstrap dpkg-dev debian-archive-keyring openssh-client)

say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and starts libvirtd)" >&2
  exit 2
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# No systemd here (nor on many CI hosts): start the daemons by hand when they are not running.
# A zombie left by a killed daemon must not count as running: ask for live states only.
alive() { pgrep -x -r R,S,D "$1" >/dev/null; }
if ! alive virtlogd; then
  say "starting virtlogd"
  virtlogd -d
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  if alive libvirtd; then
    say "libvirtd runs but does not answer; waiting for it"
  else
    say "starting libvirtd"
    libvirtd -d
  fi
fi
for _ in $(seq 1 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null || { echo "libvirtd did not come up" >&2; exit 1; }

# Always (re)install the project: cheap when nothing changed, and it picks up new dependencies.
say "installing kvmksm and its Python dependencies (pip install -e '.[vms,fleet,test]')"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[vms,fleet,test]'
say "ready: $(virsh -c qemu:///system version --daemon 2>/dev/null | grep -m1 'daemon' || true)"
