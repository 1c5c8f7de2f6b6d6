"""Runs a worker script on N gloo CPU ranks (``torch.distributed.run``) and returns what each rank saved.

A worker is a script that calls ``init()``, does its work, and ends with ``finish(result)``: rank r's result
(anything ``torch.save`` writes) is read back by ``run_ranks`` as the r-th list entry.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(worker: Path, world_size: int, out_dir: Path, *args: str, timeout: int = 300) -> list:
    """Launch ``worker`` on ``world_size`` gloo ranks (1 included: the same code path) and return each rank's result.

    Args:
        worker: the script; it gets ``--out OUT_DIR`` and then ``args``.
        world_size: the number of ranks.
        out_dir: where the ranks write ``rank{r}.pt`` and the launcher its log.
        timeout: seconds before the launch is killed.

    Returns:
        The ranks' results, in rank order. An AssertionError carries the log's tail when a rank wrote nothing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker), "--out", str(out_dir), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = out_dir / f"launch_{world_size}.log"
    with open(log, "w") as handle:
        subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, env=env
        )
    files = [out_dir / f"rank{r}.pt" for r in range(world_size)]
    assert all(f.exists() for f in files), log.read_text()[-4000:]
    results = [torch.load(f, weights_only=False) for f in files]
    for f in files:
        f.unlink()
    return results


def init() -> tuple[int, int, Path, list[str]]:
    """In a worker: join the gloo group. Returns (rank, world size, the output folder, the remaining arguments)."""
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--out") + 1])
    rest = argv[: argv.index("--out")] + argv[argv.index("--out") + 2 :]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    return dist.get_rank(), dist.get_world_size(), out, rest


def finish(out: Path, result) -> None:
    """In a worker: save this rank's result, wait for every rank, and exit without tearing gloo down (its
    destructor can deadlock on exit)."""
    torch.save(result, out / f"rank{dist.get_rank()}.pt.tmp")
    os.replace(out / f"rank{dist.get_rank()}.pt.tmp", out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
