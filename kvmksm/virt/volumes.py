"""Clone disks through libvirt's storage API: qcow2 overlays on the base disk, or full copies.

Every volume kvmksm creates is named ``kvmksm-<run id>-...`` (the run id is 8 hex digits), and
only names of that shape are ever listed as leftovers or deleted by ``kvmksm clean``.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from kvmksm.errors import UserError
from kvmksm.host import paths
from kvmksm.virt.conn import is_local

VOLUME_RE = re.compile(r"^kvmksm-[0-9a-f]{8}-")
OWNED_POOL = "kvmksm"  # made only when the scenario's pool does not exist
_DIR_POOLS = ("dir", "fs", "netfs")  # a volume's path is <pool target>/<volume name>


@dataclass
class BaseDisk:
    """One disk of the base that each clone gets its own copy or overlay of."""

    target: str  # vda
    path: str
    format: str  # qcow2, raw
    capacity: int  # virtual size, bytes


@dataclass
class Pool:
    pool: libvirt.virStoragePool
    name: str
    path: str
    created: bool  # kvmksm made it just now (recorded as an event)


def volume_name(domain: str, target: str, fmt: str) -> str:
    return f"{domain}-{target}.{'qcow2' if fmt == 'qcow2' else 'img'}"


def is_kvmksm_volume(name: str) -> bool:
    return bool(VOLUME_RE.match(name))


def pool_path(pool: libvirt.virStoragePool) -> tuple[str, str]:
    """(pool type, target path) from the pool's XML."""
    root = ET.fromstring(pool.XMLDesc(0))
    return root.get("type", ""), root.findtext("target/path") or ""


def ensure_pool(conn: libvirt.virConnect, name: str) -> Pool:
    """The scenario's pool if it exists and runs. When the pool is ``default`` (a fresh host
    may have none) or ``kvmksm`` and does not exist, kvmksm's own dir pool ``kvmksm`` at
    ``<data dir>/pool``, made on first use and kept for later runs.

    A user's pool that is absent (other than ``default``) or inactive is an error: kvmksm
    neither guesses nor starts other people's pools.
    """
    created = False
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        if name not in ("default", OWNED_POOL):
            raise UserError(f"storage pool {name!r} not found at {conn.getURI()}") from None
        pool, created = _owned_pool(conn)
        name = OWNED_POOL
    if not pool.isActive():
        if name != OWNED_POOL:
            raise UserError(
                f"storage pool {name!r} is not active (start it: virsh pool-start {name})"
            )
        try:
            pool.create(0)  # kvmksm's own pool, e.g. after a host reboot
        except libvirt.libvirtError as e:
            raise UserError(
                f"cannot start storage pool {name!r}: {e.get_error_message()}"
            ) from None
    kind, path = pool_path(pool)
    if kind not in _DIR_POOLS:
        raise UserError(f"storage pool {name!r} is of type {kind!r}; clones need a dir pool")
    pool.refresh(0)
    return Pool(pool, pool.name(), path, created)


def _owned_pool(conn: libvirt.virConnect) -> tuple[libvirt.virStoragePool, bool]:
    """kvmksm's own pool, and whether it was defined just now."""
    try:
        return conn.storagePoolLookupByName(OWNED_POOL), False
    except libvirt.libvirtError:
        pass
    target = paths.pool_dir()
    xml = (
        f"<pool type='dir'><name>{OWNED_POOL}</name>"
        f"<target><path>{escape(str(target))}</path></target></pool>"
    )
    try:
        pool = conn.storagePoolDefineXML(xml, 0)
        pool.build(0)  # mkdir
        pool.setAutostart(1)
    except libvirt.libvirtError as e:
        raise UserError(f"cannot create storage pool {OWNED_POOL!r} at {target}: {e}") from None
    return pool, True


def describe_disk(conn: libvirt.virConnect, path: str, fmt: str | None) -> tuple[int, str]:
    """(virtual size in bytes, format) of a base disk: from libvirt when it is a pool volume,
    else from the file's header (qcow2) or length (raw)."""
    try:
        vol = conn.storageVolLookupByPath(path)
        capacity = vol.info()[1]
        if fmt is None:
            el = ET.fromstring(vol.XMLDesc(0)).find("target/format")
            fmt = el.get("type", "raw") if el is not None else "raw"
        return capacity, fmt
    except libvirt.libvirtError:
        pass
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            size = f.seek(0, 2)
    except OSError as e:
        raise UserError(f"base disk {path}: {e.strerror}") from None
    if head[:4] == b"QFI\xfb":
        return struct.unpack(">Q", head[24:32])[0], fmt or "qcow2"
    return size, fmt or "raw"


def overlay_xml(name: str, base: BaseDisk) -> str:
    return (
        f"<volume type='file'><name>{escape(name)}</name>"
        f"<capacity unit='bytes'>{base.capacity}</capacity>"
        "<target><format type='qcow2'/></target>"
        f"<backingStore><path>{escape(base.path)}</path>"
        f"<format type={quoteattr(base.format)}/></backingStore></volume>"
    )


def copy_xml(name: str, capacity: int, fmt: str) -> str:
    return (
        f"<volume type='file'><name>{escape(name)}</name>"
        f"<capacity unit='bytes'>{capacity}</capacity>"
        f"<target><format type={quoteattr(fmt)}/></target></volume>"
    )


def create_overlay(
    pool: libvirt.virStoragePool, name: str, base: BaseDisk
) -> libvirt.virStorageVol:
    """A qcow2 volume whose backing file is the base disk (nothing is copied)."""
    return pool.createXML(overlay_xml(name, base), 0)


def create_copy(
    conn: libvirt.virConnect, pool: libvirt.virStoragePool, name: str, base: BaseDisk
) -> libvirt.virStorageVol:
    """A full, independent copy of the base disk in the same format.

    A base that is a pool volume is copied by libvirt itself (``createXMLFrom``, sparse-aware);
    a plain file on this host is uploaded through a storage stream.
    """
    try:
        src = conn.storageVolLookupByPath(base.path)
    except libvirt.libvirtError:
        src = None
    if src is not None:
        return pool.createXMLFrom(copy_xml(name, base.capacity, base.format), src, 0)
    if not is_local(conn):
        raise UserError(f"base disk {base.path} is not a storage volume; cannot copy it remotely")
    size = Path(base.path).stat().st_size
    # A raw volume of the file's length receives the file's bytes as they are (qcow2 included).
    vol = pool.createXML(copy_xml(name, size, "raw"), 0)
    try:
        stream = conn.newStream(0)
        vol.upload(stream, 0, size, 0)
        with open(base.path, "rb") as f:
            stream.sendAll(lambda _s, n, fh: fh.read(n), f)
        stream.finish()
    except BaseException:
        _delete(vol)
        raise
    return vol


def _delete(vol: libvirt.virStorageVol) -> None:
    try:
        vol.delete(0)
    except libvirt.libvirtError:
        pass


def delete_volume(conn: libvirt.virConnect, pool: str, name: str) -> str | None:
    """Delete one kvmksm volume; None when done or already gone, else the problem (never
    raises). Refuses names kvmksm does not make."""
    if not is_kvmksm_volume(name):
        return f"refusing to delete volume {pool}/{name}: not a kvmksm volume"
    try:
        vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL):
            return None  # already gone
        return f"cannot look up volume {pool}/{name}: {e.get_error_message()}"
    try:
        vol.delete(0)
    except libvirt.libvirtError as e:
        return f"cannot delete volume {pool}/{name}: {e.get_error_message()}"
    return None


def tagged_volumes(conn: libvirt.virConnect) -> tuple[list[tuple[str, str]], list[str]]:
    """([(pool, volume)] named as kvmksm names its volumes, in every active pool), plus the
    names of inactive pools that could not be searched."""
    found: list[tuple[str, str]] = []
    skipped: list[str] = []
    for pool in conn.listAllStoragePools(0):
        if not pool.isActive():
            skipped.append(pool.name())
            continue
        try:
            pool.refresh(0)
            names = pool.listVolumes()
        except libvirt.libvirtError:
            skipped.append(pool.name())
            continue
        found += [(pool.name(), n) for n in sorted(names) if is_kvmksm_volume(n)]
    return found, skipped
