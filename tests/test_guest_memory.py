"""How much memory a tiny guest needs: the kernel's floor from its bzImage header, the fill
rule, `doctor` naming a breach, and `kvmksm bench` refusing it in one line before it creates
anything (libvirt's test driver holds a tiny base whose kernel is a made-up bzImage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvmksm.commands.doctor import diagnose
from kvmksm.host.fs import HostFS
from kvmksm.scenario.model import Scenario
from kvmksm.virt.guest_memory import FILL_HEADROOM, base_problem, kernel_floor, memory_problem
from kvmksm.virt.tiny_image import IMAGE_VERSION, find_kernel

from .test_cli import kvmksm

MiB = 1 << 20
NODE = Path(__file__).parent / "fixtures" / "testnode.xml"


def bzimage(path: Path, pref_address: int, init_size: int, version: int = 0x020F) -> Path:
    """The first 0x268 bytes of an x86 bzImage: what kernel_floor reads."""
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = version.to_bytes(2, "little")
    head[0x258:0x260] = pref_address.to_bytes(8, "little")
    head[0x260:0x264] = init_size.to_bytes(4, "little")
    path.write_bytes(bytes(head))
    return path


def test_floor_from_the_header_and_the_initrd(tmp_path: Path) -> None:
    kernel = bzimage(tmp_path / "vmlinuz", 16 * MiB, 0x3F9C000)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(1_700_000))
    assert kernel_floor(kernel) == 16 * MiB + 0x3F9C000
    assert kernel_floor(kernel, initrd) == 16 * MiB + 0x3F9C000 + 1_700_000
    assert kernel_floor(bzimage(tmp_path / "old", 16 * MiB, 1, version=0x0209)) is None
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(1000))
    assert kernel_floor(tmp_path / "elf") is None


def test_floor_of_the_host_kernel_is_what_was_measured() -> None:
    """Debian 6.1 (this machine): 80 MiB guests fail, 82 MiB ones boot (minimal initramfs)."""
    kernel, _ = find_kernel()
    floor = kernel_floor(kernel)
    assert floor is not None and 64 * MiB < floor < 96 * MiB


def test_fill_rule_and_floor_messages() -> None:
    floor = 82 * MiB
    assert memory_problem(96 * MiB, 32 * MiB, floor, "vmlinuz") is None
    assert memory_problem(128 * MiB, 64 * MiB, floor, "vmlinuz") is None
    assert memory_problem(96 * MiB, 0, None, "vmlinuz") is None
    assert memory_problem(96 * MiB, 33 * MiB, floor, "vmlinuz") == (
        "guest_fill 33.0 MiB does not fit in guests of 96.0 MiB: tiny guests may fill at most "
        "memory - 64.0 MiB (their kernel keeps the rest); use memory >= 97.0 MiB or "
        "guest_fill <= 32.0 MiB"
    )
    assert memory_problem(80 * MiB, 0, floor - MiB // 2, "vmlinuz-6.1") == (
        "memory 80.0 MiB is below the 81.5 MiB that kernel vmlinuz-6.1 needs to start "
        "(bzImage pref_address + init_size, plus the initrd): use at least 82.0 MiB"
    )
    assert FILL_HEADROOM == 64 * MiB


def test_base_problem_reads_the_domain_xml(tmp_path: Path) -> None:
    kernel = bzimage(tmp_path / "vmlinuz", 16 * MiB, 64 * MiB)
    xml = f"<domain><os><kernel>{kernel}</kernel></os></domain>"
    assert base_problem(xml, 79 * MiB, 0) is not None
    assert base_problem(xml, 80 * MiB, 0) is None
    assert base_problem(xml, 96 * MiB, 32 * MiB) is None
    # no direct kernel boot, or a kernel this host cannot read: only the fill rule applies
    assert base_problem("<domain><os/></domain>", 80 * MiB, 0) is None
    missing = f"<domain><os><kernel>{tmp_path}/nope</kernel></os></domain>"
    assert base_problem(missing, 80 * MiB, 0) is None
    assert "guest_fill 40.0 MiB" in (base_problem(missing, 96 * MiB, 40 * MiB) or "")


def node_with_tiny_kernel(tmp_path: Path, version: int = IMAGE_VERSION) -> str:
    """testnode.xml with its kvmksm-tiny booting a made-up 80 MiB-floor bzImage directly, as
    made by image ``version``."""
    kernel = bzimage(tmp_path / "vmlinuz", 16 * MiB, 64 * MiB - 4096)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(4096))
    node = NODE.read_text()
    tiny = node.index("<name>kvmksm-tiny</name>")
    plain = "<os><type arch='x86_64'>hvm</type></os>"
    at = node.index(plain, tiny)
    boot = (
        f"<os><type arch='x86_64'>hvm</type><kernel>{kernel}</kernel>"
        f"<initrd>{initrd}</initrd><cmdline>console=ttyS0</cmdline></os>"
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/var/lib/libvirt/images/fedora01.qcow2'/>"
        "<target dev='vda' bus='virtio'/></disk></devices>"
    )
    path = tmp_path / "node.xml"
    rest = node[at + len(plain) :].replace("version='1'", f"version='{version}'", 1)
    path.write_text(node[:at] + boot + rest)
    return f"test://{path}"


@pytest.mark.parametrize(
    ("memory", "fill", "says"),
    [
        (
            "96MiB",
            "64MiB",
            "guest_fill 64.0 MiB does not fit in guests of 96.0 MiB: tiny guests may fill at "
            "most memory - 64.0 MiB (their kernel keeps the rest); use memory >= 128.0 MiB or "
            "guest_fill <= 32.0 MiB",
        ),
        (
            "72MiB",
            None,
            "memory 72.0 MiB is below the 80.0 MiB that kernel vmlinuz needs to start "
            "(bzImage pref_address + init_size, plus the initrd): use at least 80.0 MiB",
        ),
    ],
)
def test_bench_refuses_before_creating_anything(
    tmp_path: Path, fake_root: Path, memory: str, fill: str | None, says: str
) -> None:
    uri = node_with_tiny_kernel(tmp_path)
    workload: dict[str, object] = {
        "type": "vms",
        "connect": uri,
        "domain_type": "qemu",
        "base": {"domain": "kvmksm-tiny"},
        "clones": 2,
        "memory": memory,
    }
    if fill:
        workload["guest_fill"] = {"size": fill, "byte": "a"}
    sc = tmp_path / "small.yaml"
    sc.write_text(yaml.safe_dump({"name": "small", "workload": workload}))
    out = tmp_path / "out"
    p = kvmksm("bench", str(sc), "-o", str(out), root=fake_root)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line == f"kvmksm: workload: clones of kvmksm-tiny: {says}"
    assert not out.exists()


def test_bench_refuses_a_tiny_base_of_an_older_kvmksm(tmp_path: Path, fake_root: Path) -> None:
    """Version 1 booted Debian's whole initrd: its guests need 256 MiB, so today's sizes would
    panic; the run says to rebuild instead."""
    uri = node_with_tiny_kernel(tmp_path, version=1)
    workload = {"type": "vms", "connect": uri, "base": {"domain": "kvmksm-tiny"}, "clones": 1}
    sc = tmp_path / "old.yaml"
    sc.write_text(yaml.safe_dump({"name": "old", "workload": {**workload, "memory": "136MiB"}}))
    p = kvmksm("bench", str(sc), "-o", str(tmp_path / "out"), root=fake_root)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line == (
        "kvmksm: base domain 'kvmksm-tiny': it is a tiny image of an older kvmksm (version 1; "
        f"this one makes version {IMAGE_VERSION}); rebuild it with: kvmksm image build --name "
        "kvmksm-tiny"
    )
    assert not (tmp_path / "out").exists()


def test_doctor_names_the_problem(tmp_path: Path, fake_root: Path) -> None:
    uri = node_with_tiny_kernel(tmp_path)
    workload = {"type": "vms", "connect": uri, "base": {"domain": "kvmksm-tiny"}, "clones": 1}
    fill = {"size": "64MiB", "byte": "a"}
    small = Scenario.model_validate(
        {"workload": {**workload, "memory": "100MiB", "guest_fill": fill}}
    )
    found = [f for f in diagnose(HostFS(fake_root), small, uri) if "guest_fill" in f.what]
    assert [(f.level, f.what.split(":")[0]) for f in found] == [
        ("fail", "guest_fill 64.0 MiB does not fit in guests of 100.0 MiB")
    ]
    ok = Scenario.model_validate({"workload": {**workload, "memory": "128MiB", "guest_fill": fill}})
    assert not [f for f in diagnose(HostFS(fake_root), ok, uri) if f.level == "fail"]
    (tmp_path / "old").mkdir()
    old_uri = node_with_tiny_kernel(tmp_path / "old", version=1)
    old = Scenario.model_validate({"workload": {**workload, "connect": old_uri}})
    (finding,) = [f for f in diagnose(HostFS(fake_root), old, old_uri) if "older" in f.what]
    assert finding.level == "fail" and finding.fix == "kvmksm image build --name kvmksm-tiny"
