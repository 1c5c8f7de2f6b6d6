"""Library notices that a user of hf_ext's scripts cannot act on, muted only while hf_ext's own calls that emit them
run; errors, and every other warning and log record, show as usual.

- ``muted_import_notices``, around the HF stack's imports: the warnings that optional backends log when imported,
  which they are whether or not a run uses them (bitsandbytes' missing ``kernels`` package for its CPU 4-bit
  kernels; torchao's optional C extensions failing to load, and torch's deprecation of how torchao registers its
  enums).
- ``muted_library_notices``, around building and training a trainer: Transformers' FutureWarning each time TRL or
  PEFT reads the deprecated ``is_gradient_checkpointing`` (hf_ext does not read it), and, where DeepSpeed is
  installed, its notice that it found no GPU and uses its CPU accelerator (logged to stdout at its first import,
  which accelerate makes while the trainer is built, DeepSpeed run or not).

This module imports nothing heavy, so that the scripts can enter ``muted_import_notices`` before their imports.
"""

import logging
import warnings
from contextlib import contextmanager


IMPORT_NOTICE_LOGGERS = ("bitsandbytes.backends.cpu.ops", "torchao", "torch.utils._pytree")


@contextmanager
def muted_import_notices():
    """Sets the ``IMPORT_NOTICE_LOGGERS`` to ERROR while the block runs (their warnings, and those of their children
    without a level of their own, are dropped), then restores their levels."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOTICE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def muted_library_notices():
    """Ignores the ``is_gradient_checkpointing`` FutureWarning and drops DeepSpeed's CPU-accelerator notice while the
    block runs (a filter on the ``DeepSpeed`` logger, which DeepSpeed's import reconfigures but keeps); the warning
    filters and the logger are restored after."""
    deepspeed_logger = logging.getLogger("DeepSpeed")
    no_gpu_notice = _DropPrefix("Setting accelerator to CPU.")
    deepspeed_logger.addFilter(no_gpu_notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            yield
    finally:
        deepspeed_logger.removeFilter(no_gpu_notice)
