"""Shared by the multi-process tests and the scripts they launch under `accelerate launch` (CPU, gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def training_result(trainer) -> dict:
    """What the 1- vs 2-process comparisons look at: the weights, the logged losses, the world size."""
    return {
        "params": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "world_size": trainer.accelerator.num_processes,
        "is_main_process": trainer.accelerator.is_main_process,
    }


def save_and_exit(result: dict, out: str) -> None:
    """Rank 0 writes the result; then exit without tearing the trainer down: under gloo, freeing the DDP reducer
    can deadlock (ProcessGroupGloo's destructor joins a worker thread that waits for the GIL it holds)."""
    if result["is_main_process"]:
        torch.save(result, out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(script: Path, args: list[str], out: Path) -> dict:
    """`accelerate launch --multi_gpu --num_processes 2` on CPU; returns what the script saved to `out`."""
    launch = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, str(script), *args, "--out", str(out)]
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        subprocess.run(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, timeout=120)
    assert out.exists(), log.read_text()[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["world_size"] == 2
    return result
