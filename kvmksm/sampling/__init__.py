"""Sampling during a run or a watch: the deadline-scheduled sampler thread (host row) and the
per-guest rows it writes beside it."""
