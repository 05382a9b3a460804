"""Scenario files: the schema (model), loading with one-line errors (load), and judging
expectations against the counters (checks)."""
