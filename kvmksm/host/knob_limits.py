"""What values each KSM knob takes: the kernel's own limits, from the store functions in
mm/ksm.c (Linux 6.18: kstrtouint, kstrtoint, kstrtoul, kstrtobool and the checks after
them), so a scenario is refused before a run rather than failing half-way with EINVAL.

Where kvmksm asks for more than the kernel does, the reason is given with the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

UINT_MAX = 2**32 - 1
INT_MAX = 2**31 - 1
ULONG_MAX = 2**64 - 1  # unsigned long on the 64-bit hosts kvmksm runs on


@dataclass(frozen=True)
class Limit:
    low: int
    high: int
    why: str = ""  # said with the range when the kernel's range alone would surprise

    def describe(self) -> str:
        if (self.low, self.high) == (0, 1):
            text = "0 or 1"
        else:
            text = f"a whole number from {self.low} to {self.high}"
        return text + (f" ({self.why})" if self.why else "")


KNOB_LIMITS: dict[str, Limit] = {
    # kstrtouint accepts 0, but ksmd then scans no page: no merge, no full scan, and a run
    # would wait for scans until its timeout.
    "pages_to_scan": Limit(1, UINT_MAX, "0 would make ksmd scan nothing"),
    "sleep_millisecs": Limit(0, UINT_MAX),
    "merge_across_nodes": Limit(0, 1),
    "use_zero_pages": Limit(0, 1),
    # kstrtoint, then "if (knob < 2) return -EINVAL": a new KSM page has two sharers.
    "max_page_sharing": Limit(2, INT_MAX, "a KSM page starts with 2 sharers"),
    "stable_node_chains_prune_millisecs": Limit(0, UINT_MAX),
    "smart_scan": Limit(0, 1),
    # kstrtoul into an unsigned int: larger values would be cut, not refused.
    "advisor_max_cpu": Limit(0, UINT_MAX),
    "advisor_min_pages_to_scan": Limit(0, ULONG_MAX),
    "advisor_max_pages_to_scan": Limit(0, ULONG_MAX),
    # kstrtoul, then "if (value < 1) return -EINVAL" (seconds).
    "advisor_target_scan_time": Limit(1, ULONG_MAX),
}
ADVISOR_MODES = ("none", "scan-time")
# Knobs written as true/false in YAML as well as 0/1 (the kernel's kstrtobool).
BOOLEAN_KNOBS = ("merge_across_nodes", "use_zero_pages", "smart_scan")


def knob_problem(name: str, value: object) -> str | None:
    """What is wrong with `value` for the knob `name` (None when the kernel takes it).
    Unknown knobs are not judged here."""
    if name == "advisor_mode":
        if value in ADVISOR_MODES:
            return None
        return f"expected 'none' or 'scan-time', got {_show(value)}"
    limit = KNOB_LIMITS.get(name)
    if limit is None:
        return None
    if isinstance(value, bool):
        if name in BOOLEAN_KNOBS:
            return None
        return f"expected {limit.describe()}, got {value}"
    if not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            return f"expected an integer, got {_show(value)}"
    if not limit.low <= value <= limit.high:
        return f"expected {limit.describe()}, got {_show(value)}"
    return None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
