"""Programs kvmksm copies into guests through the guest agent and runs there with the guest's
own python3: ``churn`` (memory rewritten at a given rate) and ``probe`` (timed writes, what a
guest feels of KSM). Each is one file using only Python's standard library (3.7 or later), and
imports nothing from kvmksm: the guest has no kvmksm."""

from importlib import resources


def source(name: str) -> bytes:
    """The text of program ``name`` ('churn' or 'probe'), as copied into a guest."""
    return resources.files(__name__).joinpath(f"{name}.py").read_bytes()
