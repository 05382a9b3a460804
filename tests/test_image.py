"""The tiny image: its /init run on the host with busybox's own applets, and build_image's
idempotence against libvirt's test driver (mkfs.ext4 and qemu-img are real)."""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from kvmksm.errors import UserError
from kvmksm.virt.conn import open_connection
from kvmksm.virt.domains import read_tag
from kvmksm.virt.tiny_image import (
    CMDLINE,
    INIT,
    build_image,
    find_kernel,
    is_static_elf,
    make_rootfs,
)

from .test_initramfs import RELEASE, fake_tree, read_newc

BUSYBOX = Path("/bin/busybox")
NODE = Path(__file__).parent / "fixtures" / "testnode.xml"
needs_busybox = pytest.mark.skipif(
    not BUSYBOX.exists() or not is_static_elf(BUSYBOX), reason="needs busybox-static"
)


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVMKSM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    make_rootfs(root, BUSYBOX)
    return root


def run_init(root: Path, tmp: Path, cmdline: str) -> tuple[str, bytes | None]:
    """The guest's /init with its paths moved under ``tmp`` and busybox's applets on PATH;
    returns (console output, the filled file's bytes or None)."""
    (tmp / "cmdline").write_text(cmdline + "\n")
    script = (
        INIT.replace("PATH=/bin", f"PATH={root}/bin")
        .replace("/proc/cmdline", str(tmp / "cmdline"))
        .replace("/fill", str(tmp / "fill"))
        .replace('mount -t tmpfs -o size="$fill" kvmksm-fill', "true")
        .replace("idle() { while :; do sleep 3600; done; }", "idle() { exit 0; }")
    )
    out = subprocess.run(
        [str(root / "bin/sh"), "-c", script], capture_output=True, text=True, timeout=60, env={}
    )
    assert out.stderr == ""
    pattern = tmp / "fill" / "pattern"
    return out.stdout, pattern.read_bytes() if pattern.exists() else None


@needs_busybox
@pytest.mark.parametrize(
    ("fill", "byte"), [(16 << 20, 97), (4096, 0), (100, 255), (3 * 4096 + 17, 7), (0, 97)]
)
def test_init_fills_exactly(rootfs: Path, tmp_path: Path, fill: int, byte: int) -> None:
    out, data = run_init(rootfs, tmp_path, f"console=ttyS0 kvmksm.fill={fill} kvmksm.byte={byte}")
    assert out.startswith(f"KVMKSM-READY fill={fill} byte={byte} ")
    if fill:
        assert data is not None and len(data) == fill and set(data) == {byte}
    else:
        assert data is None


@needs_busybox
@pytest.mark.parametrize("arg", ["kvmksm.fill=12k", "kvmksm.byte=300", "kvmksm.byte="])
def test_init_reports_bad_arguments(rootfs: Path, tmp_path: Path, arg: str) -> None:
    out, _ = run_init(rootfs, tmp_path, f"console=ttyS0 kvmksm.fill=4096 {arg}")
    assert out.startswith("KVMKSM-FAILED: ")
    assert "KVMKSM-READY" not in out


def test_rootfs_layout(rootfs: Path) -> None:
    assert (rootfs / "init").stat().st_mode & 0o111
    assert (rootfs / "bin/sh").resolve() == (rootfs / "bin/busybox").resolve()
    for d in ("proc", "sys", "dev", "run", "fill"):
        assert (rootfs / d).is_dir()


def test_static_elf() -> None:
    assert is_static_elf(BUSYBOX)
    assert not is_static_elf(Path(sys.executable).resolve())
    assert not is_static_elf(Path(__file__))


def test_find_kernel_picks_newest_with_its_modules(tmp_path: Path) -> None:
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-11-amd64"):
        (boot / f"vmlinuz-{release}").write_text("k")
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        (modules / release).mkdir(parents=True)
        (modules / release / "modules.dep").write_text("")
    (modules / "6.1.0-11-amd64").mkdir()  # modules folder left by a removed package
    assert find_kernel(boot, modules) == (boot / "vmlinuz-6.1.0-10-amd64", "6.1.0-10-amd64")
    with pytest.raises(UserError, match="no kernel in .* with its modules in"):
        find_kernel(tmp_path / "nothing", modules)


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = open_connection(f"test://{NODE}")
    yield c
    c.close()


@needs_busybox
@pytest.mark.skipif(not shutil.which("mkfs.ext4") or not shutil.which("qemu-img"), reason="tools")
def test_build_image_is_idempotent(conn: libvirt.virConnect, tmp_path: Path) -> None:
    modules = fake_tree(tmp_path / "modules")
    kernel = tmp_path / f"vmlinuz-{RELEASE}"
    kernel.write_bytes(b"kernel v1")
    said: list[str] = []
    kw = {"name": "tiny-test", "kernel": kernel, "modules_dir": modules, "progress": said.append}

    first = build_image(conn, **kw)  # type: ignore[arg-type]
    assert first.built and first.defined
    assert first.image.read_bytes()[:4] == b"QFI\xfb"
    assert first.kernel.read_bytes() == b"kernel v1"
    # The initramfs is made from the release's modules, not copied from /boot.
    entries = read_newc(gzip.decompress(first.initrd.read_bytes()))
    assert f"lib/modules/{RELEASE}/ext4.ko" in entries and "init" in entries
    xml = conn.lookupByName("tiny-test").XMLDesc(0)
    assert f"<cmdline>{CMDLINE}</cmdline>" in xml
    assert "initcall_blacklist=tracer_init_tracefs cgroup.memory=nokmem" in CMDLINE
    assert "<memory unit='KiB'>131072</memory>" in xml
    dom = conn.lookupByName("tiny-test")
    tag = read_tag(dom)
    assert tag is not None and tag.kind == "base"
    assert not dom.isActive()
    mtime = first.image.stat().st_mtime_ns

    again = build_image(conn, **kw)  # type: ignore[arg-type]
    assert not again.built and not again.defined
    assert first.image.stat().st_mtime_ns == mtime
    assert any("up to date" in s for s in said)

    kernel.write_bytes(b"kernel v2")  # an input changed: rebuilt and redefined in place
    changed = build_image(conn, **kw)  # type: ignore[arg-type]
    assert changed.built and changed.defined
    assert changed.kernel.read_bytes() == b"kernel v2"
    assert conn.lookupByName("tiny-test").UUIDString() == dom.UUIDString()

    # A module that goes into the initramfs changed (a kernel package update): rebuilt.
    jbd2 = modules / RELEASE / "kernel/b/jbd2.ko.xz"
    jbd2.write_bytes(lzma.compress(b"\x7fELF jbd2 v2"))
    module = build_image(conn, **kw)  # type: ignore[arg-type]
    assert module.built
    entries = read_newc(gzip.decompress(module.initrd.read_bytes()))
    assert entries[f"lib/modules/{RELEASE}/jbd2.ko"][1] == b"\x7fELF jbd2 v2"
    # One it does not use: nothing to do.
    (modules / RELEASE / "kernel/c/unrelated.ko").write_bytes(b"\x7fELF other")
    assert not build_image(conn, **kw).built  # type: ignore[arg-type]

    memory = build_image(conn, memory=192 << 20, **kw)  # type: ignore[arg-type]
    assert not memory.built and memory.defined
    assert build_image(conn, force=True, **kw).built  # type: ignore[arg-type]


def test_build_image_refuses_a_domain_it_did_not_make(conn: libvirt.virConnect) -> None:
    with pytest.raises(UserError, match="'fedora01' exists and was not made by kvmksm"):
        build_image(conn, name="fedora01", progress=lambda s: None)
    assert read_tag(conn.lookupByName("fedora01")) is None
