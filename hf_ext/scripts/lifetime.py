"""The processes of a run live no longer than the ``hf-ext`` command that launched them.

``hf-ext grpo|sft`` runs ``accelerate launch`` in its own process, which starts the training ranks below it: one
child process, or one per rank under torch's elastic agent (multi-process); another launcher may put a process in
between. Two sides keep them together:

- the command, ``launched_run``: on SIGINT or SIGTERM every process below it gets that signal, what is left after
  ``STOP_GRACE_S`` (or at a further signal) is killed, and only then does the command exit, with 128 + the signal
  number (130, 143). A launcher may stop its children first (torch's elastic agent does; so does accelerate's
  one-process launcher on SIGTERM, from accelerate 1.16 on, with 5 s before its kill); the command still checks
  that none is left;
- each rank, ``exit_with_launcher``: once the command is gone, whatever ended it (SIGKILL, SIGHUP included), the rank
  ends itself within ``WATCH_INTERVAL_S``, writing nothing more.
"""

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress

import psutil


LAUNCHER_PID = "HF_EXT_LAUNCHER_PID"  # in the ranks' environment: the pid of the hf-ext command that launched them
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 30.0  # what torch's elastic agent gives its workers, too
WATCH_INTERVAL_S = 0.5


class _Stop(BaseException):  # like KeyboardInterrupt: no `except Exception` on the way swallows it
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


@contextmanager
def launched_run():
    """Wraps ``accelerate launch`` in the ``hf-ext`` process (main thread). The ranks started inside find
    ``LAUNCHER_PID`` in their environment (``os.environ`` and the signal handlers are restored on the way out). On
    SIGINT or SIGTERM: every descendant process gets that signal, those still running after ``STOP_GRACE_S`` or at a
    further signal are killed, a line on stderr says so, then ``SystemExit(128 + signal number)``. A launcher that
    replaces these handlers while its children run (torch's elastic agent; accelerate's one-process launcher for
    SIGTERM) stops them itself and raises ``SignalException`` or ``SystemExit(128 + signal number)``; either ends
    here the same way."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    previous_handlers = {signum: signal.signal(signum, _raise_stop) for signum in STOP_SIGNALS}
    previous_pid = os.environ.get(LAUNCHER_PID)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        yield
    except (_Stop, SignalException, SystemExit) as stop:
        signum = _stop_signal(stop)
        if signum is None:
            raise
        for each in STOP_SIGNALS:  # a further signal, even under the elastic agent's handlers, stops the waiting
            signal.signal(each, _raise_stop)
        left = _stop_descendants(signum)
        ended = (
            f"processes {', '.join(str(p.pid) for p in left)} did not end"
            if left
            else "every process of the run has ended"
        )
        print(f"hf-ext: stopped by {signal.Signals(signum).name}; {ended}.", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if previous_pid is None:
            os.environ.pop(LAUNCHER_PID, None)
        else:
            os.environ[LAUNCHER_PID] = previous_pid


def _stop_signal(stop: BaseException) -> int | None:
    """The stop signal that ``stop`` reports: a ``_Stop``, the elastic agent's ``SignalException``, or a launcher's
    ``SystemExit`` with 128 + the number of one of ``STOP_SIGNALS``; None for any other exit."""
    if isinstance(stop, _Stop):
        return stop.signum
    if isinstance(stop, SystemExit):
        return next((signum for signum in STOP_SIGNALS if stop.code == 128 + signum), None)
    return stop.sigval


def _stop_descendants(signum: int) -> list:
    """Sends ``signum`` to every descendant of this process, kills those still running after ``STOP_GRACE_S`` (at
    once on a further stop signal); returns once none runs (a zombie has ended), or with those that still run
    ``STOP_GRACE_S`` after the kill."""
    processes = psutil.Process().children(recursive=True)
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.send_signal(signum)
    try:
        alive = _wait_ended(processes, STOP_GRACE_S)
    except _Stop:
        alive = processes
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    for each in STOP_SIGNALS:  # killed already: a further signal has nothing left to hasten, and must not interrupt
        signal.signal(each, signal.SIG_IGN)
    return _wait_ended(alive, STOP_GRACE_S)


def _wait_ended(processes: list, timeout: float) -> list:
    """Those of ``processes`` still running after at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [process for process in processes if running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def running(process: psutil.Process) -> bool:
    """Whether ``process`` still runs: neither gone, nor a zombie (ended, not yet reaped), nor its pid reused."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exit_with_launcher() -> None:
    """In a rank of a run that ``hf-ext`` launched (``LAUNCHER_PID`` set; elsewhere this does nothing): ends this
    process at once if that command is no longer among its ancestors, and from then on within ``WATCH_INTERVAL_S``
    of it going away (a daemon thread watches). The end is ``os._exit(1)``, after one line on stderr: nothing more
    is written, not even the rest of a checkpoint being saved."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None:
        return
    _exit_unless_below(int(launcher))
    threading.Thread(target=_watch, args=(int(launcher),), name="hf-ext launcher watch", daemon=True).start()


def _watch(launcher: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        _exit_unless_below(launcher)


def _exit_unless_below(launcher: int) -> None:
    # An ancestor test, not a liveness test: a dead launcher's pid, even reused, is never an ancestor again.
    if any(parent.pid == launcher for parent in psutil.Process().parents()):
        return
    with suppress(OSError):
        print(
            f"hf-ext (pid {launcher}), which launched this run, is gone: process {os.getpid()} stops without saving.",
            file=sys.stderr,
            flush=True,
        )
    os._exit(1)
