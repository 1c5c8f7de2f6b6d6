"""Stopping `hf-ext` stops the training. SIGTERM, SIGINT or SIGKILL sent to the hf-ext process alone (not to its
process group) leaves no process of the run running and nothing more written into its output_dir; on 1 process
(accelerate's simple launcher) and on 2 (torch's elastic agent). Real signals, real runs, in subprocesses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hf_ext.scripts.lifetime import STOP_GRACE_S, WATCH_INTERVAL_S, running


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launched"))
from multiproc import free_port  # noqa: E402


EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT, signal.SIGKILL: -9}
STARTUP_S = 240  # imports, the launch and the first checkpoint, on a busy 2-core machine
QUIET_S = 3.0  # how long output_dir must stay unchanged once hf-ext is gone


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its size and modification time (ns)."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")
    }


def start_and_wait_for_a_checkpoint(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`hf-ext grpo` with a checkpoint every step and far more steps than the test lasts; returns once a checkpoint
    was written, with the processes of the run (hf-ext first)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "hf_ext.cli", "grpo", "--config", "grpo_ba", "--output_dir", str(out)]
    command += ["--max_steps", "100000", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2"]
    command += ["--logging_steps", "100000", "--disable_tqdm", "true", *extra]
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while not list(out.glob("checkpoint-*")):
        assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    return run, [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]


@pytest.fixture
def leftovers():
    """Processes to kill after the test, whatever its outcome (a failing test leaves no trainer running)."""
    processes = []
    yield processes
    for process in processes:
        if running(process):
            process.kill()


def check_stopped(tmp_path, leftovers, signum: int, processes: int, *extra: str) -> None:
    """Starts a run of ``processes`` ranks, sends ``signum`` to hf-ext alone; then hf-ext exits with the status of
    ``EXIT_STATUS``, no process of the run is left and output_dir stays as it is."""
    run, tree = start_and_wait_for_a_checkpoint(tmp_path, *extra)
    leftovers.extend(tree)
    assert len(tree) == 1 + processes  # hf-ext and the ranks, its children under both launchers
    os.kill(run.pid, signum)
    run.wait(timeout=STOP_GRACE_S + 30)
    log = (tmp_path / "run.log").read_text()
    assert run.returncode == EXIT_STATUS[signum], log[-3000:]
    if signum == signal.SIGKILL:  # the ranks notice that hf-ext is gone
        deadline = time.monotonic() + WATCH_INTERVAL_S + 10
        while any(map(running, tree)) and time.monotonic() < deadline:
            time.sleep(0.1)
    else:  # hf-ext returned only after every process of the run had ended
        assert f"hf-ext: stopped by {signal.Signals(signum).name}; every process of the run has ended." in log
    assert [process.pid for process in tree if running(process)] == [], log[-3000:]
    before = snapshot(tmp_path / "run")
    time.sleep(QUIET_S)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signalling_hf_ext_stops_the_run(tmp_path, leftovers, signum):
    check_stopped(tmp_path, leftovers, signum, 1)


@pytest.mark.multiproc
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_signalling_hf_ext_stops_both_ranks(tmp_path, leftovers, signum):
    extra = ["--accelerate_config", "two_process_cpu", "--main_process_port", str(free_port())]
    check_stopped(tmp_path, leftovers, signum, 2, *extra)
