"""Memory measurement: the peak a run reached, and the resident memory before the model loads."""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def rss_bytes() -> int:
    """The process's current resident set size in bytes."""
    return int(psutil.Process().memory_info().rss)


def reset_peak(device: torch.device) -> None:
    """Start peak accounting now (CUDA only; the OS peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(peak bytes, source): CUDA's max allocated memory on a GPU, else the OS peak RSS of this process.

    `ru_maxrss` is KiB on Linux and bytes on macOS; the peak RSS covers the whole process, imports included.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "os_peak_rss"
