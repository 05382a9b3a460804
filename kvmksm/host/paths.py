"""Where kvmksm keeps what it owns on the host (images, clone volumes, console logs).

One data directory, ``/var/lib/kvmksm`` unless ``KVMKSM_DATA_DIR`` says otherwise, so tests
and non-root users can move all of it at once.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path("/var/lib/kvmksm")


def data_dir() -> Path:
    return Path(os.environ.get("KVMKSM_DATA_DIR") or DEFAULT_DATA_DIR)


def images_dir() -> Path:
    """kvmksm's base images (tiny, Debian) and their kernel and initrd copies."""
    return data_dir() / "images"


def pool_dir() -> Path:
    """Target of the kvmksm-owned dir pool, made only when the scenario's pool is absent."""
    return data_dir() / "pool"


def console_dir() -> Path:
    """Serial console logs of clones, one file per clone, deleted on teardown."""
    return data_dir() / "console"


def ssh_dir() -> Path:
    """The SSH key kvmksm generates and puts in the Debian image (root's authorized key)."""
    return data_dir() / "ssh"


def apt_dir() -> Path:
    """Private apt state (sources, lists) used to find guest kernel packages; the host's own
    apt configuration is never changed."""
    return data_dir() / "apt"
