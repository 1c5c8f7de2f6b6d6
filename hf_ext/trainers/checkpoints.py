"""``CheckpointMixin``: checkpoints that an interrupted save cannot pass off as complete, and a resume that checks
what it loads. hf_ext's trainers list it before their TRL base.

Saving. The Trainer writes ``checkpoint-N`` file by file (weights, optimizer, scheduler, one RNG state per
process, then ``trainer_state.json``), so a run killed during a save leaves a directory that looks like a
checkpoint. Here a save first removes a stale ``checkpoint-N`` (an earlier run's), lets the Trainer write, waits
for every process; then each process that saves flushes every file to disk and writes ``hf_ext_checkpoint.json``,
the completion record (each file's size), under a temporary name renamed into place. Only then are older
checkpoints rotated out (``save_total_limit``), so rotation never leaves an incomplete checkpoint as the only one.

Resuming. ``resume_from_checkpoint`` takes ``True``, ``"last"`` or ``"true"`` (the newest complete checkpoint of
``output_dir``; what ``--resume_from_checkpoint last`` gives) or a path. A checkpoint is complete when every file
of its record is there at its recorded size. One without a record was saved by another trainer or an older hf_ext,
or killed between its last file and the record: it is taken when named by path (with a warning) if it has
``trainer_state.json``, the Trainer's last file, and picked by ``last`` only where no checkpoint of ``output_dir``
has a record. An incomplete checkpoint is refused, naming what it lacks and the newest complete one.

Then, before anything is loaded: a missing optimizer, scheduler, scaler or RNG state that this process would load
warns (the Trainer silently starts it fresh); an empty, truncated or corrupted one is refused, naming the file (any
byte: ``torch.save`` writes a CRC-32 per record, which ``torch.load`` does not check); the optimizer state must be
one that this run's ``optim`` and ``optim_args`` continue (``optim_args.check_resumed_optimizer``). A state the
optimizer refuses on loading (``StateDictError``) is re-raised naming the file and the parameter. The optimizer and
scheduler checks cover the Trainer's ``optimizer.pt`` / ``scheduler.pt`` (one process, DDP); DeepSpeed and FSDP
load their own files.
"""

import json
import os
import pickle
import shutil
import warnings
import zipfile

import torch
from transformers.utils import logging

from ..optim.adamw4bit import StateDictError
from .optim_args import apply_run_policies, check_resumed_optimizer
from .transformers_compat import (
    OPTIMIZER_NAME,
    PREFIX_CHECKPOINT_DIR,
    SCALER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    rng_state_name,
    rotate_checkpoints,
)


RECORD_NAME = "hf_ext_checkpoint.json"
RECORD_FORMAT = 1
LATEST = ("last", "true")  # resume_from_checkpoint values (any case) that mean the newest complete checkpoint

logger = logging.get_logger(__name__)


def checkpoint_step(path: str) -> int | None:
    """N of a ``checkpoint-N`` directory name, else None."""
    name, prefix = os.path.basename(os.path.normpath(path)), f"{PREFIX_CHECKPOINT_DIR}-"
    digits = name.removeprefix(prefix)
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None


def list_checkpoints(run_dir: str) -> list[str]:
    """The ``checkpoint-N`` directories of ``run_dir``, highest N first."""
    if not os.path.isdir(run_dir):
        return []
    steps = {name: checkpoint_step(name) for name in os.listdir(run_dir)}
    named = sorted((step, os.path.join(run_dir, name)) for name, step in steps.items() if step is not None)
    return [path for _, path in reversed(named) if os.path.isdir(path)]


def file_sizes(checkpoint: str) -> dict[str, int]:
    """Relative path -> size of every file under ``checkpoint`` but its record (and the record's temporary files)."""
    sizes = {}
    for root, _, names in os.walk(checkpoint):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), checkpoint)
            if not relative.startswith(RECORD_NAME):
                sizes[relative] = os.path.getsize(os.path.join(root, name))
    return sizes


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)  # a file or, on POSIX, a directory
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_record(checkpoint: str, global_step: int) -> None:
    """Flush every file of ``checkpoint`` to disk, then write its completion record atomically (temporary file,
    fsync, rename, fsync of the directories)."""
    sizes = file_sizes(checkpoint)
    for relative in sizes:
        _fsync(os.path.join(checkpoint, relative))
    temporary = os.path.join(checkpoint, f"{RECORD_NAME}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump({"format": RECORD_FORMAT, "global_step": global_step, "files": sizes}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(checkpoint, RECORD_NAME))
    _fsync(checkpoint)
    _fsync(os.path.dirname(os.path.abspath(checkpoint)))


def record_problems(checkpoint: str) -> list[str] | None:
    """None if ``checkpoint`` has no completion record; else how it differs from its record ([]: complete)."""
    path = os.path.join(checkpoint, RECORD_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            sizes = json.load(handle)["files"]
        items = sorted(sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"its record {RECORD_NAME} is unreadable ({type(error).__name__}: {error})"]
    problems = []
    for relative, size in items:
        path = os.path.join(checkpoint, relative)
        if not os.path.isfile(path):
            problems.append(f"{relative} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{relative} has {os.path.getsize(path)} bytes, its record says {size}")
    return problems


def newest_complete(run_dir: str, other_than: str | None = None) -> str | None:
    """The highest ``checkpoint-N`` of ``run_dir`` whose record it matches (not ``other_than``), else None."""
    for checkpoint in list_checkpoints(run_dir):
        if record_problems(checkpoint) == [] and not _same(checkpoint, other_than):
            return checkpoint
    return None


def _same(path: str, other: str | None) -> bool:
    return other is not None and os.path.abspath(path) == os.path.abspath(other)


def incompleteness(checkpoint: str) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, else None: how it differs from its record, or without a record,
    that it lacks ``trainer_state.json``. What it lacks is listed against the files of the newest complete checkpoint
    beside it (if any), the record included."""
    problems = record_problems(checkpoint)
    if problems:
        return "; ".join(problems)
    if problems == [] or os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        return None
    reference = newest_complete(os.path.dirname(os.path.abspath(checkpoint)), other_than=checkpoint)
    expected = set(file_sizes(reference)) if reference else {TRAINER_STATE_NAME}
    present = set(file_sizes(checkpoint))
    lacking = sorted(expected - present) + [f"{RECORD_NAME} (hf_ext's completion record)"]
    return f"it lacks {', '.join(lacking)}"


def _unrecorded_warning(checkpoint: str) -> None:
    warnings.warn(
        f"resume_from_checkpoint: {checkpoint} has no {RECORD_NAME} (hf_ext's completion record): it was saved by "
        "another trainer or an older hf_ext, or its save was interrupted after its last file. Resuming from it "
        "without checking that its files are whole.",
        stacklevel=3,
    )


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint that ``resume_from_checkpoint=value`` resumes from, None for no resume; raises ValueError for an
    incomplete checkpoint or none to resume from. See the module docstring."""
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.lower() in LATEST):
        return _latest(value, output_dir)
    if not os.path.isdir(value):
        raise ValueError(
            f"resume_from_checkpoint={value!r} is no directory: pass a checkpoint-N directory, or 'last' (or True) "
            f"for the newest complete checkpoint of output_dir ({output_dir})."
        )
    problem = incompleteness(value)
    if problem is None:
        if record_problems(value) is None:
            _unrecorded_warning(value)
        return value
    parent = os.path.dirname(os.path.abspath(value))
    newest = newest_complete(parent)
    hint = (
        f"The newest complete checkpoint beside it is {newest}: resume from it with --resume_from_checkpoint "
        f"{newest} (or `last`)."
        if newest
        else f"{parent} holds no complete checkpoint: pass another one, or start without resume_from_checkpoint."
    )
    raise ValueError(f"resume_from_checkpoint: {value} is incomplete or damaged: {problem}. {hint}")


def _latest(value, output_dir: str) -> str:
    checkpoints = list_checkpoints(output_dir)
    records = [record_problems(checkpoint) for checkpoint in checkpoints]
    chosen = next((c for c, problems in zip(checkpoints, records, strict=True) if problems == []), None)
    if chosen is None and all(problems is None for problems in records):  # no hf_ext records: another trainer's
        chosen = next((c for c in checkpoints if incompleteness(c) is None), None)
        if chosen is not None:
            _unrecorded_warning(chosen)
    skipped = checkpoints[: checkpoints.index(chosen)] if chosen else checkpoints
    reasons = ", ".join(f"{os.path.basename(c)} ({incompleteness(c) or 'no completion record'})" for c in skipped)
    if chosen is None:
        raise ValueError(
            f"resume_from_checkpoint={value!r}: {output_dir} holds no complete checkpoint to resume from"
            + (f"; incomplete: {reasons}" if reasons else " (no checkpoint-N directory)")
            + ". Pass a checkpoint's path, or start without resume_from_checkpoint."
        )
    if skipped:
        logger.warning(f"resume_from_checkpoint={value!r}: resuming from {chosen}; newer but incomplete: {reasons}.")
    return chosen


def _unloadable(checkpoint: str, name: str, problem: str) -> str:
    other = newest_complete(os.path.dirname(os.path.abspath(checkpoint)), other_than=checkpoint)
    beside = f" (the newest complete one beside it: {other})" if other else ""
    return (
        f"resume_from_checkpoint: {os.path.join(checkpoint, name)} {problem}, so the checkpoint cannot be resumed "
        f"from. Restore the file, resume from another checkpoint{beside}, or start without resume_from_checkpoint."
    )


def torch_file_problem(path: str) -> str | None:
    """Why ``path`` is no whole ``torch.save`` file (a zip archive with a CRC-32 per record), else None. Records with
    CRC 0 (``torch.serialization.set_crc32_options(False)`` writes none) are not checked."""
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        return f"is truncated or no torch.save file ({type(error).__name__}: {error})"
    with archive:
        for info in archive.infolist():
            if not info.CRC:
                continue
            try:
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                return f"has a damaged record {info.filename!r} ({error}): its bytes are not those torch.save wrote"
    return None


class CheckpointMixin:
    """Trainer side of the module docstring: ``_save_checkpoint`` records complete checkpoints; ``train`` resolves
    and checks ``resume_from_checkpoint``; ``_load_optimizer_and_scheduler`` names the file and parameter of a
    refused optimizer state and applies the run's ``optim_args`` policies."""

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's save into a fresh ``checkpoint-N``, then (every process done) its record, then rotation."""
        run_dir = self._get_output_dir(trial=trial)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(checkpoint):
            shutil.rmtree(checkpoint, ignore_errors=True)  # a stale one: none of its files may pass for this save's
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotate once this one is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            self._save_method_state(checkpoint)
        self.accelerator.wait_for_everyone()  # every process's files (RNG states) are written
        if self.args.should_save:
            write_record(checkpoint, self.state.global_step)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The Trainer's ``train``, from the checkpoint that ``resolve_resume_checkpoint`` gives for
        ``resume_from_checkpoint`` (None, False, True, "last", "true" or a path), once its files are checked."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self._check_resume_files(checkpoint)
            self._load_method_state(checkpoint)
        return super().train(checkpoint, *args, **kwargs)

    def _save_method_state(self, checkpoint: str) -> None:
        """Writes what an hf_ext method keeps across steps into ``checkpoint`` (main process, before the record)."""

    def _load_method_state(self, checkpoint: str) -> None:
        """Restores what ``_save_method_state`` wrote into ``checkpoint``, before training resumes."""

    def _check_resume_files(self, checkpoint: str) -> None:
        """The files this process loads from ``checkpoint`` besides the weights: warn for missing ones, refuse
        damaged ones and an optimizer state this run cannot continue."""
        own_optimizer_files = not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        rng = rng_state_name(self.args.world_size, self.args.process_index)
        expected = {rng: "the random number generators are not restored (sampling and dropout draw other numbers)"}
        if own_optimizer_files:
            fresh = "the optimizer and the learning-rate scheduler start fresh (the Trainer loads them together)"
            expected |= {OPTIMIZER_NAME: fresh, SCHEDULER_NAME: fresh}
        if getattr(self.accelerator, "scaler", None) is not None:
            expected[SCALER_NAME] = "the fp16 loss scaler starts fresh"
        missing = [name for name in expected if not os.path.isfile(os.path.join(checkpoint, name))]
        if missing:
            consequences = "; ".join(dict.fromkeys(expected[name] for name in missing))
            warnings.warn(
                f"resume_from_checkpoint: {checkpoint} lacks {', '.join(missing)}: {consequences}. The run goes on "
                "from its weights and step, but not as the interrupted run would have, and its next checkpoints "
                "replace the older ones (save_total_limit). Resume from a checkpoint that has these files to continue "
                "the run exactly.",
                stacklevel=3,
            )
        for name in [name for name in expected if name not in missing]:
            problem = torch_file_problem(os.path.join(checkpoint, name))
            if problem:
                raise ValueError(_unloadable(checkpoint, name, problem))
        if own_optimizer_files and OPTIMIZER_NAME not in missing:
            path = os.path.join(checkpoint, OPTIMIZER_NAME)
            try:  # mmap: only the pickled structure is read, not the tensors
                param_groups = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["param_groups"]
            except (RuntimeError, pickle.UnpicklingError, KeyError, TypeError) as error:
                problem = f"is no optimizer state dict ({type(error).__name__}: {error})"
                raise ValueError(_unloadable(checkpoint, OPTIMIZER_NAME, problem)) from None
            try:
                check_resumed_optimizer(self.args, param_groups)
            except ValueError as error:
                raise ValueError(f"resume_from_checkpoint: {path}: {error}") from None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's loading; a state the optimizer refuses is re-raised (ValueError) naming the file and the
        parameter; then the run's ``optim_args`` policies are put back (``apply_run_policies``)."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except StateDictError as error:
            names = [name for name, param in self.model.named_parameters() if param is error.param]
            parameter = f" (parameter '{names[0]}')" if names else ""
            raise ValueError(
                f"resume_from_checkpoint: {os.path.join(checkpoint, OPTIMIZER_NAME)}{parameter}: {error}"
            ) from None
        if checkpoint is not None:
            apply_run_policies(self.optimizer, self.args)
