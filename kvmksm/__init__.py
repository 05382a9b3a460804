"""kvmksm: measure Linux KSM (Kernel Samepage Merging) on real hosts."""

__version__ = "0.1.0"
