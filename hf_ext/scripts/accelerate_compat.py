"""Every part of accelerate that hf_ext's scripts use beyond its documented API, behind this one door;
``tests/scripts/test_accelerate_compat.py`` is the contract test that names the symbol when an upgrade changes one.

- ``accelerate.commands.launch.launch_command_parser`` / ``launch_command``: ``hf-ext`` hands a script to
  ``accelerate launch`` as its own command does, and reads the parser's option strings (argparse's private
  ``_actions``) to tell accelerate's options from typos; the parsed arguments it fills in are ``LAUNCH_DEFAULTS``'
  names, ``cpu`` and ``config_file``.
- ``accelerate.commands.config.default_config_file``: the file ``accelerate config`` writes, which a launch without
  ``--config_file`` reads.
- The environment accelerate's launcher gives each rank (``accelerate.utils.launch``):
  ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` for DeepSpeed, ``ACCELERATE_USE_CPU``, which its
  multi-GPU launcher does not set from a config file's ``use_cpu`` (hf-ext exports it for CPU ranks).
- The keys of an accelerate config file: ``deepspeed_config.deepspeed_config_file``, ``use_cpu``.
"""

import os

from accelerate.commands.config import default_config_file
from accelerate.commands.launch import launch_command, launch_command_parser


__all__ = [
    "default_config_file",
    "export_use_cpu",
    "file_deepspeed_config",
    "launch_command",
    "launch_command_parser",
    "launch_option_strings",
    "launched_deepspeed_config",
]

LAUNCH_DEFAULTS = ("num_processes", "num_machines", "mixed_precision", "dynamo_backend")


def launch_option_strings() -> set[str]:
    """Every option string ``accelerate launch`` accepts (``--num_processes``, ``--multi_gpu``, ...)."""
    return {option for action in launch_command_parser()._actions for option in action.option_strings}


def launched_deepspeed_config() -> str | None:
    """The DeepSpeed config file that accelerate's launcher passed this rank, or None."""
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")


def file_deepspeed_config(config: dict) -> str | None:
    """The DeepSpeed config file that the accelerate config file ``config`` names, or None."""
    return (config.get("deepspeed_config") or {}).get("deepspeed_config_file")


def export_use_cpu() -> None:
    """Makes the ranks this process launches run on CPU, as a config file's ``use_cpu: true`` means."""
    os.environ["ACCELERATE_USE_CPU"] = "true"
