"""Datasets in the forms people have: local data files and save_to_disk folders load; a missing column, too few rows
for one optimizer step and an unreadable file are refused before the model loads, naming what was found."""

import json
import re

import pytest
from datasets import Dataset, DatasetDict
from runs import RECIPE, REPO, hf_ext_command

from hf_ext.embedded import count_dataset, count_sft_dataset
from hf_ext.scripts.common import check_datasets, load_datasets
from hf_ext.scripts.grpo import make_parser as grpo_parser
from hf_ext.scripts.grpo import run as run_grpo
from hf_ext.scripts.sft import make_parser as sft_parser


SFT_RECIPE = REPO / "examples" / "configs" / "sft_allora.yaml"
PROMPTS = ["c d e", "j k l", "p q r", "w x y"]  # grpo_ba: 32 rows per step / 8 generations = 4 prompts


def load_and_check(tmp_path, dataset_name, *flags, sft: bool = False, recipe=None):
    """(train, eval) as `hf-ext grpo` (or `sft`) loads them with its recipe, once `check_datasets` passes them."""
    parser, default_recipe, build = (
        (sft_parser, SFT_RECIPE, count_sft_dataset) if sft else (grpo_parser, RECIPE, count_dataset)
    )
    argv = ["--config", str(recipe or default_recipe), "--dataset_name", str(dataset_name)]
    argv += ["--output_dir", str(tmp_path / "out")]
    script_args, training_args, _, dataset_args = parser().parse_args_and_config([*argv, *flags])
    train, evaluation = load_datasets(script_args, dataset_args, training_args.seed, build)
    check_datasets(train, evaluation, training_args)
    return train, evaluation


def write(tmp_path, form: str, rows: dict) -> str:
    """``rows`` (column -> values) as a data file or save_to_disk folder of ``form``; returns its path."""
    dataset = Dataset.from_dict(rows)
    path = tmp_path / {"saved_dataset": "saved", "saved_dataset_dict": "saved_dict"}.get(form, f"data.{form}")
    if form == "jsonl":
        dataset.to_json(path)
    elif form == "json":  # one JSON array of records
        path.write_text(json.dumps(dataset.to_list()))
    elif form == "csv":
        dataset.to_csv(path, index=False)
    elif form == "parquet":
        dataset.to_parquet(path)
    elif form == "saved_dataset":
        dataset.save_to_disk(path)
    else:
        DatasetDict(train=dataset, test=dataset.select([0])).save_to_disk(path)
    return str(path)


FORMS = ["jsonl", "json", "csv", "parquet", "saved_dataset", "saved_dataset_dict"]


@pytest.mark.parametrize("form", FORMS)
def test_local_files_and_saved_folders_load(tmp_path, form):
    train, evaluation = load_and_check(tmp_path, write(tmp_path, form, {"prompt": PROMPTS}))
    assert train["prompt"] == PROMPTS
    if form == "saved_dataset_dict":
        assert evaluation["prompt"] == PROMPTS[:1]
    else:
        assert evaluation is None


def test_jsonl_file_trains_end_to_end(tmp_path):
    path = write(tmp_path, "jsonl", {"prompt": PROMPTS})
    argv = ["--config", str(RECIPE), "--dataset_name", path, "--reward_funcs", "count_reward", "--max_steps", "1"]
    trainer = run_grpo([*argv, "--output_dir", str(tmp_path / "out")])
    assert trainer.state.global_step == 1
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_empty_or_unreadable_file_is_named(tmp_path):
    """datasets raised a bare StopIteration on an empty file, 'Instruction "train" corresponds to no data' on blank
    lines."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text("")
    for path in tmp_path / "folder" / "train.jsonl", tmp_path / "folder":
        with pytest.raises(ValueError, match=rf"dataset_name='{re.escape(str(path))}' holds an empty data file"):
            load_and_check(tmp_path, path)
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(f"{RECIPE.read_text()}\ndatasets:\n  - path: json\n    data_files: {tmp_path}/folder/*.jsonl\n")
    with pytest.raises(ValueError, match=r"the `datasets:` mixture holds an empty data file"):
        load_and_check(tmp_path, "embedded:count", recipe=mixture)
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.jsonl' \(4 bytes\) could not be read as \.jsonl data \(ValueError"):
        load_and_check(tmp_path, tmp_path / "blank.jsonl")


def test_missing_file_and_unknown_suffix_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset_name='missing\.jsonl': no such file \(relative paths start"):
        load_and_check(tmp_path, "missing.jsonl")
    (tmp_path / "data.txt").write_text("c d e\n")
    with pytest.raises(ValueError, match=r"of a kind hf_ext does not read \(\.txt\); local data files can be \.json"):
        load_and_check(tmp_path, tmp_path / "data.txt")


def test_missing_train_split_lists_the_splits(tmp_path):
    DatasetDict(validation=Dataset.from_dict({"prompt": PROMPTS})).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"has no split 'train' \(dataset_train_split\); its splits: 'validation'\."):
        load_and_check(tmp_path, tmp_path / "saved")


def test_grpo_needs_a_prompt_column(tmp_path):
    path = write(tmp_path, "jsonl", {"question": PROMPTS, "answer": PROMPTS})
    with pytest.raises(
        ValueError, match=r"train dataset has no column 'prompt', .*columns found: 'question', 'answer'"
    ):
        load_and_check(tmp_path, path)


SFT_FORMS = {
    "text": {"text": PROMPTS},
    "messages": {"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": p}] for p in PROMPTS]},
    "prompt_completion": {"prompt": PROMPTS, "completion": PROMPTS},
    "input_ids": {"input_ids": [[1, 2, 3]] * 4},
}


@pytest.mark.parametrize("form", SFT_FORMS)
def test_sft_accepts_trl_forms(tmp_path, form):
    train, _ = load_and_check(tmp_path, write(tmp_path, "jsonl", SFT_FORMS[form]), sft=True)
    assert len(train) == 4


def test_sft_names_the_columns_it_reads(tmp_path):
    path = write(tmp_path, "jsonl", {"prompt": PROMPTS, "body": PROMPTS})
    wanted = "'messages' or 'conversations' or 'text' or 'prompt' \\+ 'completion' or 'input_ids'"
    with pytest.raises(ValueError, match=rf"no column {wanted}, .*columns found: 'prompt', 'body'"):
        load_and_check(tmp_path, path, sft=True)
    train, _ = load_and_check(tmp_path, path, "--dataset_text_field", "body", sft=True)
    assert train.column_names == ["prompt", "body"]


@pytest.mark.parametrize(("flags", "needed"), [([], 4), (["--gradient_accumulation_steps", "2"], 8)])
def test_grpo_needs_one_generation_batch_of_prompts(tmp_path, flags, needed):
    few = write(tmp_path, "jsonl", {"prompt": (PROMPTS * 2)[: needed - 1]})
    with pytest.raises(ValueError, match=rf"has {needed - 1} rows, fewer than the {needed} of one optimizer step"):
        load_and_check(tmp_path, few, *flags)
    enough = write(tmp_path, "parquet", {"prompt": (PROMPTS * 2)[:needed]})
    assert len(load_and_check(tmp_path, enough, *flags)[0]) == needed


def test_empty_saved_splits_are_refused(tmp_path):
    empty = Dataset.from_dict({"prompt": PROMPTS}).filter(lambda row: False)  # one data file of 0 rows
    DatasetDict(train=empty).save_to_disk(tmp_path / "empty_train")
    with pytest.raises(ValueError, match=r"train dataset has 0 rows, fewer than the 4 of one optimizer step"):
        load_and_check(tmp_path, tmp_path / "empty_train")
    DatasetDict(train=Dataset.from_dict({"prompt": PROMPTS}), test=empty).save_to_disk(tmp_path / "empty_test")
    with pytest.raises(ValueError, match=r"eval dataset has 0 rows, with eval_strategy='steps'"):
        load_and_check(tmp_path, tmp_path / "empty_test", "--eval_strategy", "steps", "--eval_steps", "1")
    DatasetDict(train=Dataset.from_dict({"prompt": []})).save_to_disk(tmp_path / "no_data_file")
    with pytest.raises(ValueError, match=r"is a save_to_disk folder with a split saved from 0 rows"):
        load_and_check(tmp_path, tmp_path / "no_data_file")


CLI_FAULTS = {  # saved DatasetDicts and folders of data files loaded before; these then failed late or trained 0 steps
    "grpo_without_prompt": ("grpo", {"question": PROMPTS}, "train dataset has no column 'prompt'"),
    "grpo_too_few_prompts": ("grpo", {"prompt": PROMPTS[:3]}, "has 3 rows, fewer than the 4 of one optimizer step"),
    "grpo_empty_file": ("grpo", None, "holds an empty data file (datasets' reader raised StopIteration on it)"),
    "sft_without_text": ("sft", {"question": PROMPTS}, "train dataset has no column 'messages' or"),
}


@pytest.mark.parametrize("case", CLI_FAULTS)
def test_cli_refuses_dataset_before_loading_weights(tmp_path, case):
    command, rows, message = CLI_FAULTS[case]
    if rows is None:
        path = tmp_path / "folder"
        path.mkdir()
        (path / "train.jsonl").write_text("")
    else:
        path = write(tmp_path, "saved_dataset_dict", rows)
    recipe = RECIPE if command == "grpo" else SFT_RECIPE
    reward = ["--reward_funcs", "count_reward"] if command == "grpo" else []
    out = tmp_path / "out"
    result = hf_ext_command(
        command, "--config", str(recipe), "--dataset_name", str(path), *reward, "--output_dir", str(out)
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert "Loading weights" not in result.stderr
    assert not (out / "model.safetensors").exists()
