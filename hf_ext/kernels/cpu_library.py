"""Build, cache and load hf_ext's C kernels for the CPU (``hf_ext/kernels/<name>.c``), and run them on threads.

A kernel's C file is compiled once per machine with the system's C compiler (``$CC``, else ``cc``) into a shared
library in ``kernels/`` of ``hf_ext.cache.cache_root()`` (``$HF_EXT_CACHE``, else ``~/.cache/hf_ext``), named by a
hash of the source, the flags, the compiler's version and the CPU's model and feature flags, so a library built for
one CPU is never loaded on another. The flags allow vectorisation for this CPU (``-march=native``) but forbid FMA
contraction and unsafe math, so a C kernel rounds as its torch twin does. Without a working compiler ``load`` returns
None and says why (``load_error``); the kernel's dispatch then warns once and runs the twin.
``HF_EXT_DISABLE_CPU_KERNELS=1`` chooses the twins without building anything.

Calls through ctypes release the GIL, so ``run_chunks`` runs one call per chunk of work on a thread pool of
``torch.get_num_threads()`` threads.
"""

import concurrent.futures
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

from hf_ext.cache import cache_root


FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-fPIC", "-shared")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C files' DTYPE_* values


def cpu_kernels_disabled() -> bool:
    return os.environ.get("HF_EXT_DISABLE_CPU_KERNELS", "0").lower() in ("1", "true", "yes")


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    wanted = sorted({line for line in lines if line.split(":")[0].strip() in keys})
    return "\n".join([platform.machine(), platform.processor(), *wanted])


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``hf_ext/kernels/<name>.c``, built on first use; None when it cannot be built (``load_error``)."""
    try:
        library = _build_and_load(name)
    except (OSError, subprocess.SubprocessError) as error:
        _errors[name] = str(error).strip() or type(error).__name__
        return None
    _errors.pop(name, None)
    return library


_errors: dict[str, str] = {}


def load_error(name: str) -> str | None:
    """Why ``load(name)`` returned None (None when it has not failed)."""
    return _errors.get(name)


def _build_and_load(name: str) -> ctypes.CDLL:
    source = resources.files("hf_ext.kernels").joinpath(f"{name}.c").read_bytes()
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # CC may carry a wrapper: "ccache gcc"
    if shutil.which(compiler[0]) is None:
        raise OSError(f"no C compiler {compiler[0]!r} on PATH (set CC to one)")
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_signature().encode()]))
    library = cache_root() / "kernels" / f"{name}-{key.hexdigest()[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            source_path, built = Path(tmp) / f"{name}.c", Path(tmp) / library.name
            source_path.write_bytes(source)
            result = subprocess.run(
                [*compiler, *FLAGS, str(source_path), "-o", str(built)], capture_output=True, text=True, timeout=300
            )
            if result.returncode:
                raise OSError(f"{compiler[0]} failed to build {name}.c: {result.stderr.strip()[-2000:]}")
            os.replace(built, library)  # atomic: concurrent ranks each build, one copy wins
    return ctypes.CDLL(str(library))


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="hf_ext_cpu_kernel")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the pool's threads


def chunks(total: int, min_chunk: int) -> list[tuple[int, int]]:
    """Split ``range(total)`` into at most ``torch.get_num_threads()`` contiguous (begin, end) ranges of at least
    ``min_chunk`` items (one range when ``total`` is small)."""
    count = max(1, min(torch.get_num_threads(), total // max(min_chunk, 1)))
    bounds = [total * i // count for i in range(count + 1)]
    return [(begin, end) for begin, end in itertools.pairwise(bounds) if end > begin]


def run_chunks(call, ranges: list[tuple[int, int]]) -> None:
    """``call(index, begin, end)`` for every range, concurrently when there are several; re-raises the first
    error."""
    if len(ranges) == 1:
        call(0, *ranges[0])
        return
    futures = [_pool(len(ranges)).submit(call, index, *bounds) for index, bounds in enumerate(ranges)]
    for future in futures:
        future.result()
