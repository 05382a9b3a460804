"""The kinds of event a run record holds, named once.

Events are ``{t, time, kind, detail, ...}`` entries in run.json. Analysis finds its windows
by them (KSM on, steady, unmerge), the report draws them, compare reads them; a kind is
always one of these names, never a string built at run time.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    # the run itself
    RUN_START = "run_start"
    RUN_END = "run_end"
    WORKLOAD_START = "workload_start"
    INTERRUPTED = "interrupted"
    ERROR = "error"
    TEARDOWN = "teardown"
    TEARDOWN_PROBLEMS = "teardown_problems"
    METRICS_ERROR = "metrics_error"
    SAMPLER_ERRORS = "sampler_errors"
    OTHER_KSM_USERS = "other_ksm_users"
    RECORD_UNWRITABLE = "record_unwritable"  # the results folder is full or read-only
    CLEANED = "cleaned"  # `kvmksm clean` finished the record of a run that was killed
    SKIPPED = "skipped"  # optional knobs or expectations this kernel lacks
    # KSM and its knobs
    KSM_OFF = "ksm_off"
    KSM_ON = "ksm_on"
    KNOBS_SET = "knobs_set"
    KNOBS_RESTORED = "knobs_restored"
    KNOB_CHANGED = "knob_changed"
    KNOBS_CHANGED = "knobs_changed"
    UNMERGE = "unmerge"
    UNMERGE_DONE = "unmerge_done"
    STOP = "stop"
    DRAINED = "drained"
    DRAIN_TIMEOUT = "drain_timeout"
    DRAIN_FAILED = "drain_failed"
    # processes workload
    ROUND_FILLED = "round_filled"
    SCANS_DONE = "scans_done"
    ROUND_CHECKED = "round_checked"
    VERIFIED = "verified"
    # guests of a bench
    POOL_CREATED = "pool_created"
    GUEST_DEFINED = "guest_defined"
    GUEST_STARTED = "guest_started"
    GUEST_UP = "guest_up"
    GUEST_REMOVED = "guest_removed"
    ALL_UP = "all_up"
    SETTLE_DONE = "settle_done"
    STEADY = "steady"
    STEADY_TIMEOUT = "steady_timeout"
    PLATEAU_DONE = "plateau_done"
    GUEST_LOST = "guest_lost"  # a guest stopped during the run (crashed, shut down, killed)
    LIBVIRT_LOST = "libvirt_lost"  # the run's libvirt connection closed (libvirtd restarted)
    LIBVIRT_RECONNECTED = "libvirt_reconnected"
    RECONCILED = "reconciled"
    SHARING_MATRIX = "sharing_matrix"
    SHARING_POTENTIAL = "sharing_potential"
    SHARING_SKIPPED = "sharing_skipped"
    SHARING_FAILED = "sharing_failed"
    POTENTIAL_FAILED = "potential_failed"
    # inside the guests, through their agents
    GUEST_RUN = "guest_run"
    CHURN_STARTED = "churn_started"
    PROBE_STARTED = "probe_started"
    PROBE = "probe"
    CHURN_STATUS = "churn_status"
    # watch
    WATCH_NOTE = "watch_note"
    WATCH_END = "watch_end"
    GUEST_APPEARED = "guest_appeared"
    GUEST_GONE = "guest_gone"
    GUEST_LIST_FAILED = "guest_list_failed"
    GUEST_LIST_OK = "guest_list_ok"
    BENCH_RUNNING = "bench_running"
    BENCH_ENDED = "bench_ended"
    CLOSE_PROBLEMS = "close_problems"


# Events after which the merge window of a run has ended (the first one after KSM went on).
ENDS_MERGE = (
    Kind.PLATEAU_DONE,
    Kind.GUEST_LOST,  # the figures after it describe fewer guests than the scenario
    Kind.UNMERGE,
    Kind.KSM_OFF,
    Kind.STOP,
    Kind.TEARDOWN,
    Kind.INTERRUPTED,
    Kind.ERROR,
    Kind.RUN_END,
)

# Events at which a run takes an extra sample (off the sampler's schedule): the counters as
# they were at each moment a figure or a check is taken, however short the run.
SAMPLED = (
    Kind.KSM_ON,
    Kind.ROUND_FILLED,
    Kind.SCANS_DONE,
    Kind.ROUND_CHECKED,
    Kind.UNMERGE,
    Kind.STOP,
    Kind.ALL_UP,
    Kind.STEADY,
    Kind.PLATEAU_DONE,
)
