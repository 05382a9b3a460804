"""Domains: the base to clone, the clone's XML, and the tag that marks what kvmksm made.

The tag is a libvirt ``<metadata>`` element in kvmksm's namespace. Clones carry
``<kvmksm:clone run=... base=... index=... console=...>`` with one ``<kvmksm:volume>`` per
disk; the tiny base carries ``<kvmksm:base>``, which ``kvmksm clean`` never removes. Nothing
without a ``clone`` tag is ever destroyed or undefined.
"""

from __future__ import annotations

import random
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from kvmksm.errors import UserError
from kvmksm.scenario.model import BaseDomain, BaseImage
from kvmksm.virt.volumes import BaseDisk, describe_disk

NS = "https://kvmksm.invalid/ns/1"
PREFIX = "kvmksm"
_K = f"{{{NS}}}"
for _p, _u in (
    (PREFIX, NS),
    ("qemu", "http://libvirt.org/schemas/domain/qemu/1.0"),
    ("libosinfo", "http://libosinfo.org/xmlns/libvirt/domain/1.0"),
    ("test", "http://libvirt.org/schemas/domain/test/1.0"),
):
    ET.register_namespace(_p, _u)

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


# -- the base -------------------------------------------------------------------------
@dataclass
class Base:
    name: str  # the domain's name, or the image's stem
    xml: str  # inactive domain XML the clones start from
    disks: list[BaseDisk]


def load_base(conn: libvirt.virConnect, spec: BaseDomain | BaseImage) -> Base:
    """The base to clone: an existing shut-off domain, or a domain made up from a disk image.

    Raises UserError if the base is running (its disk is locked read-write by QEMU, so no
    clone could start), is missing, or has a disk kvmksm cannot clone. Changes nothing.
    """
    if isinstance(spec, BaseDomain):
        try:
            dom = conn.lookupByName(spec.domain)
        except libvirt.libvirtError:
            raise UserError(f"base domain {spec.domain!r} not found at {conn.getURI()}") from None
        if dom.isActive():
            raise UserError(
                f"base domain {spec.domain!r} is running: shut it off first (QEMU's image lock "
                "would refuse clones of its disk while it runs)"
            )
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        name = spec.domain
    else:
        path = str(spec.image)
        user = domains_using(conn, path, active_only=True)
        if user:
            raise UserError(f"base image {path} is in use by running domain {user[0]!r}")
        xml = image_domain_xml(spec)
        name = spec.image.stem
    return Base(name, xml, base_disks(conn, xml))


def image_domain_xml(spec: BaseImage, name: str = "kvmksm-base") -> str:
    """Domain XML for a base given as a disk image (never defined itself: clones are)."""
    root = ET.Element("domain", type="kvm")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="KiB").text = str(spec.memory // 1024)
    ET.SubElement(root, "vcpu").text = str(spec.vcpus)
    os_ = ET.SubElement(root, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel:
        ET.SubElement(os_, "kernel").text = str(spec.kernel)
        if spec.initrd:
            ET.SubElement(os_, "initrd").text = str(spec.initrd)
        ET.SubElement(os_, "cmdline").text = spec.cmdline or "console=ttyS0 root=/dev/vda rw"
    else:
        ET.SubElement(os_, "boot", dev="hd")
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    for ev in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(root, ev).text = "destroy"  # a guest that stops is seen as down
    dev = ET.SubElement(root, "devices")
    fmt = "qcow2" if _is_qcow2(spec.image) else "raw"
    disk = ET.SubElement(dev, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=fmt)
    ET.SubElement(disk, "source", file=str(spec.image))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    ET.SubElement(ET.SubElement(dev, "serial", type="pty"), "target", port="0")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def _is_qcow2(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"QFI\xfb"
    except OSError:
        return False


def base_disks(conn: libvirt.virConnect, xml: str) -> list[BaseDisk]:
    """The disks each clone needs its own of: writable disks backed by a file or volume.

    Read-only, shareable and empty disks (CD-ROMs) are shared by the clones as they are.
    """
    out = []
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        if _shared(disk):
            continue
        target = disk.find("target")
        dev = target.get("dev", "?") if target is not None else "?"
        kind = disk.get("type", "file")
        src = disk.find("source")
        if kind == "file" and src is not None and src.get("file"):
            path = src.get("file", "")
        elif kind == "volume" and src is not None:
            try:
                pool = conn.storagePoolLookupByName(src.get("pool", ""))
                path = pool.storageVolLookupByName(src.get("volume", "")).path()
            except libvirt.libvirtError as e:
                raise UserError(f"base disk {dev}: {e.get_error_message()}") from None
        else:
            raise UserError(f"base disk {dev}: disks of type {kind!r} cannot be cloned")
        drv = disk.find("driver")
        capacity, fmt = describe_disk(conn, path, drv.get("type") if drv is not None else None)
        out.append(BaseDisk(dev, path, fmt, capacity))
    if not out:
        raise UserError("the base has no writable disk to clone")
    return out


def _shared(disk: ET.Element) -> bool:
    if disk.get("device", "disk") not in ("disk", "lun"):
        return True
    if disk.find("readonly") is not None or disk.find("shareable") is not None:
        return True
    src = disk.find("source")
    return src is None or not src.attrib


def domains_using(conn: libvirt.virConnect, path: str, active_only: bool) -> list[str]:
    """Names of domains with a disk whose source is ``path``."""
    flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
    out = []
    for dom in conn.listAllDomains(flags):
        for src in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk/source"):
            if src.get("file") == path:
                out.append(dom.name())
                break
    return out


# -- the clone --------------------------------------------------------------------------
@dataclass
class CloneDisk:
    target: str  # vda
    pool: str
    volume: str  # kvmksm-<run>-...
    path: str  # where the volume will be
    format: str  # qcow2 for overlays, the base's format for copies


@dataclass
class ClonePlan:
    """Everything that makes one clone differ from the base."""

    name: str
    uuid: str
    run: str
    index: int
    base: str
    domain_type: str  # kvm | qemu
    disks: list[CloneDisk]
    macs: list[str] = field(default_factory=list)  # one per <interface>, in order
    console: str | None = None  # serial console log file
    memory: int | None = None  # bytes; None keeps the base's
    cmdline_extra: str = ""  # appended to <cmdline> (direct kernel boot only)
    record: str = ""  # the run record this clone belongs to


def clone_xml(base_xml: str, plan: ClonePlan) -> str:
    """The clone's domain XML (pure: no libvirt calls, so tests compare it as text)."""
    root = ET.fromstring(base_xml)
    root.set("type", plan.domain_type)
    root.attrib.pop("id", None)
    _child(root, "name").text = plan.name
    _child(root, "uuid", after="name").text = plan.uuid
    for tag in ("title", "genid"):
        for el in root.findall(tag):
            root.remove(el)
    for entry in root.iterfind("sysinfo/system/entry[@name='uuid']"):
        entry.text = plan.uuid
    if plan.memory:
        kib = str(plan.memory // 1024)
        for tag in ("memory", "currentMemory"):
            el = root.find(tag)
            if el is not None:
                el.text, el.attrib = kib, {"unit": "KiB"}
    os_ = root.find("os")
    if os_ is not None:
        for nvram in os_.findall("nvram"):
            os_.remove(nvram)  # libvirt makes a fresh one from the template; deleted on undefine
        if plan.cmdline_extra:
            if os_.find("kernel") is None:
                raise UserError(
                    "guest_fill needs a direct-kernel-boot base (<kernel> and <cmdline>), "
                    "as the tiny image is"
                )
            cmd = _child(os_, "cmdline")
            cmd.text = f"{(cmd.text or '').strip()} {plan.cmdline_extra}".strip()
    cpu = root.find("cpu")
    if plan.domain_type == "qemu" and cpu is not None and cpu.get("mode", "").startswith("host"):
        root.remove(cpu)  # TCG has no host CPU to pass through
    if plan.domain_type != "qemu":
        for features in root.findall("features"):
            for tcg in features.findall("tcg"):  # libvirt refuses TCG settings under KVM
                features.remove(tcg)
    devices = _child(root, "devices")
    _clone_disks(devices, plan)
    _clone_interfaces(devices, plan.macs)
    for g in devices.iterfind("graphics"):
        for attr in ("port", "tlsPort", "websocket"):
            g.attrib.pop(attr, None)
        if g.get("type") in ("vnc", "spice"):
            g.set("autoport", "yes")
    for ch in devices.iterfind("channel"):
        src = ch.find("source")
        if ch.get("type") == "unix" and src is not None:
            src.attrib.pop("path", None)  # libvirt names a socket per domain
    if plan.console:
        _log_console(devices, plan.console)
    _set_tag(root, plan)
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode")


def _child(parent: ET.Element, tag: str, after: str | None = None) -> ET.Element:
    el = parent.find(tag)
    if el is None:
        el = ET.Element(tag)
        pos = len(parent)
        if after is not None:
            prev = parent.find(after)
            pos = list(parent).index(prev) + 1 if prev is not None else 0
        parent.insert(pos, el)
    return el


def _clone_disks(devices: ET.Element, plan: ClonePlan) -> None:
    by_target = {d.target: d for d in plan.disks}
    for disk in devices.iterfind("disk"):
        target = disk.find("target")
        new = by_target.pop(target.get("dev", "") if target is not None else "", None)
        if new is None:
            continue
        disk.set("type", "file")
        for el in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(el)
        drv = _child(disk, "driver")
        drv.set("name", drv.get("name", "qemu"))
        drv.set("type", new.format)
        src = ET.Element("source", file=new.path)
        disk.insert(list(disk).index(drv) + 1, src)
    if by_target:
        raise UserError(f"base has no disk {', '.join(by_target)}")


def _clone_interfaces(devices: ET.Element, macs: list[str]) -> None:
    ifaces = devices.findall("interface")
    if len(ifaces) != len(macs):
        raise ValueError(f"{len(ifaces)} interfaces but {len(macs)} MAC addresses")
    for iface, mac in zip(ifaces, macs, strict=True):
        _child(iface, "mac").set("address", mac)
        for el in iface.findall("target"):
            iface.remove(el)  # tap device names are per domain


def _log_console(devices: ET.Element, path: str) -> None:
    """Serial port 0 logged to ``path`` (kept a pty so ``virsh console`` still works)."""
    serial = next(iter(devices.findall("serial")), None)
    if serial is None:
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "target", port="0")
    if serial.get("type") == "file":
        _child(serial, "source").set("path", path)
    else:
        for el in serial.findall("log"):
            serial.remove(el)
        ET.SubElement(serial, "log", file=path, append="off")
    # The serial console is a view of serial 0; libvirt re-adds it from the serial.
    for con in devices.findall("console"):
        t = con.find("target")
        if t is None or t.get("type", "serial") == "serial":
            devices.remove(con)


def _set_tag(root: ET.Element, plan: ClonePlan) -> None:
    meta = _child(root, "metadata", after="uuid")
    for el in list(meta):
        if el.tag.startswith(_K):
            meta.remove(el)
    attrs = {"run": plan.run, "base": plan.base, "index": str(plan.index)}
    if plan.record:
        attrs["record"] = plan.record
    if plan.console:
        attrs["console"] = plan.console
    tag = ET.SubElement(meta, f"{_K}clone", attrs)
    for d in plan.disks:
        ET.SubElement(tag, f"{_K}volume", pool=d.pool, name=d.volume)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def new_macs(n: int, taken: set[str], rng: random.Random | None = None) -> list[str]:
    """``n`` locally administered MACs in QEMU's 52:54:00 range, none in ``taken``."""
    rng = rng or random.SystemRandom()
    out: list[str] = []
    while len(out) < n:
        mac = "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            taken.add(mac)
            out.append(mac)
    return out


def macs_in_use(conn: libvirt.virConnect) -> set[str]:
    out = set()
    for dom in conn.listAllDomains(0):
        for mac in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/interface/mac"):
            out.add(mac.get("address", "").lower())
    return out


def interface_count(xml: str) -> int:
    return len(ET.fromstring(xml).findall("devices/interface"))


# -- tags -------------------------------------------------------------------------------
@dataclass
class Tag:
    kind: str  # clone | base
    attrs: dict[str, str]
    volumes: list[tuple[str, str]]  # (pool, volume)


def read_tag(dom: libvirt.virDomain) -> Tag | None:
    """kvmksm's metadata element on a domain (persistent config), or None if untagged."""
    try:
        text = dom.metadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG
        )
    except libvirt.libvirtError:
        return None
    return parse_tag(text)


def parse_tag(text: str) -> Tag | None:
    try:
        el = ET.fromstring(text)
    except ET.ParseError:
        return None
    kind = el.tag.rsplit("}", 1)[-1]
    if kind not in ("clone", "base"):
        return None
    vols = [(v.get("pool", ""), v.get("name", "")) for v in el if v.tag.endswith("volume")]
    return Tag(kind, dict(el.attrib), vols)


def base_tag_xml(attrs: dict[str, str]) -> str:
    """The ``<kvmksm:base>`` element (for domains kvmksm builds as bases)."""
    el = ET.Element(f"{_K}base", attrs)
    return ET.tostring(el, encoding="unicode")


# -- lifecycle: each step says what went wrong instead of raising -------------------------
def destroy(dom: libvirt.virDomain) -> str | None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as e:
        if dom_gone(e):
            return None
        return f"cannot stop {dom.name()}: {e.get_error_message()}"
    return None


def undefine(dom: libvirt.virDomain) -> str | None:
    try:
        dom.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError as e:
        if dom_gone(e):
            return None
        try:  # drivers that do not know every flag (the test driver)
            dom.undefine()
        except libvirt.libvirtError as e2:
            if dom_gone(e2):
                return None
            return f"cannot undefine {dom.name()}: {e2.get_error_message()}"
    return None


def dom_gone(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None
