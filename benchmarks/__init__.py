"""Benchmarks: RKU against every baseline and an outside peer, quality and speed, side by side."""
