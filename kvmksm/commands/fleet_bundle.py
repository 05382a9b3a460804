"""What `kvmksm fleet run` puts on each host, built on the controller so hosts need no package
registry: two gzip'd tarballs, unpacked side by side on the host and used through PYTHONPATH.

- the dependencies (pydantic, pandas, ... as kvmksm's own metadata lists them, without the
  `vms` extra: a host that only runs processes scenarios needs no libvirt), as `pip install
  --target` lays out the wheels of a wheelhouse for the host's Python, C library and machine
  (`--only-binary=:all:` with that platform's tags); bytecode is compiled in when the host's
  Python is the controller's minor version. Cached by that key and the requirements.
- kvmksm itself: the package folder this controller runs, as it is (its fingerprint is a
  digest of every file in it, so a changed checkout is a new bundle even at the same
  version).

Unpacking a tree is one `tar -x` on the host; installing the same wheels with pip took 164 s
(45 s without bytecode) in a guest under TCG. bench/bench_fleet.py measures both.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import kvmksm
from kvmksm import __version__
from kvmksm.errors import UserError
from kvmksm.host import paths

PACKAGE = Path(kvmksm.__file__).resolve().parent
OLDEST_GLIBC = 17  # manylinux2014
KEEP = 5  # kvmksm bundles kept in the cache
# What only the controller uses: a host runs `kvmksm bench --no-report` (records, no pages,
# no plan), and the controller draws the reports, the comparison and the plan. Leaving them
# out halves what each host unpacks (tests/test_fleet.py checks that bench never imports them).
CONTROLLER_ONLY = ("matplotlib", "jinja2", "statsmodels")


@dataclass(frozen=True)
class Bundle:
    id: str  # the folder name under kvmksm_root/deps or kvmksm_root/kvmksm on a host
    path: Path  # the tarball on the controller
    seconds: float = 0.0  # spent building it now (0 when it came from the cache)


@dataclass(frozen=True)
class Target:
    """What a host's Python can load: from the probe."""

    python: str  # "3.11.2"
    machine: str  # "x86_64"
    libc: tuple[str, str]  # ("glibc", "2.36")
    implementation: str = "cpython"

    @property
    def minor(self) -> str:
        return "".join(self.python.split(".")[:2])

    def platforms(self) -> list[str]:
        """pip's --platform tags for this host, newest first (pip does not widen them)."""
        name, version = self.libc
        if name != "glibc":
            raise UserError(
                f"a host's C library is {name or 'unknown'} {version}: kvmksm fleet installs "
                "manylinux (glibc) wheels only"
            )
        m = re.match(r"2\.(\d+)", version)
        if not m:
            raise UserError(f"a host's glibc version {version!r} is not 2.N")
        minor = int(m.group(1))
        tags = [f"manylinux_2_{n}_{self.machine}" for n in range(minor, OLDEST_GLIBC - 1, -1)]
        return tags + [f"manylinux2014_{self.machine}", f"manylinux2010_{self.machine}"]


def cache_dir() -> Path:
    return paths.data_dir() / "fleet"


# -- kvmksm itself ------------------------------------------------------------------------
def _package_files() -> list[Path]:
    return sorted(
        p
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".tmp"))
    )


def fingerprint() -> str:
    """A digest of every file of the kvmksm package this controller runs."""
    h = hashlib.sha256()
    for p in _package_files():
        h.update(str(p.relative_to(PACKAGE)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def kvmksm_bundle(cache: Path | None = None) -> Bundle:
    """The kvmksm package folder as a tarball (kvmksm/...), made once per fingerprint."""
    cache = cache or cache_dir()
    ident = f"{__version__}-{fingerprint()[:12]}"
    path = cache / f"kvmksm-{ident}.tar.gz"
    if path.exists():
        return Bundle(ident, path)
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in _package_files():
            tar.add(p, arcname=str(Path("kvmksm") / p.relative_to(PACKAGE)), recursive=False)
    tmp.replace(path)
    # A checkout changes often: keep the newest few kvmksm bundles, not one per edit.
    old = sorted(cache.glob("kvmksm-*.tar.gz"), key=lambda p: p.stat().st_mtime)[:-KEEP]
    for p in old:
        p.unlink(missing_ok=True)
    return Bundle(ident, path, time.monotonic() - t0)


# -- the dependencies ----------------------------------------------------------------------
def requirements() -> list[str]:
    """kvmksm's own requirements, without extras: from the checkout's pyproject.toml when the
    package runs from one, else from the installed distribution's metadata."""
    pyproject = PACKAGE.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib  # only for a checkout; an installed kvmksm reads its metadata

        data = tomllib.loads(pyproject.read_text())
        return list(data["project"]["dependencies"])
    try:
        reqs = importlib.metadata.requires("kvmksm") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "cannot tell kvmksm's requirements: neither a checkout (pyproject.toml) nor "
            "installed (pip install kvmksm)"
        ) from None
    return [r for r in reqs if "extra ==" not in r]


def host_requirements() -> list[str]:
    """The requirements a host needs to run a bench: all but CONTROLLER_ONLY."""
    return [r for r in requirements() if _name(r) not in CONTROLLER_ONLY]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def deps_bundle(target: Target, cache: Path | None = None) -> Bundle:
    """The dependencies unpacked for `target` and tarred, made once per (Python, machine,
    C library, requirements)."""
    cache = cache or cache_dir()
    reqs = host_requirements()
    digest = hashlib.sha256("\n".join(sorted(reqs)).encode()).hexdigest()[:10]
    libc = "".join(target.libc).replace(".", "")
    ident = f"py{target.minor}-{target.machine}-{libc}-{digest}"
    path = cache / f"deps-{ident}.tar.gz"
    if path.exists():
        return Bundle(ident, path)
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".deps-") as tmp:
        tree = Path(tmp) / "tree"
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--target", str(tree), "--only-binary=:all:", "--implementation", "cp",
            "--python-version", target.minor[0] + "." + target.minor[1:],
            *[a for tag in target.platforms() for a in ("--platform", tag)],
            *reqs,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise UserError(
                f"cannot build the dependency bundle for Python {target.python} on "
                f"{target.machine} ({' '.join(target.libc)}): pip: {last}"
            )
        shutil.rmtree(tree / "bin", ignore_errors=True)  # console scripts: not used, wrong #!
        for tests in [d for d in tree.glob("*/**/tests") if d.is_dir()]:
            shutil.rmtree(tests, ignore_errors=True)  # the packages' own test suites: a third
        if target.minor == f"{sys.version_info.major}{sys.version_info.minor}":
            # Same bytecode format as this Python: compile here, not under the host's CPU.
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", "-j0", str(tree)],
                capture_output=True,
            )
        part = path.with_suffix(".part")
        with tarfile.open(part, "w:gz", compresslevel=6) as tar:
            for p in sorted(tree.iterdir()):
                tar.add(p, arcname=p.name)
        part.replace(path)
    return Bundle(ident, path, time.monotonic() - t0)
