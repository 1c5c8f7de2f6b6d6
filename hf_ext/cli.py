"""`hf-ext`: the command line, in TRL's shape.

    hf-ext grpo --config examples/configs/grpo_ba.yaml [--any_field value] [--accelerate_config multi_gpu]
    hf-ext grpo --config your-name/hf-ext-recipes:grpo_ba.yaml     (a Hub reference: see hf_ext.hub.configs)
    hf-ext compare-losses --seeds 0 1 2 --max_steps 300
    hf-ext push-config examples/configs your-name/hf-ext-recipes
    hf-ext env

Training commands parse the recipe first (so a bad field fails before anything launches), then hand the script to
`accelerate launch`; YAML keys and flags that are no training field (`num_processes: 2`, `--multi_gpu`...) go to
accelerate, as with `trl grpo`. An output_dir holding an earlier run's model or checkpoints is refused unless the run
resumes or `--overwrite_output_dir true` is given; SIGINT or SIGTERM to `hf-ext` stops every process of the run before
it exits (130, 143), and the run's processes end themselves if `hf-ext` is killed.
"""

import argparse
import importlib
import os
import platform
import sys
from importlib.resources import files
from pathlib import Path


TRAINING_COMMANDS = {
    "grpo": "Train with GRPO (hf_ext loss types included), through accelerate launch.",
    "sft": "Supervised fine-tuning (ALLoRA included), through accelerate launch.",
}


def _without(args: list[str], removed: list[str]) -> list[str]:
    """`args` with the ordered subsequence `removed` taken out."""
    pending = iter(removed)
    current = next(pending, None)
    kept = []
    for arg in args:
        if arg == current:
            current = next(pending, None)
        else:
            kept.append(arg)
    return kept


def resolve_accelerate_config(name_or_path: str) -> str:
    """An accelerate config file: a path as is; a name: hf_ext's packaged recipe, else TRL's; else an error."""
    if Path(name_or_path).is_file():
        return name_or_path
    packaged = {package: files(package) for package in ("hf_ext.accelerate_configs", "trl.accelerate_configs")}
    for recipes in packaged.values():
        if recipes.joinpath(f"{name_or_path}.yaml").is_file():
            return str(recipes.joinpath(f"{name_or_path}.yaml"))
    names = {
        package: ", ".join(sorted(p.name.removesuffix(".yaml") for p in recipes.iterdir() if p.name.endswith(".yaml")))
        for package, recipes in packaged.items()
    }
    raise ValueError(
        f"--accelerate_config {name_or_path!r} is neither a file nor a packaged config. hf_ext's: "
        f"{names['hf_ext.accelerate_configs']}; TRL's: {names['trl.accelerate_configs']}. Pass one of these names "
        "or the path of an accelerate config file."
    )


def accelerate_launch_args(launch_args: list[str], training_args, model_args) -> list[str]:
    """`launch_args` with `--accelerate_config NAME|PATH` as `--config_file FILE`, once the recipe passed
    `check_composition` against that file; a file's `use_cpu: true` is exported to the ranks as ACCELERATE_USE_CPU
    (accelerate's multi-GPU launcher, which two CPU ranks need, does not forward it)."""
    import yaml

    from hf_ext.scripts.accelerate_compat import export_use_cpu, file_deepspeed_config
    from hf_ext.scripts.common import check_composition

    if "--accelerate_config" in launch_args:
        index = launch_args.index("--accelerate_config")
        if index + 1 == len(launch_args):
            raise ValueError("--accelerate_config needs a value: a packaged config name or a file path.")
        config_file = resolve_accelerate_config(launch_args[index + 1])
        launch_args = ["--config_file", config_file, *launch_args[:index], *launch_args[index + 2 :]]
    config = {}
    if "--config_file" in launch_args:
        with open(launch_args[launch_args.index("--config_file") + 1]) as handle:
            config = yaml.safe_load(handle) or {}
    check_composition(training_args, model_args, file_deepspeed_config(config))
    if config.get("use_cpu"):
        export_use_cpu()
    return launch_args


def with_launch_defaults(args):
    """accelerate launch's parsed ``args``, where no accelerate config applies (no ``--config_file``, and no default
    config file from ``accelerate config``, which ``--cpu`` ignores), with the values that accelerate would default
    to and warn about filled in where not given: one process per accelerator device (at least one), one machine, no
    mixed precision (the Trainer applies the training arguments' own), no dynamo."""
    import torch

    from hf_ext.scripts.accelerate_compat import LAUNCH_DEFAULTS, default_config_file

    if args.config_file is not None or (os.path.isfile(default_config_file) and not args.cpu):
        return args
    values = (max(torch.accelerator.device_count(), 1), 1, "no", "no")
    for name, value in zip(LAUNCH_DEFAULTS, values, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def launch_training(command: str, argv: list[str]) -> int:
    """Parses and checks the recipe (fields, composition, whether ``output_dir`` may be written), then runs the
    script under ``accelerate launch`` until it ends; returns 0. SIGINT or SIGTERM stops every process of the run
    first, then exits with 130 or 143 (``hf_ext.scripts.lifetime``); the ranks end themselves if this process dies
    otherwise (SIGKILL)."""
    from hf_ext.scripts.quiet import muted_import_notices

    with muted_import_notices():  # the HF stack's first import in this process
        from hf_ext.scripts.accelerate_compat import launch_command, launch_command_parser
        from hf_ext.scripts.common import parse_recipe
        from hf_ext.scripts.lifetime import launched_run
        from hf_ext.scripts.overwrite import refuse_overwrite

        script = importlib.import_module(f"hf_ext.scripts.{command}")
    # A Hub reference in --config becomes a cached local file here, once, before launching.
    argv, configs, config_rest, cli_rest = parse_recipe(script.make_parser(prog=f"hf-ext {command}"), argv)
    _, training_args, model_args, _ = configs
    launch_args = accelerate_launch_args(config_rest + cli_rest, training_args, model_args)
    refuse_overwrite(training_args)
    script_path = str(files("hf_ext.scripts").joinpath(f"{command}.py"))
    args = launch_command_parser().parse_args([*launch_args, script_path, *_without(argv, cli_rest)])
    with launched_run():
        launch_command(with_launch_defaults(args))
    return 0


def print_env() -> int:
    import torch

    from hf_ext.versions import installed_versions

    print(f"platform: {platform.platform()}\npython: {platform.python_version()}")
    for name, found in installed_versions().items():
        print(f"{name}: {found or 'not installed'}")
    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-ext", description="hf_ext training methods for the HF stack.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in TRAINING_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    commands.add_parser(
        "compare-losses", help="Train the embedded default once per GRPO loss type; table + plot.", add_help=False
    )
    push = commands.add_parser(
        "push-config",
        help="Upload a folder of recipes to a Hub repo; then --config REPO_ID:PATH finds them.",
        description="Upload the *.yaml recipes (and *.md notes) of FOLDER to the Hub repo REPO_ID, creating it if "
        "needed. Every hf-ext training command then takes --config REPO_ID:PATH (cached, offline once cached).",
    )
    push.add_argument("folder", help="Local folder of recipes, e.g. examples/configs.")
    push.add_argument("repo_id", help="Hub repo, e.g. your-name/hf-ext-recipes.")
    push.add_argument("--repo_type", default="model", choices=["model", "dataset", "space"])
    push.add_argument("--path_in_repo", default=None, help="Folder inside the repo (default: its root).")
    push.add_argument("--revision", default=None, help="Branch to commit to (default: main).")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument(
        "--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`)."
    )
    commands.add_parser("env", help="Print versions and devices, for bug reports.")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command in TRAINING_COMMANDS:
        return launch_training(command, rest)
    if command == "compare-losses":
        from hf_ext.scripts.compare_losses import main as compare_losses

        compare_losses(rest)
        return 0
    args = parser.parse_args(argv)  # "push-config", "env", or an error listing the valid commands
    if args.command == "push-config":
        from hf_ext.hub.publish import push_config

        commit = push_config(
            args.folder,
            args.repo_id,
            repo_type=args.repo_type,
            path_in_repo=args.path_in_repo,
            revision=args.revision,
            private=args.private or None,
            token=args.token,
        )
        print(f"pushed {args.folder} to {commit.commit_url}")
        return 0
    return print_env()


if __name__ == "__main__":
    raise SystemExit(main())
