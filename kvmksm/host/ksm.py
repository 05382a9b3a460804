"""The KSM sysfs interface: counters, knobs, what this kernel has, save and restore.

Knobs are the writable files of /sys/kernel/mm/ksm, counters the read-only ones. Which a
kernel has varies by release, so nothing is assumed present: the directory is listed.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Mapping

from kvmksm.errors import UserError
from kvmksm.host.fs import KSM_DIR, HostFS, parse_keyvalue

# Knobs kvmksm knows, with the Linux release that added each, to explain a missing one.
KNOWN_KNOBS: dict[str, str] = {
    "run": "2.6.32",
    "pages_to_scan": "2.6.32",
    "sleep_millisecs": "2.6.32",
    "merge_across_nodes": "3.9",
    "use_zero_pages": "4.5",
    "max_page_sharing": "4.13",
    "stable_node_chains_prune_millisecs": "4.13",
    "smart_scan": "6.7",
    "advisor_mode": "6.9",
    "advisor_max_cpu": "6.9",
    "advisor_min_pages_to_scan": "6.9",
    "advisor_max_pages_to_scan": "6.9",
    "advisor_target_scan_time": "6.9",
}
KNOWN_COUNTERS: dict[str, str] = {
    "pages_shared": "2.6.32",
    "pages_sharing": "2.6.32",
    "pages_unshared": "2.6.32",
    "pages_volatile": "2.6.32",
    "full_scans": "2.6.32",
    "stable_node_chains": "4.13",
    "stable_node_dups": "4.13",
    "general_profit": "6.1",
    "pages_scanned": "6.7",
    "pages_skipped": "6.7",
    "ksm_zero_pages": "6.10",
}
# Written first on restore so they do not fight later writes; `run` always goes last.
_FIRST = ("advisor_mode",)
# The kernel refuses these (EBUSY) while any page is shared; unmerge (run=2) first.
NEED_UNMERGED = ("max_page_sharing", "merge_across_nodes")

KnobValue = int | str


def parse_value(text: str) -> KnobValue:
    """'42' -> 42; '[none] scan-time' -> 'none' (the selected choice); anything else as text."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


class Ksm:
    def __init__(self, fs: HostFS | None = None) -> None:
        self.fs = fs or HostFS()

    # -- what this kernel has -----------------------------------------------------
    def available(self) -> bool:
        return self.fs.exists(f"{KSM_DIR}/run")

    def require(self) -> None:
        if not self.available():
            raise UserError(
                f"KSM is not available: {self.fs.path(KSM_DIR)} is missing "
                "(kernel built without CONFIG_KSM?)"
            )

    def require_writable(self) -> None:
        """A bench writes knobs: say plainly when this user cannot (before anything starts)."""
        self.require()
        if not os.access(self.fs.path(f"{KSM_DIR}/run"), os.W_OK):
            raise UserError(
                f"cannot write KSM knobs in {self.fs.path(KSM_DIR)} as this user: "
                "kvmksm bench must run as root (kvmksm watch only reads)"
            )

    def files(self) -> list[str]:
        try:
            return self.fs.listdir(KSM_DIR)
        except FileNotFoundError:
            return []

    def _writable(self, name: str) -> bool:
        # Root can write anything, so ask the mode sysfs gives the attribute, not access().
        return bool(os.stat(self.fs.path(f"{KSM_DIR}/{name}")).st_mode & stat.S_IWUSR)

    def knobs(self) -> list[str]:
        return [n for n in self.files() if self._writable(n)]

    def counters(self) -> list[str]:
        return [n for n in self.files() if not self._writable(n)]

    # -- reading ----------------------------------------------------------------
    def read(self, name: str) -> KnobValue:
        return parse_value(self.fs.read(f"{KSM_DIR}/{name}"))

    def read_all(self) -> dict[str, KnobValue]:
        return {n: self.read(n) for n in self.files()}

    def read_knobs(self) -> dict[str, KnobValue]:
        return {n: self.read(n) for n in self.knobs()}

    def read_counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.counters():
            v = self.read(n)
            if isinstance(v, int):
                out[n] = v
        return out

    # -- writing ----------------------------------------------------------------
    def check_knobs(self, names: list[str] | Mapping[str, object], where: str = "") -> None:
        """Fail plainly when a knob is not on this kernel (or not a knob at all)."""
        have = set(self.knobs())
        for name in names:
            if name in have:
                continue
            if name in KNOWN_KNOBS:
                msg = (
                    f"KSM knob '{name}' is not available on this kernel "
                    f"({os.uname().release}); it appeared in Linux {KNOWN_KNOBS[name]}"
                )
            elif name in KNOWN_COUNTERS or name in self.files():
                msg = f"'{name}' is a read-only KSM counter, not a knob"
            else:
                msg = f"'{name}' is not a KSM knob (this kernel has: {', '.join(sorted(have))})"
            raise UserError(f"{where}{msg}")

    def write(self, name: str, value: KnobValue) -> None:
        path = f"{KSM_DIR}/{name}"
        try:
            self.fs.write(path, str(value))
        except OSError as e:
            if e.errno == errno.EBUSY and name in NEED_UNMERGED:
                # Shared pages pin these knobs: unmerge everything, then retry.
                self.fs.write(f"{KSM_DIR}/run", "2")
                self.fs.write(path, str(value))
            else:
                raise OSError(e.errno, f"cannot write {value!r} to {path}: {e.strerror}") from e

    def set_knobs(self, values: Mapping[str, KnobValue]) -> None:
        """Write knobs in a safe order: the advisor first, `run` last."""
        for name in ordered(values):
            if self.read(name) != values[name]:
                self.write(name, values[name])

    def restore(self, saved: Mapping[str, KnobValue]) -> list[str]:
        """Put every saved knob back; returns the problems (never raises: runs in teardown)."""
        problems: list[str] = []
        for name in ordered(saved):
            try:
                if self.read(name) != saved[name]:
                    self.write(name, saved[name])
            except OSError as e:
                problems.append(f"{name}: {e}")
        return problems

    # -- waiting for ksmd ---------------------------------------------------------
    def wait_full_scans(
        self, count: int, timeout: float, poll: float = 0.002, stop: object | None = None
    ) -> float:
        """Block until `full_scans` has risen by `count`; returns the seconds waited.

        KSM needs two scans to merge a page (unstable tree, then stable tree); LTP waits
        for three so a round has settled. Raises TimeoutError past `timeout`. Polled every
        2 ms: a round's scans can take a tenth of a second, and a read costs microseconds.
        """
        start = time.monotonic()
        first = int(self.read("full_scans"))
        while True:
            if int(self.read("full_scans")) >= first + count:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"ksmd did not finish {count} full scans within {timeout:g}s "
                    f"(full_scans went from {first} to {self.read('full_scans')})"
                )
            time.sleep(poll)


def ksm_processes(fs: HostFS, exclude: set[int] | None = None) -> list[dict[str, object]]:
    """Processes that have memory registered with KSM (ksm_rmap_items > 0 or merged pages),
    from /proc/<pid>/ksm_stat: other KSM users whose pages would mix into the counters."""
    out: list[dict[str, object]] = []
    exclude = exclude or set()
    try:
        pids = [int(n) for n in fs.listdir("proc") if n.isdigit()]
    except OSError:
        return out
    for pid in pids:
        if pid in exclude:
            continue
        try:
            stat = parse_keyvalue(fs.read(f"proc/{pid}/ksm_stat"))
            comm = fs.read(f"proc/{pid}/comm").strip()
        except OSError:
            continue
        if stat.get("ksm_rmap_items", 0) > 0 or stat.get("ksm_merging_pages", 0) > 0:
            out.append({"pid": pid, "comm": comm, **stat})
    return out


def ordered(names: Mapping[str, object] | list[str]) -> list[str]:
    keys = list(names)
    first = [k for k in _FIRST if k in keys]
    last = ["run"] if "run" in keys else []
    return first + [k for k in keys if k not in first and k not in last] + last
