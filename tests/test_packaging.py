"""kvmksm installed plainly (``pip install .``, not editable) works the same from any folder:
bundled scenarios and templates come along, and the commands find them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from kvmksm.virt.tiny_image import TinyImage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (seeing the system's packages, so nothing is downloaded) with kvmksm
    installed from a wheel built of this checkout."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, system_site_packages=True, with_pip=False)
    # This interpreter's own pip and setuptools install into the venv's interpreter.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install",
         "-q", "--no-deps", "--disable-pip-version-check", str(REPO)],
        capture_output=True,
        text=True,
        cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root


def kvmksm(venv_root: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_root / "bin" / "kvmksm", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_plain_install_is_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = "import kvmksm, json; print(json.dumps(kvmksm.__file__))"
    proc = subprocess.run(
        [installed / "bin" / "python", "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    path = Path(json.loads(proc.stdout))
    assert installed in path.parents and REPO not in path.parents


def test_bundled_scenarios_from_another_folder(installed: Path, tmp_path: Path) -> None:
    bundled = "tiny3 ltp-ksm03 fedora3 tiny-sweep sweep-processes debian3 debian-sweep debian-churn"
    for name in (*bundled.split(), "ltp-ksm03-small", "scan-cost-sparse"):
        proc = kvmksm(installed, "validate", name, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{name}: ok")


def test_fleet_playbooks_come_along(installed: Path, tmp_path: Path) -> None:
    """kvmksm fleet sends its playbooks and Ansible loads its callback plugin from the package."""
    code = (
        "import json; from kvmksm.commands.fleet_ansible import FLEET_DATA, CALLBACKS; "
        "print(json.dumps([str(FLEET_DATA), sorted(p.name for p in FLEET_DATA.glob('*.yml')), "
        "sorted(p.name for p in CALLBACKS.glob('*.py'))]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [installed / "bin" / "python", "-c", code], capture_output=True, text=True, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    where, books, callbacks = json.loads(proc.stdout)
    assert str(installed) in where
    assert books == ["probe.yml", "run.yml", "stop.yml"]
    assert callbacks == ["kvmksm_fleet_log.py"]


def test_report_templates_come_along(installed: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from tests.recordgen import ltp_record

    rec = ltp_record(tmp_path / "rec")
    proc = kvmksm(installed, "report", str(rec), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "<svg" in (rec / "report.html").read_text()


@pytest.mark.realksm
def test_bench_ltp_ksm03_from_a_plain_install(
    installed: Path, tmp_path: Path, real_ksm: object
) -> None:
    proc = kvmksm(installed, "bench", "ltp-ksm03", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kvmksm bench ltp-ksm03: PASSED" in proc.stdout
    (run,) = (tmp_path / "out" / "ltp-ksm03").iterdir()
    assert (run / "report.html").exists()


@pytest.mark.libvirt
def test_image_build_from_a_plain_install(
    installed: Path, tmp_path: Path, tiny: TinyImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny base already built by this suite: a plain install finds it up to date."""
    monkeypatch.setenv("KVMKSM_DATA_DIR", str(tiny.image.parent.parent))
    proc = kvmksm(installed, "image", "build", "--name", tiny.domain, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr and f"base domain {tiny.domain}" in proc.stdout
    assert str(tiny.image) in proc.stdout
