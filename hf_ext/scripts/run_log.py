"""What a training script prints while and after it trains, on the main process only: one aligned row per log under
a header, in place of the Trainer's dicts (the progress bar kept), then one summary line."""

import os

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from hf_ext.trainers import grpo_losses


GRPO_COLUMNS = ("reward", "reward_std", "kl", "entropy")
SFT_COLUMNS = ("loss", "mean_token_accuracy", "entropy")


def log_columns(logs: dict) -> list[str]:
    """The columns of a row for logs like ``logs``: those of ``GRPO_COLUMNS`` present, or where no reward is logged
    (SFT) of ``SFT_COLUMNS``; then, in logged order, the metrics a registered hf_ext loss logs under its
    metric prefix (``ba/pos_weight``)."""
    headline = GRPO_COLUMNS if "reward" in logs else SFT_COLUMNS
    prefixes = {cls.metric_prefix or cls.name for cls in grpo_losses().values()}
    own = [name for name in logs if "/" in name and name.split("/")[0] in prefixes]
    return [name for name in headline if name in logs] + own


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StepRows(TrainerCallback):
    """Prints each training and evaluation log as one row, on the main process only: first a header of the step and
    the ``log_columns`` of the first log that has any, then per log its step (``<step> eval`` for an evaluation) and
    values, aligned, ``-`` where one is not logged. Written with ``tqdm.write``, so an open progress bar stays whole.
    A log with none of the columns (the Trainer's final ``train_runtime`` one) prints nothing."""

    def __init__(self):
        super().__init__()
        self.columns = None  # set by the first log that has any
        self.step_width = 0

    def _write(self, step: str, cells: list[str]) -> None:
        widths = [max(len(name), 9) for name in self.columns]
        tqdm.write("  ".join([step.ljust(self.step_width), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        evaluation = any(name.startswith("eval_") for name in logs)
        values = {name.removeprefix("eval_"): value for name, value in logs.items()}
        if self.columns is None:
            columns = log_columns(values)
            if not columns:
                return
            self.columns = columns
            self.step_width = len(f"{state.max_steps} eval")
            self._write("step", self.columns)
        if any(name in values for name in self.columns):
            step = f"{state.global_step} eval" if evaluation else str(state.global_step)
            self._write(step, [_cell(values.get(name)) for name in self.columns])


class ProgressBarWithRows(StepRows, ProgressCallback):
    """The Trainer's progress bar, its logs printed as ``StepRows`` rows instead of dicts."""


def print_step_rows(trainer) -> None:
    """Makes ``trainer`` print ``StepRows`` rows instead of log dicts: its ``ProgressCallback`` becomes a
    ``ProgressBarWithRows``, or its ``PrinterCallback`` (``disable_tqdm``) a ``StepRows``; any other display (a
    notebook's) stays."""
    if trainer.pop_callback(ProgressCallback):
        trainer.add_callback(ProgressBarWithRows())
    elif trainer.pop_callback(PrinterCallback):
        trainer.add_callback(StepRows())


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def summary_line(trainer, train_output) -> str:
    """The last line of a run (``train_output``: what ``trainer.train()`` returned): the first and last logged
    training reward (no reward logged: loss; neither: left out), the steps and training time, the output directory
    and the model card that ``save_model`` wrote into it."""
    history = trainer.state.log_history
    metric = "reward" if any("reward" in log for log in history) else "loss"
    values = [log[metric] for log in history if metric in log]
    output_dir = trainer.args.output_dir
    parts = [f"{metric} {values[0]:.4g} -> {values[-1]:.4g}"] if values else []
    parts += [
        f"{trainer.state.global_step} steps in {_duration(train_output.metrics['train_runtime'])}",
        f"output {output_dir}",
        f"model card {os.path.join(output_dir, 'README.md')}",
    ]
    return "done: " + " | ".join(parts)
