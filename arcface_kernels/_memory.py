"""Peak-memory measurement of one call, on the CPU and on CUDA.

CUDA: torch.cuda.max_memory_allocated after a reset (the caching allocator's own count).
CPU: torch has no allocator statistics for the CPU, so the call runs under
torch.profiler with profile_memory=True and the peak is the running sum of the
allocation / free events it records (exact bytes requested through torch's CPU allocator;
page-level effects of malloc are not counted).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator, Optional, Tuple

import torch


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send the process's file descriptor 2 to /dev/null for the block: the profiler's
    native code prints start/stop and allocator notes there (not through Python), which
    would litter a command's output. Python-level exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Tuple[int, Any]:
    """Run ``fn()`` and return (peak bytes allocated beyond what was live before, result)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    from torch.profiler import ProfilerActivity, profile
    with _native_stderr_silenced(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, out


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on the device (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo),
    or None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
