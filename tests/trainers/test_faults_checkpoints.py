"""An interrupted save never leaves a checkpoint that breaks resume (hf_ext.trainers.checkpoints): completion records,
rotation after the record, ``resume_from_checkpoint`` = last / true / a path, and a run killed (SIGKILL) while it
saves, resumed from the CLI with ``--resume_from_checkpoint last`` to the same final weights."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
import torch
from runs import hf_ext_command
from safetensors.torch import load_file

from hf_ext.trainers import checkpoints
from hf_ext.trainers.checkpoints import (
    RECORD_NAME,
    checkpoint_step,
    file_sizes,
    list_checkpoints,
    record_problems,
    resolve_resume_checkpoint,
    write_record,
)


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "launched"))
import sft_optim  # noqa: E402
from multiproc import free_port  # noqa: E402


OPTIM = "hf_ext_adamw_4bit"
TRAINER_FILES = {"model.safetensors": 64, "optimizer.pt": 32, "scheduler.pt": 8, "rng_state.pth": 8}


def make_checkpoint(run_dir: Path, step: int, recorded: bool = True, files: dict | None = None) -> Path:
    """A stand-in ``checkpoint-<step>`` with ``files`` (name -> size) and trainer_state.json, recorded if asked."""
    checkpoint = run_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name, size in {**TRAINER_FILES, "trainer_state.json": 2, **(files or {})}.items():
        if size is not None:
            (checkpoint / name).write_bytes(b"x" * size)
    if recorded:
        write_record(str(checkpoint), step)
    return checkpoint


def interrupt(checkpoint: Path, *lost: str) -> None:
    """What a save killed before its last files leaves: ``lost`` files and the record are not there."""
    for name in (*lost, RECORD_NAME):
        (checkpoint / name).unlink()


# ---------------------------------------------------------------- resolving resume_from_checkpoint


@pytest.mark.parametrize("value", [True, "last", "true", "LAST", "True"])
def test_last_and_true_take_the_newest_complete_checkpoint(tmp_path, value):
    make_checkpoint(tmp_path, 1)
    complete = make_checkpoint(tmp_path, 2)
    interrupt(make_checkpoint(tmp_path, 3), "optimizer.pt", "trainer_state.json")
    assert resolve_resume_checkpoint(value, str(tmp_path)) == str(complete)


def test_a_partial_checkpoint_is_refused_naming_what_it_lacks_and_the_newest_complete_one(tmp_path):
    complete = make_checkpoint(tmp_path, 2)
    partial = make_checkpoint(tmp_path, 3)
    interrupt(partial, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
    message = (
        f"resume_from_checkpoint: {partial} is incomplete or damaged: it lacks optimizer.pt, rng_state.pth, "
        f"scheduler.pt, trainer_state.json, {RECORD_NAME} (hf_ext's completion record). The newest complete "
        f"checkpoint beside it is {complete}: resume from it with --resume_from_checkpoint {complete} (or `last`)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_resume_checkpoint(str(partial), str(tmp_path))


def test_a_recorded_checkpoint_with_a_missing_or_cut_file_is_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 4)
    (checkpoint / "optimizer.pt").write_bytes(b"x" * 5)
    (checkpoint / "scheduler.pt").unlink()
    problems = "optimizer.pt has 5 bytes, its record says 32; scheduler.pt is missing"
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint} is incomplete or damaged: {problems}. {tmp_path}")):
        resolve_resume_checkpoint(str(checkpoint), str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"incomplete: checkpoint-4 ({problems})")):
        resolve_resume_checkpoint("last", str(tmp_path))


def test_without_any_record_last_takes_the_newest_checkpoint_with_a_trainer_state_and_warns(tmp_path):
    """Checkpoints of another trainer or an older hf_ext: resumable as before, with a warning."""
    older = make_checkpoint(tmp_path, 5, recorded=False)
    make_checkpoint(tmp_path, 6, recorded=False, files={"trainer_state.json": None})
    with pytest.warns(UserWarning, match=re.escape(f"{older} has no {RECORD_NAME}")):
        assert resolve_resume_checkpoint("last", str(tmp_path)) == str(older)
    with pytest.warns(UserWarning, match="its save was interrupted after its last file"):
        assert resolve_resume_checkpoint(str(older), str(tmp_path)) == str(older)


def test_nothing_to_resume_from_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"holds no complete checkpoint to resume from \(no checkpoint-N directory\)"):
        resolve_resume_checkpoint("last", str(tmp_path))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='nowhere' is no directory: pass a checkpoint-N"):
        resolve_resume_checkpoint("nowhere", str(tmp_path))
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert resolve_resume_checkpoint(False, str(tmp_path)) is None


# ---------------------------------------------------------------- through the Trainer


def test_each_save_is_recorded_and_rotation_waits_for_the_record(tmp_path, monkeypatch):
    """save_total_limit=1: a save that stops after the Trainer's files but before the record (checkpoint-3) must not
    have rotated checkpoint-2, the only complete one, away."""

    class Stopped(Exception):
        pass

    def record_until_step_3(checkpoint: str, global_step: int) -> None:
        if global_step == 3:
            raise Stopped
        write_record(checkpoint, global_step)

    monkeypatch.setattr(checkpoints, "write_record", record_until_step_3)
    with pytest.raises(Stopped):
        sft_optim.train(OPTIM, str(tmp_path), max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=1)
    assert [checkpoint_step(c) for c in list_checkpoints(str(tmp_path))] == [3, 2]  # checkpoint-1 rotated after 2
    second, third = tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"
    record = json.loads((second / RECORD_NAME).read_text())
    assert record == {"format": 1, "global_step": 2, "files": file_sizes(str(second))}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= record["files"].keys()
    assert record_problems(str(second)) == [] and record_problems(str(third)) is None
    assert resolve_resume_checkpoint("last", str(tmp_path)) == str(second)


def test_resume_skips_the_partial_checkpoint_and_is_bit_exact(tmp_path):
    """The issue's partial checkpoint-4 (no optimizer.pt, no trainer_state.json): refused by path, skipped by
    ``last``; resuming from checkpoint-3 gives the uninterrupted run's weights, and checkpoint-4 is saved anew."""
    straight, _ = sft_optim.train(OPTIM, str(tmp_path / "straight"), max_steps=4)
    run = tmp_path / "run"
    sft_optim.train(OPTIM, str(run), max_steps=4, save_strategy="steps", save_steps=1)
    interrupt(run / "checkpoint-4", "optimizer.pt", "trainer_state.json")
    with pytest.raises(ValueError, match=r"lacks optimizer\.pt, trainer_state\.json, .* checkpoint beside it is .*-3"):
        sft_optim.train(OPTIM, str(run), max_steps=4, resume_from_checkpoint=str(run / "checkpoint-4"))
    records = {step: os.stat(run / f"checkpoint-{step}" / RECORD_NAME).st_ino for step in (1, 2, 3)}
    resumed, _ = sft_optim.train(
        OPTIM, str(run), max_steps=4, save_strategy="steps", save_steps=1, resume_from_checkpoint="last"
    )
    assert {step: os.stat(run / f"checkpoint-{step}" / RECORD_NAME).st_ino for step in (1, 2, 3)} == records
    for key, value in straight["params"].items():
        assert torch.equal(value, resumed["params"][key]), key
    assert record_problems(str(run / "checkpoint-4")) == []


# ---------------------------------------------------------------- a real interruption, from the CLI

CLI = [sys.executable, "-c", "from hf_ext.cli import main; raise SystemExit(main())"]
SFT_4BIT = ["sft", "--config", "sft_allora_4bit", "--max_steps", "8"]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as output:
        return subprocess.Popen(CLI + argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the command and every process below it (the launcher and its training rank), and wait for them."""
    processes = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for running in reversed(processes):
        with suppress(psutil.NoSuchProcess):
            running.kill()
    psutil.wait_procs(processes, timeout=60)
    process.wait()


def kill_while_saving(argv: list[str], run_dir: Path, log: Path) -> Path | None:
    """Run the CLI; SIGKILL it as soon as its newest checkpoint-N (N >= 2) exists without a record. Returns that
    checkpoint if it is then still partial as the issue saw it (no record, no trainer_state.json), None if the save
    finished first or the run ended before."""
    process = start(argv, log)
    deadline = time.monotonic() + 300
    try:
        while process.poll() is None and time.monotonic() < deadline:
            newest = next(iter(list_checkpoints(str(run_dir))), None)
            if newest and checkpoint_step(newest) >= 2 and not os.path.exists(os.path.join(newest, RECORD_NAME)):
                kill_all(process)
                partial = not any(os.path.exists(os.path.join(newest, n)) for n in (RECORD_NAME, "trainer_state.json"))
                return Path(newest) if partial else None
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            kill_all(process)
    assert process.returncode == 0, log.read_text()[-3000:]
    return None


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_from_last_to_the_same_weights(tmp_path):
    reference = tmp_path / "reference"
    uninterrupted = start([*SFT_4BIT, "--output_dir", str(reference)], tmp_path / "reference.log")
    run = tmp_path / "run"
    saving = [*SFT_4BIT, "--output_dir", str(run), "--save_strategy", "steps", "--save_steps", "1"]
    for _attempt in range(5):
        shutil.rmtree(run, ignore_errors=True)
        partial = kill_while_saving(saving, run, tmp_path / "killed.log")
        if partial is not None:
            break
    assert partial is not None, "no save was caught in progress in 5 runs"
    previous = run / f"checkpoint-{checkpoint_step(str(partial)) - 1}"
    with pytest.raises(ValueError, match=re.escape(f"beside it is {previous}: resume from it")):
        resolve_resume_checkpoint(str(partial), str(run))

    result = hf_ext_command(*saving, "--resume_from_checkpoint", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected, resumed = (load_file(folder / "adapter_model.safetensors") for folder in (reference, run))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert all(record_problems(checkpoint) == [] for checkpoint in list_checkpoints(str(run)))


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_processes_record_both_rng_states_and_resume_from_last(tmp_path):
    """Each rank writes its own RNG state: the record, written after every rank is done, lists both."""
    two = ["--accelerate_config", "two_process_cpu", "--save_strategy", "steps", "--save_steps", "1"]
    argv = ["sft", "--config", "sft_allora_4bit", "--output_dir", str(tmp_path), "--save_total_limit", "2", *two]
    first = hf_ext_command(*argv, "--max_steps", "2", "--main_process_port", str(free_port()))
    assert first.returncode == 0, first.stderr[-3000:]
    for checkpoint in list_checkpoints(str(tmp_path)):
        record = json.loads((Path(checkpoint) / RECORD_NAME).read_text())
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= record["files"].keys()
    interrupt(tmp_path / "checkpoint-2", "rng_state_1.pth")
    resumed = hf_ext_command(
        *argv, "--max_steps", "3", "--resume_from_checkpoint", "last", "--main_process_port", str(free_port())
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [checkpoint_step(c) for c in list_checkpoints(str(tmp_path))] == [3, 2]
    assert all(record_problems(checkpoint) == [] for checkpoint in list_checkpoints(str(tmp_path)))
