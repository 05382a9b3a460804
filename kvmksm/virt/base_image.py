"""What kvmksm's own base images have in common (the tiny one and the Debian one): where their
files live, when a build is up to date, and the shut-off base domain with its
``<kvmksm:base>`` tag.

An image called NAME lives in ``<data dir>/images`` as ``NAME.qcow2``, ``NAME.vmlinuz``,
``NAME.initrd`` and a manifest ``NAME.json`` (what it was built from and the fingerprint of
those inputs). A build is redone only when the fingerprint changed or a file is missing; the
base domain is redefined (in place, same UUID) only when its XML would change, which the
tag's ``build`` attribute (a digest of the inputs and the XML) tells without comparing XML.
A base is never rebuilt while it runs or while kvmksm clones of it exist: their overlays
are backed by its image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from kvmksm.errors import UserError
from kvmksm.results.files import write_text
from kvmksm.virt.cleanup import find_leftovers
from kvmksm.virt.domains import Tag, lookup, read_tag


@dataclass(frozen=True)
class ImageFiles:
    """The files of one base image."""

    image: Path
    kernel: Path
    initrd: Path
    manifest: Path

    @classmethod
    def of(cls, directory: Path, name: str) -> ImageFiles:
        return cls(
            directory / f"{name}.qcow2",
            directory / f"{name}.vmlinuz",
            directory / f"{name}.initrd",
            directory / f"{name}.json",
        )

    def complete(self) -> bool:
        return all(p.exists() for p in (self.image, self.kernel, self.initrd))


@dataclass
class BuiltImage:
    """What an image build did: the base domain, its files, and whether anything changed."""

    domain: str
    image: Path
    kernel: Path
    initrd: Path
    built: bool  # the image was (re)built by this call
    defined: bool  # the domain was (re)defined by this call

    def __str__(self) -> str:
        what = "built" if self.built else "up to date"
        dom = "defined" if self.defined else "unchanged"
        return f"{self.domain}: image {self.image} ({what}), domain {dom}"


def digest(*files: Path, text: str = "") -> str:
    """16 hex digits of SHA-256 over ``text`` and the bytes of ``files``."""
    h = hashlib.sha256(text.encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an earlier build ({} when missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


def claim(conn: libvirt.virConnect, name: str) -> tuple[libvirt.virDomain | None, Tag | None]:
    """The existing domain called ``name`` and its tag; refuses a domain kvmksm did not make."""
    existing = lookup(conn, name)
    tag = read_tag(existing) if existing is not None else None
    if existing is not None and (tag is None or tag.kind != "base"):
        raise UserError(f"domain {name!r} exists and was not made by kvmksm; choose another name")
    return existing, tag


def refuse_rebuild(conn: libvirt.virConnect, name: str, existing: Any) -> None:
    """A base is not rebuilt while it runs or while kvmksm clones of it use its image."""
    if existing is not None and existing.isActive():
        raise UserError(f"base domain {name!r} is running; shut it off before rebuilding")
    clones = [d for d in find_leftovers(conn).domains if _clone_of(conn, d, name)]
    if clones:
        raise UserError(
            f"{len(clones)} kvmksm clone(s) of {name} exist and use its image as backing "
            "file; run 'kvmksm clean' first"
        )


def define_base(
    conn: libvirt.virConnect,
    name: str,
    existing: Any,
    tag: Tag | None,
    render: Callable[[str, str | None], str],
    inputs: str,
    rebuilt: bool,
    progress: Callable[[str], None] = lambda _text: None,
) -> bool:
    """Define the shut-off base domain ``name`` from ``render(build, uuid)`` when it is missing,
    its image was rebuilt, or its XML would change; returns whether it was (re)defined.

    ``inputs`` is the image's fingerprint: with the XML rendered without a build attribute it
    makes the tag's ``build``, so a later call knows without reading the XML back whether
    anything changed (libvirt rewrites XML it is given)."""
    build = digest(text=f"{inputs}\n{render('', None)}")
    if not rebuilt and tag is not None and tag.attrs.get("build") == build:
        progress(f"base domain {name} is up to date")
        return False
    if existing is not None and existing.isActive():
        raise UserError(f"base domain {name!r} is running; shut it off before redefining")
    uuid = existing.UUIDString() if existing is not None else None  # redefine in place
    try:
        conn.defineXML(render(build, uuid))
    except libvirt.libvirtError as e:
        raise UserError(f"cannot define base domain {name}: {e.get_error_message()}") from None
    progress(f"defined shut-off base domain {name} ({conn.getURI()})")
    return True


def _clone_of(conn: libvirt.virConnect, domain: str, base: str) -> bool:
    dom = lookup(conn, domain)
    tag = read_tag(dom) if dom is not None else None
    return bool(tag and tag.attrs.get("base") == base)
