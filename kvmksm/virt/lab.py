"""Guests that stand in for fleet hosts: one Debian guest per kernel, booted from a base image
with SSH forwarded to a port on 127.0.0.1, for `kvmksm fleet run` to reach like any host
(scripts/fleet-demo.sh, the CI path, and kernel sweeps on one machine).

Each guest is a qcow2 overlay of the image and a domain named ``fleet-<run>-<n>`` under TCG
or KVM, with one user-mode NIC whose port forward is on the QEMU command line (the only
address it opens is 127.0.0.1). Its RAM is kept out of the host's KSM (``<nosharepages/>``):
the guests run their own KSM, and a bench on the host itself must not count their pages.
Everything made here is undone by ``Lab.close`` (domains destroyed and undefined, overlays and
console logs deleted), whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from kvmksm.errors import UserError
from kvmksm.virt.boot import console_tail
from kvmksm.virt.domains import destroy, undefine

CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1 quiet loglevel=3 systemd.show_status=0"
SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
)  # fmt: skip


@dataclass(frozen=True)
class GuestSpec:
    """What to boot: a base image with one of its kernels."""

    image: Path  # qcow2 base (never written: each guest gets an overlay)
    kernel: Path
    initrd: Path
    label: str = ""  # short name for the inventory (default: from the kernel file)


@dataclass
class LabGuest:
    spec: GuestSpec
    name: str  # libvirt domain
    host: str  # inventory name
    port: int  # SSH on 127.0.0.1
    overlay: Path
    console: Path
    boot_seconds: float | None = None
    kernel_release: str | None = None


def domain_xml(
    name: str,
    spec: GuestSpec,
    overlay: Path,
    console: Path,
    port: int,
    memory_mib: int,
    vcpus: int,
    domain_type: str = "qemu",
) -> str:
    """The guest's domain: q35, the maximum CPU model TCG offers (numpy needs more than
    qemu64), direct kernel boot, a small TCG translation cache, RAM out of the host's KSM, an
    agent channel, and user networking with SSH forwarded from 127.0.0.1:PORT."""
    e = escape
    tcg = "<tcg><tb-cache unit='MiB'>64</tb-cache></tcg>" if domain_type == "qemu" else ""
    cpu = "<cpu mode='maximum'/>" if domain_type == "qemu" else "<cpu mode='host-passthrough'/>"
    return f"""<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{e(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <memoryBacking><nosharepages/></memoryBacking>
  <vcpu placement='static'>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{e(str(spec.kernel))}</kernel>
    <initrd>{e(str(spec.initrd))}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/>{tcg}</features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe' discard='unmap'/>
      <source file='{e(str(overlay))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <log file='{e(str(console))}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
    <video><model type='none'/></video>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=n0,bus=pcie.0,addr=0x0a'/>
  </qemu:commandline>
</domain>
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_command(port: int, key: Path, *command: str) -> list[str]:
    return ["ssh", "-i", str(key), "-p", str(port), *SSH_OPTIONS, "root@127.0.0.1", *command]


def label_of(kernel: Path) -> str:
    """'vmlinuz-6.12.95+deb12-amd64' -> '6.12.95'; a plain name for the inventory."""
    name = kernel.name.removeprefix("vmlinuz-").removesuffix(".vmlinuz")
    version = name.split("+")[0].split("-amd64")[0]
    return "k" + "".join(c if c.isalnum() else "-" for c in version).strip("-")


def host_names(specs: list[GuestSpec]) -> list[str]:
    """Inventory names: each guest's label, numbered where several share one (guests of one
    kernel), since Ansible merges hosts of the same name into one."""
    labels = [spec.label or label_of(spec.kernel) for spec in specs]
    return [
        f"{label}-{labels[:i].count(label) + 1}" if labels.count(label) > 1 else label
        for i, label in enumerate(labels)
    ]


@dataclass
class Lab:
    """Guests booted for one fleet run; a context manager that always undoes them."""

    conn: libvirt.virConnect
    directory: Path
    key: Path
    memory_mib: int = 1024
    vcpus: int = 1
    domain_type: str = "qemu"
    guests: list[LabGuest] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(
        self,
        specs: list[GuestSpec],
        timeout: float = 600,
        progress: Callable[[str], None] = lambda s: None,
    ) -> list[LabGuest]:
        """Define and start one guest per spec, all at once; return when each answers SSH
        (UserError naming the guest and its console's last lines when one does not)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for i, (spec, host) in enumerate(zip(specs, host_names(specs), strict=True), 1):
            name = f"fleet-{self.run_id}-{i:02d}"
            guest = LabGuest(
                spec,
                name,
                host,
                free_port(),
                self.directory / f"{name}.qcow2",
                self.directory / f"{name}.console.log",
            )
            self.guests.append(guest)  # before anything is made: close() undoes it all
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                 str(spec.image.resolve()), str(guest.overlay)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            xml = domain_xml(
                name,
                spec,
                guest.overlay,
                guest.console,
                guest.port,
                self.memory_mib,
                self.vcpus,
                self.domain_type,
            )
            dom = self.conn.defineXML(xml)
            dom.create()
            progress(f"{name}: {spec.kernel.name}, SSH on 127.0.0.1:{guest.port}")
        errors: list[str] = []
        threads = [
            threading.Thread(target=self._wait, args=(g, timeout, errors)) for g in self.guests
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise UserError("; ".join(errors))
        for g in self.guests:
            progress(f"{g.name}: up in {g.boot_seconds:.0f}s, kernel {g.kernel_release}")
        return self.guests

    def _wait(self, g: LabGuest, timeout: float, errors: list[str]) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            proc = subprocess.run(
                ssh_command(g.port, self.key, "uname -r; systemctl is-system-running --wait"),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode in (0, 1) and proc.stdout.strip():
                g.kernel_release = proc.stdout.split()[0]
                g.boot_seconds = time.monotonic() - t0
                return
            if not self._running(g.name):
                break
            time.sleep(2)
        tail = console_tail(str(g.console))
        errors.append(
            f"{g.name} ({g.spec.kernel.name}) did not answer SSH within "
            f"{time.monotonic() - t0:.0f}s; its console ended with: {tail or '(nothing)'}"
        )

    def _running(self, name: str) -> bool:
        try:
            return bool(self.conn.lookupByName(name).isActive())
        except libvirt.libvirtError:
            return False

    def close(self) -> list[str]:
        """Destroy and undefine every guest, delete its overlay and console log."""
        problems = []
        for g in self.guests:
            try:
                dom = self.conn.lookupByName(g.name)
            except libvirt.libvirtError:
                dom = None
            if dom is not None:
                problems += [p for p in (destroy(dom), undefine(dom)) if p]
            for path in (g.overlay, g.console):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.guests = []
        return problems


def inventory(guests: list[LabGuest], key: Path, localhost: bool = True) -> str:
    """An INI inventory: group `guests` (SSH through the forwards) and `bare` (this host)."""
    lines = ["[guests]"]
    for g in guests:
        lines.append(
            f"{g.host} ansible_host=127.0.0.1 ansible_port={g.port} ansible_user=root "
            f"ansible_ssh_private_key_file={shlex.quote(str(key))} "
            "ansible_python_interpreter=/usr/bin/python3 kvmksm_lab_domain=" + g.name
        )
    lines += [
        "",
        "[guests:vars]",
        "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'",
    ]
    if localhost:
        lines += [
            "",
            "[bare]",
            f"localhost ansible_connection=local ansible_python_interpreter={_python()}",
        ]
    return "\n".join(lines) + "\n"


def _python() -> str:
    """This host's system Python for the local host entry (the one the bundle is built for)."""
    for p in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(p, os.X_OK):
            return p
    return "python3"
