"""Wall-clock timing shared by the benchmark scripts: synchronised on CUDA, medians, warm-up, interleaving."""

import statistics
import time

import torch


def timed_ms(fn, device: str) -> float:
    """Milliseconds of one call of ``fn``, waiting for the GPU before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def interleaved_medians_ms(fns: dict, device: str, repeats: int, warmup: int = 3) -> dict:
    """Median time of each function, calling them in turn on every repeat, so machine drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_ms(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}
