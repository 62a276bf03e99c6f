"""Peak memory of a stretch of work, on the GPU (allocator peak) or the CPU (the process's peak RSS).

One helper for the run report (peak memory of each round's recovery) and the efficiency benchmark.
"""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start a new peak: the CUDA allocator's, or the process's VmHWM (Linux >= 4.0; elsewhere a no-op)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def memory_snapshot(device: torch.device | str | None = None) -> dict:
    """`peak_bytes` since the last reset, `current_bytes` now, and `kind` (what was measured)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(device),
            "current_bytes": torch.cuda.memory_allocated(device),
            "kind": "cuda_allocated",
        }
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    # Not ru_maxrss: a spawned child inherits its parent's high-water mark across fork + exec.
    return {"peak_bytes": fields.get("VmHWM"), "current_bytes": fields.get("VmRSS"), "kind": "cpu_rss"}
