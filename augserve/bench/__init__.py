"""Benchmarks that run ours and the baseline side by side in one process (ratios, not absolutes)."""
