"""The contract with the installed accelerate (hf_ext.scripts.accelerate_compat): the launch parser and what it
parses, the default config file, the environment its launcher gives the ranks. Each test names the symbol."""

import inspect

import accelerate.utils.launch as launch_utils

from hf_ext.scripts import accelerate_compat


def test_launch_parser_options_and_parsed_names():
    options = accelerate_compat.launch_option_strings()
    missing = {"--config_file", "--num_processes", "--multi_gpu", "--cpu", "--mixed_precision"} - options
    assert not missing, f"accelerate.commands.launch.launch_command_parser no longer has {sorted(missing)}"
    args = accelerate_compat.launch_command_parser().parse_args(["--cpu", "script.py"])
    for name in (*accelerate_compat.LAUNCH_DEFAULTS, "cpu", "config_file"):
        assert hasattr(args, name), f"accelerate launch's parsed arguments no longer have {name!r}"
    assert callable(accelerate_compat.launch_command), "accelerate.commands.launch.launch_command is gone"
    assert isinstance(accelerate_compat.default_config_file, str), "accelerate.commands.config.default_config_file"


def test_launcher_sets_the_environment_the_ranks_read():
    source = inspect.getsource(launch_utils)
    for variable in ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_CPU"):
        assert f'current_env["{variable}"]' in source, f"accelerate.utils.launch no longer sets {variable}"


def test_deepspeed_config_readings(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "zero2.json")
    assert accelerate_compat.launched_deepspeed_config() == "zero2.json"
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert accelerate_compat.launched_deepspeed_config() is None
    zero = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": "zero2.json"}}
    assert accelerate_compat.file_deepspeed_config(zero) == "zero2.json"
    assert accelerate_compat.file_deepspeed_config({"distributed_type": "FSDP"}) is None
