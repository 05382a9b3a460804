"""The command line as a user meets it: one clear line and exit status 2 for what cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def kvmksm(*args: str, root: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if root is not None:
        env["KVMKSM_ROOT"] = str(root)
    return subprocess.run(
        [sys.executable, "-m", "kvmksm", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_fedora3_without_fedora01_says_what_to_do(tmp_path: Path, fake_root: Path) -> None:
    # libvirt's test driver has no fedora01: the seed's scenario must say so and stop.
    out = tmp_path / "out"
    p = kvmksm("bench", "fedora3", "-c", "test:///default", "-o", str(out), root=fake_root)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("kvmksm: base domain 'fedora01' not found at test:///default: ")
    assert "define your guest there and shut it off" in line
    assert "kvmksm bench scenarios/tiny3.yaml" in line
    assert not out.exists()


def test_default_scenario_without_image_says_build_it(tmp_path: Path, fake_root: Path) -> None:
    p = kvmksm("bench", "-c", "test:///default", "-o", str(tmp_path), root=fake_root)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line == (
        "kvmksm: base domain 'kvmksm-tiny' not found at test:///default: build the tiny base "
        "image first with: kvmksm image build --name kvmksm-tiny"
    )


def test_missing_scenario_file() -> None:
    p = kvmksm("bench", "no-such-scenario.yaml")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "kvmksm: no-such-scenario.yaml: no such scenario file (bundled scenarios: debian-churn, "
        "debian-sweep, debian3, fedora3, ltp-ksm03, ltp-ksm03-small, scan-cost-sparse, "
        "sweep-processes, tiny-sweep, tiny3)"
    )


def test_readme_paths_to_bundled_scenarios_work_from_any_folder(tmp_path: Path) -> None:
    """`kvmksm validate scenarios/tiny3.yaml`, as the README writes it, outside the checkout."""
    p = subprocess.run(
        [sys.executable, "-m", "kvmksm", "validate", "scenarios/tiny3.yaml", "tiny3.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith("scenarios/tiny3.yaml: ok (vms workload")


def test_vm_scenario_without_libvirt_python_is_one_line(fake_root: Path) -> None:
    """A host without the vms extra: one line saying what to install, nothing changed."""
    code = (
        "import sys; sys.modules['libvirt'] = None; from kvmksm.cli import main; "
        "sys.exit(main(['bench', 'tiny3']))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "KVMKSM_ROOT": str(fake_root)},
    )
    assert p.returncode == 2
    assert p.stderr.strip().startswith("kvmksm: a vms scenario needs libvirt: libvirt-python is")
    assert "pip install 'kvmksm[vms]'" in p.stderr and "\n" not in p.stderr.strip()


def test_validate_and_help() -> None:
    p = kvmksm("validate", "ltp-ksm03", "tiny3", "fedora3")
    assert p.returncode == 0, p.stderr
    assert "ltp-ksm03: ok (processes workload" in p.stdout
    h = kvmksm("--help")
    for cmd in ("bench", "report", "compare", "plan", "doctor", "clean", "image", "watch"):
        assert cmd in h.stdout
