"""The minimal initramfs: module closure and load order from depmod's files (a fake tree with
every compression, built-ins, aliases and soft dependencies, and the host's own kernel), the
cpio archive as GNU cpio and the kernel read it, and the same bytes from the same inputs."""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmksm.errors import UserError
from kvmksm.virt import initramfs
from kvmksm.virt.initramfs import DEFAULT_MODULES, CpioWriter, ModuleIndex
from kvmksm.virt.tiny_image import find_kernel

RELEASE = "9.9.9-test"
ELF = b"\x7fELF" + b"x" * 100


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)) of a newc archive, read as the kernel
    does (header, name, pad to 4, data, pad to 4)."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        assert f[2] == f[3] == f[5] == 0  # uid, gid, mtime
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert len(data) % 512 == 0
            return out
        out[name] = (mode, body, (rmaj, rmin))


def fake_tree(root: Path, zstd: bool = True) -> Path:
    """A modules directory with every compression and the dependency shapes that matter."""
    rel = root / RELEASE
    files = {
        "kernel/a/virtio_ring.ko.xz": lzma.compress(ELF + b"ring"),
        "kernel/a/virtio.ko.zst": b"",  # made by the zstd tool below
        "kernel/a/virtio_blk.ko.gz": gzip.compress(ELF + b"blk"),
        "kernel/a/virtio_pci.ko": ELF + b"pci",
        "kernel/b/ext4.ko.xz": lzma.compress(ELF + b"ext4"),
        "kernel/b/jbd2.ko.xz": lzma.compress(ELF + b"jbd2"),
        "kernel/c/crc32c-intel.ko.xz": lzma.compress(ELF + b"c32i"),
        "kernel/c/crc32c_generic.ko.xz": lzma.compress(ELF + b"c32g"),
        "kernel/c/unrelated.ko": ELF,
    }
    for name, data in files.items():
        path = rel / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".zst"):
            data = subprocess.run(
                ["zstd", "-q", "-c"], input=ELF + b"virtio", capture_output=True, check=True
            ).stdout
        path.write_bytes(data)
    (rel / "modules.dep").write_text(
        "kernel/a/virtio_ring.ko.xz:\n"
        "kernel/a/virtio.ko.zst: kernel/a/virtio_ring.ko.xz\n"
        "kernel/a/virtio_blk.ko.gz: kernel/a/virtio.ko.zst kernel/a/virtio_ring.ko.xz\n"
        "kernel/a/virtio_pci.ko: kernel/a/virtio.ko.zst kernel/a/virtio_ring.ko.xz\n"
        "kernel/b/jbd2.ko.xz:\n"
        "kernel/b/ext4.ko.xz: kernel/b/jbd2.ko.xz\n"
        "kernel/c/crc32c-intel.ko.xz:\n"
        "kernel/c/crc32c_generic.ko.xz:\n"
        "kernel/c/unrelated.ko:\n"
    )
    (rel / "modules.softdep").write_text(
        "# Soft dependencies extracted from modules themselves.\n"
        "softdep ext4 pre: crypto-crc32c\n"
        "softdep jbd2 pre: crypto-crc32c\n"
    )
    (rel / "modules.alias").write_text(
        "alias crypto-crc32c crc32c_intel\n"
        "alias crypto-crc32c crc32c_generic\n"
        "alias crypto-crc32c-* crc32c_generic\n"
        "alias fs-mbcache mbcache\n"
    )
    (rel / "modules.builtin").write_text("kernel/b/mbcache.ko\nkernel/lib/crc16.ko\n")
    return root


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    assert shutil.which("zstd"), "the zstd tool (scripts/setup.sh installs it)"
    return fake_tree(tmp_path / "lib")


def test_closure_load_order_and_optional_soft_dependencies(modules_dir: Path) -> None:
    index = ModuleIndex.read(modules_dir / RELEASE)
    order = index.resolve(["virtio_pci", "virtio_blk", "ext4", "crc16", "mbcache"])
    names = [m.name for m in order]
    assert sorted(names) == sorted(
        ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"]
        + ["crc32c_intel", "crc32c_generic", "jbd2", "ext4"]
    )  # built-ins (crc16, mbcache) and unrelated modules left out
    for module in order:  # every hard dependency before its user
        for dep in module.depends:
            assert names.index(dep) < names.index(module.name)
    # ext4's and jbd2's pre: soft dependency, through modules.alias, before them
    assert names.index("crc32c_generic") < names.index("jbd2") < names.index("ext4")
    assert {m.name for m in order if m.optional} == {"crc32c_intel", "crc32c_generic"}


def test_unknown_module_is_one_line(modules_dir: Path) -> None:
    with pytest.raises(UserError, match="kernel module no_such: not in modules.dep"):
        ModuleIndex.read(modules_dir / RELEASE).resolve(["no_such"])


def test_missing_modules_dep_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no .*/1\.2\.3/modules\.dep: .*linux-image"):
        initramfs.plan("1.2.3", tmp_path)


def test_archive_contents_and_decompressed_modules(modules_dir: Path, tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    p = initramfs.plan(RELEASE, modules_dir)
    out = tmp_path / "initrd.img"
    size = initramfs.build(p, busybox, out)
    assert size == out.stat().st_size
    entries = read_newc(gzip.decompress(out.read_bytes()))
    mods = f"lib/modules/{RELEASE}/"
    assert entries[mods + "virtio.ko"][1] == ELF + b"virtio"  # from .ko.zst
    assert entries[mods + "virtio_ring.ko"][1] == ELF + b"ring"  # from .ko.xz
    assert entries[mods + "virtio_blk.ko"][1] == ELF + b"blk"  # from .ko.gz
    assert entries[mods + "crc32c-intel.ko"][1] == ELF + b"c32i"  # the file keeps its dash
    assert not any("unrelated" in name for name in entries)
    assert entries["dev/console"][2] == (5, 1)  # a device node, made without mknod or root
    assert entries["bin/busybox"][1] == busybox.read_bytes()
    assert entries["bin/sh"][1] == b"busybox"
    init = entries["init"][1].decode()
    assert entries["init"][0] & 0o111 and init == p.init
    # insmod order in /init is the load order, optional ones marked
    loop = next(line for line in init.splitlines() if line.startswith("for m in "))
    words = loop.removeprefix("for m in ").removesuffix("; do").split()
    assert words == [f"'?{m.stem}'" if m.optional else m.stem for m in p.modules]
    assert words[-1] == "ext4" and "'?crc32c-intel'" in words

    again = tmp_path / "again.img"
    initramfs.build(initramfs.plan(RELEASE, modules_dir), busybox, again)
    assert again.read_bytes() == out.read_bytes()  # reproducible: same inputs, same bytes


def test_gnu_cpio_reads_the_archive() -> None:
    assert shutil.which("cpio"), "GNU cpio (apt-get install cpio)"
    a = CpioWriter()
    a.directory("bin")
    a.file("bin/hello", b"hi\n", 0o755)
    a.symlink("bin/sh", "hello")
    a.char_device("dev/console", 5, 1)
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=a.finish(), capture_output=True, check=True
    ).stdout.decode()
    assert "bin/hello" in listing and "bin/sh -> hello" in listing
    assert "5,   1" in listing


def test_host_kernel_closure() -> None:
    """The host's own kernel (the one `kvmksm image build` uses): every wanted module that is
    not built in is there, after what it needs."""
    _, release = find_kernel()
    p = initramfs.plan(release)
    index = ModuleIndex.read(p.directory)
    names = [m.name for m in p.modules]
    for want in DEFAULT_MODULES:
        assert want in names or want in index.builtin
    for m in p.modules:
        assert (p.directory / m.path).is_file()
        assert all(names.index(d) < names.index(m.name) for d in m.depends)
    if "ext4" in names:  # ext4 cannot mount without some crc32c: a soft dependency
        assert any(n.startswith("crc32c") for n in names)
