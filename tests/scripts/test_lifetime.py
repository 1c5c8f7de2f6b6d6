"""launched_run in this process: each way a launcher may report a stop ends in the same message and exit status,
and any other exit passes through untouched (whichever accelerate the suite has installed, both paths run here)."""

import os
import signal
import time

import pytest
from torch.distributed.elastic.multiprocessing.api import SignalException

from hf_ext.scripts.lifetime import LAUNCHER_PID, launched_run


def stopped(capsys, raise_stop) -> tuple[int, str]:
    """(exit status, stderr) of ``launched_run`` around ``raise_stop``, which must end it."""
    with pytest.raises(SystemExit) as exit_:
        with launched_run():
            raise_stop()
    return exit_.value.code, capsys.readouterr().err


def raising(error: BaseException):
    def raise_stop():
        raise error

    return raise_stop


def a_real_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises first


@pytest.mark.parametrize(
    "raise_stop",
    [
        a_real_sigterm,
        raising(SignalException("agent", signal.SIGTERM)),  # torch's elastic agent
        raising(SystemExit(143)),  # accelerate >= 1.16's one-process launcher
    ],
    ids=["signal", "elastic_agent", "accelerate_exit"],
)
def test_every_report_of_a_sigterm_ends_the_same_way(capsys, raise_stop):
    status, err = stopped(capsys, raise_stop)
    assert status == 143
    assert err.strip().endswith("hf-ext: stopped by SIGTERM; every process of the run has ended.")
    assert LAUNCHER_PID not in os.environ and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("code", [0, 1, 2, 137, "a message"])
def test_other_exits_pass_through_without_a_stop(capsys, code):
    status, err = stopped(capsys, raising(SystemExit(code)))
    assert status == code and "stopped by" not in err
