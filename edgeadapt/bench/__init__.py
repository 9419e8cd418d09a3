"""Benchmarks: commands that print machine-readable results (edgeadapt bench ... --json)."""
