"""Transient memory of one call: the peak resident-set growth on CPU (Linux ``/proc``) and the allocator's peak on
CUDA. Shared by the benchmark scripts and by tests that bound a transient; importing it has no side effects (the
scripts find it next to them, tests put this folder on ``sys.path``).

On CPU the measurement is only meaningful in a fresh process started with ``FRESH_PROCESS_ENV`` (glibc then serves
large allocations with mmap and returns them to the OS on free) and after one warm-up call (lazy initialisation,
allocator caches), so that the resident set before the call holds nothing the call will reuse.
"""

import torch


FRESH_PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``"VmRSS"``, ``"VmHWM"``), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_transient_bytes(fn) -> int:
    """Peak resident-set growth of one call, ``max(0, VmHWM after - VmRSS before)`` in bytes (Linux).

    The peak (VmHWM) is reset first by writing ``5`` to ``/proc/self/clear_refs``.

    Args:
        fn: a callable without arguments.

    Returns:
        int bytes, a multiple of 1024.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_kib("VmRSS")
    fn()
    peak = proc_status_kib("VmHWM")
    return max(0, peak - before) * 1024


def cuda_transient_bytes(fn) -> int:
    """``torch.cuda.max_memory_allocated`` during one call above the allocation before it, in bytes.

    Args:
        fn: a callable without arguments that runs on the current CUDA device.

    Returns:
        int bytes.
    """
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
