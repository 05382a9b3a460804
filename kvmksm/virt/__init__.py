"""libvirt: the connection, base domains and clone XML, volumes, the clones of one run, boot
detection, base images (tiny and Debian), and cleanup of what kvmksm tagged."""

from kvmksm.errors import UserError

NEED_LIBVIRT = (
    "libvirt-python is not installed: pip install 'kvmksm[vms]' (it builds against the "
    "host's libvirt: apt-get install libvirt-dev pkg-config)"
)


def libvirt_missing(e: ImportError, what: str) -> UserError:
    """One line for a command that needs libvirt-python (an optional extra) on a host that
    lacks it; any other import error is a bug and goes up as it is."""
    if e.name not in ("libvirt", "libvirt_qemu", "libvirtmod", "libvirtmod_qemu"):
        raise e
    return UserError(f"{what} needs libvirt: {NEED_LIBVIRT}")
