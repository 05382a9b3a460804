"""Errors that end a command with one line and an exit status, never a traceback."""


class UserError(Exception):
    """Bad input or a host that cannot run the request: one line, exit status 2."""

    exit_code = 2


class LockedError(UserError):
    """Another kvmksm run holds the host-wide KSM lock."""


class WorkloadFailed(Exception):
    """The workload could not do what the scenario asked (a guest never came up, memory
    changed under KSM, ksmd never finished its scans): the run fails with this reason."""


class Interrupted(BaseException):
    """SIGTERM (or SIGHUP) received: unwinds like Ctrl-C so teardown runs."""
