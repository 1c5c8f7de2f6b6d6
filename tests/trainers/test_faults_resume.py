"""Resume checks what it loads: 4-bit states no step writes (AdamW4bit.load_state_dict), damaged, empty or truncated
optimizer files, an optimizer or optim_args that cannot continue the saved state, and missing optimizer, scheduler
or RNG states (hf_ext.trainers.checkpoints, through SFTTrainer)."""

import copy
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hf_ext.optim import AdamW4bit, AdamW4bitFactor
from hf_ext.optim.adamw4bit import StateDictError
from hf_ext.trainers.checkpoints import RECORD_NAME, record_problems, write_record


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "launched"))
import sft_optim  # noqa: E402


OPTIM = "hf_ext_adamw_4bit"


# ---------------------------------------------------------------- the optimizer's own load checks


def trained_state_dict(cls=AdamW4bit, dtype=torch.float32) -> tuple[list[torch.Tensor], dict]:
    """Params of every layout (rank-1 2-D and 3-D, odd-sized block-wise, fp32) after 3 steps; rows 0-3 of the first
    get zero gradients, so its first m blocks and v rows stay all zero."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 96), (4, 40, 33), (1, 5001), (4501,), (30, 20), (7,)]
    params = [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for shape in shapes]
    optimizer = cls(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        params[0].grad[:4] = 0
        optimizer.step()
    return params, copy.deepcopy(optimizer.state_dict())


def fresh(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def set_item(key, index, value):
    def edit(state_dict, i):
        state_dict["state"][i][key][index] = value

    return edit


def set_codes(key, start, stop, byte):
    def edit(state_dict, i):
        state_dict["state"][i][key][start:stop] = byte

    return edit


def set_high_nibble_of_last_byte(key, code):
    def edit(state_dict, i):
        codes = state_dict["state"][i][key]
        codes[-1] = (codes[-1] & 0x0F) | (code << 4)

    return edit


def double_the_largest(key):
    def edit(state_dict, i):
        stat = state_dict["state"][i][key]
        stat[stat.argmax()] *= 2

    return edit


def saved_min_quantized_numel(value):
    def edit(state_dict, i):
        state_dict["param_groups"][0]["min_quantized_numel"] = value

    return edit


FAULTS = {
    "nan m scale": (0, set_item("exp_avg_absmax", 5, float("nan")), "state['exp_avg_absmax'] holds NaN or Inf"),
    "inf rank-1 statistic": (1, set_item("exp_avg_sq_stat2", 0, float("inf")), "['exp_avg_sq_stat2'] holds NaN"),
    "nan fp32 m": (4, set_item("exp_avg", (0, 0), float("nan")), "state['exp_avg'] holds NaN or Inf"),
    "negative fp32 v": (4, set_item("exp_avg_sq", (0, 0), -1.0), "state['exp_avg_sq'] holds a negative value"),
    "fractional step": (0, set_item("step", (), 2.5), "state['step'] is 2.5, not a whole number >= 1"),
    "m pad nibble": (2, set_high_nibble_of_last_byte("exp_avg_codes", 0), "has pad nibble 0 (the high 4 bits of the"),
    "v pad nibble": (3, set_high_nibble_of_last_byte("exp_avg_sq_codes", 5), "expected the zero code 0"),
    "m codes of an all-zero block": (
        0,
        set_codes("exp_avg_codes", 0, 1, 0x78),
        "has codes other than the zero code 7 in block 0, whose scale is 0 (an all-zero block)",
    ),
    "m codes without +-1": (0, set_codes("exp_avg_codes", 192, 256, 0x77), "has no code 0 or 15 in block 3"),
    "v codes without 1": (3, set_codes("exp_avg_sq_codes", 64, 128, 0x33), "has no code 15 in block 1"),
    "v codes of an all-zero row": (
        0,
        set_codes("exp_avg_sq_codes", 0, 1, 0x11),
        "disagree with exp_avg_sq_stat0[0] = 0.0: index 0 of dimension 0 should hold all 0",
    ),
    "rank-1 statistics of two maxima": (0, double_the_largest("exp_avg_sq_stat1"), "exp_avg_sq_stat0 "),
    "layout against the saved settings": (
        0,
        saved_min_quantized_numel(10_000),
        "has layout m=q4, v=rank1, but the settings it was saved with (quantize=True, min_quantized_numel=10000, "
        "factor_second_moment=False) give this shape m=fp32, v=fp32",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_the_optimizer_refuses_a_state_no_step_writes(fault):
    index, edit, message = FAULTS[fault]
    params, state_dict = trained_state_dict()
    edit(state_dict, index)
    live = fresh(params)
    with pytest.raises(StateDictError, match=re.escape(message)) as refused:
        AdamW4bit(live).load_state_dict(state_dict)
    assert refused.value.param is live[index]
    assert f"parameter {index} (shape {tuple(params[index].shape)})" in str(refused.value)


@pytest.mark.parametrize("cls", [AdamW4bit, AdamW4bitFactor])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_states_that_steps_write_pass_the_checks(cls, dtype):
    params, state_dict = trained_state_dict(cls, dtype)
    cls(fresh(params)).load_state_dict(state_dict)


# ---------------------------------------------------------------- through the Trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(optim, **overrides)``: checkpoint-2 of a 2-step SFT run (sft_optim), made once per arguments."""
    made = {}

    def checkpoint(optim: str = OPTIM, **overrides) -> Path:
        key = (optim, tuple(sorted(overrides.items())))
        if key not in made:
            run = tmp_path_factory.mktemp("saved")
            sft_optim.train(optim, str(run), max_steps=2, save_strategy="steps", save_steps=2, **overrides)
            made[key] = run / "checkpoint-2"
        return made[key]

    return checkpoint


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run" / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def resume(checkpoint: Path, optim: str = OPTIM, **overrides):
    overrides = {"resume_from_checkpoint": str(checkpoint), **overrides}
    return sft_optim.train(optim, str(checkpoint.parent), max_steps=3, **overrides)


def edit_optimizer_state(checkpoint: Path, edit) -> None:
    """Rewrite optimizer.pt with ``edit(state)`` applied to its first rank-1 state whose first m block and first v
    row are not zero, and record the checkpoint again: as if it had been saved so."""
    path = checkpoint / "optimizer.pt"
    state_dict = torch.load(path, weights_only=True)
    rank1 = [state for state in state_dict["state"].values() if "exp_avg_sq_stat0" in state]
    edit(next(state for state in rank1 if min(state["exp_avg_absmax"][0], state["exp_avg_sq_stat0"][0]) > 0))
    torch.save(state_dict, path)
    write_record(str(checkpoint), 2)


def test_a_nan_scale_is_refused_naming_the_file_the_parameter_and_the_tensor(saved, tmp_path):
    """It used to load silently; the next step wrote NaN into the weights and the error blamed the gradient."""
    checkpoint = copy_of(saved(), tmp_path)
    edit_optimizer_state(checkpoint, lambda state: state["exp_avg_absmax"].__setitem__(0, float("nan")))
    where = re.escape(f"resume_from_checkpoint: {checkpoint / 'optimizer.pt'} (parameter 'model.")
    with pytest.raises(ValueError, match=where + r"[\w.]+'\): .* state\['exp_avg_absmax'\] holds NaN or Inf"):
        resume(checkpoint)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("exp_avg_codes", "state['exp_avg_codes'] has no code 0 or 15 in block 0"),
        ("exp_avg_sq_codes", "state['exp_avg_sq_codes'] disagree with exp_avg_sq_stat0[0] = "),
    ],
)
def test_codes_that_disagree_with_their_scales_are_refused(saved, tmp_path, key, message):
    checkpoint = copy_of(saved(), tmp_path)

    def zero_codes(state):  # m: block 0 (128 codes) all DE zero; v: row 0 all code 0, under scales > 0
        stop = 64 if key == "exp_avg_codes" else state["exp_avg_sq_stat1"].numel() // 2
        state[key][:stop] = 0x77 if key == "exp_avg_codes" else 0x00

    edit_optimizer_state(checkpoint, zero_codes)
    with pytest.raises(ValueError, match=re.escape(message)):
        resume(checkpoint)


def test_corrupted_bytes_of_the_optimizer_file_are_refused(saved, tmp_path):
    """One 4-bit m code flipped on disk: the record's sizes still match, the CRC-32 torch.save wrote does not."""
    checkpoint = copy_of(saved(), tmp_path)
    path = checkpoint / "optimizer.pt"
    states = torch.load(path, weights_only=True)["state"].values()
    codes = next(state["exp_avg_codes"] for state in states if "exp_avg_codes" in state)
    data = bytearray(path.read_bytes())
    at = data.find(codes.numpy().tobytes())
    assert at > 0
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    assert record_problems(str(checkpoint)) == []
    damaged = re.escape(f"{path} has a damaged record '") + r"[\w/.]+' \(Bad CRC-32 for file"
    with pytest.raises(ValueError, match=damaged + r".*so the checkpoint cannot be resumed from\. Restore the file"):
        resume(checkpoint)


@pytest.mark.parametrize("cut", ["empty", "truncated"])
def test_an_empty_or_truncated_optimizer_file_is_named_with_its_checkpoint(saved, tmp_path, cut):
    """It used to fail with a bare EOFError or RuntimeError that named no file."""
    checkpoint = copy_of(saved(), tmp_path)
    path = checkpoint / "optimizer.pt"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: 0 if cut == "empty" else size // 2])
    recorded = f"{checkpoint} is incomplete or damaged: optimizer.pt has {path.stat().st_size} bytes, its record says"
    with pytest.raises(ValueError, match=re.escape(f"{recorded} {size}")):
        resume(checkpoint)
    (checkpoint / RECORD_NAME).unlink()  # as another trainer's checkpoint: nothing to compare the size with
    problem = "is empty (0 bytes)" if cut == "empty" else "is truncated or no torch.save file (BadZipFile"
    with pytest.warns(UserWarning, match=f"has no {RECORD_NAME}"):
        with pytest.raises(ValueError, match=re.escape(f"{path} {problem}")):
            resume(checkpoint)


@pytest.mark.parametrize(
    ("saved_optim", "optim", "message"),
    [
        (OPTIM, "adamw_torch", f"saved by optim='{OPTIM}' (4-bit states); this run's optim='adamw_torch' cannot "),
        (OPTIM, "hf_ext_adamw_4bit_factor", "this run's optim='hf_ext_adamw_4bit_factor' cannot continue it. Resume"),
        ("adamw_torch", OPTIM, f"saved by an optimizer not hf_ext's (e.g. adamw_torch); this run's optim='{OPTIM}'"),
    ],
)
def test_an_optimizer_that_cannot_continue_the_saved_state_is_refused_up_front(
    saved, tmp_path, saved_optim, optim, message
):
    """adamw_torch resuming a 4-bit checkpoint used to fail with a bare KeyError: 'exp_avg' inside torch's Adam."""
    checkpoint = copy_of(saved(saved_optim), tmp_path)
    refused_file = re.escape(f"{checkpoint / 'optimizer.pt'}: the optimizer state was ")
    with pytest.raises(ValueError, match=refused_file) as refused:
        resume(checkpoint, optim)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        (
            "min_quantized_numel=1024,block_size=64",
            "saved with block_size=128; this run's optim_args ('min_quantized_numel=1024,block_size=64') give "
            "block_size=64, which the loaded 4-bit states would not follow (they keep the layout they were saved "
            "with). Resume with --optim_args block_size=128,min_quantized_numel=1024,nonfinite_grads=raise, or start",
        ),
        ("min_quantized_numel=2048", "saved with min_quantized_numel=1024; this run's optim_args"),
    ],
)
def test_changed_layout_optim_args_are_refused(saved, tmp_path, optim_args, message):
    """They used to lose silently to the checkpoint's, while recipe.yaml and the card recorded the new ones."""
    checkpoint = copy_of(saved(), tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        resume(checkpoint, optim_args=optim_args)


def test_a_changed_nonfinite_grads_policy_is_in_force_and_recorded(saved, tmp_path):
    checkpoint = copy_of(saved(), tmp_path)
    _, trainer = resume(checkpoint, optim_args="min_quantized_numel=1024,nonfinite_grads=skip")
    assert {group["nonfinite_grads"] for group in trainer.optimizer.param_groups} == {"skip"}
    card = next(method for method in trainer._hf_ext_methods() if method.tag == OPTIM)
    assert card.hyperparameters["nonfinite_grads"] == "skip"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_checkpoint_without_its_optimizer_scheduler_or_rng_state_warns(saved, tmp_path, name):
    """Another trainer's checkpoint (no record) without one of them used to restart it silently."""
    checkpoint = copy_of(saved(), tmp_path)
    (checkpoint / RECORD_NAME).unlink()
    (checkpoint / name).unlink()
    fresh_state = "the random number generators are not restored" if name == "rng_state.pth" else "start fresh"
    with pytest.warns(UserWarning, match=f"has no {RECORD_NAME}"):
        with pytest.warns(UserWarning, match=re.escape(f"{checkpoint} lacks {name}: ") + f".*{fresh_state}"):
            resume(checkpoint)


def test_a_save_only_model_checkpoint_warns_naming_all_it_lacks(saved, tmp_path):
    checkpoint = copy_of(saved(save_only_model=True), tmp_path)
    with pytest.warns(UserWarning, match=re.escape("lacks rng_state.pth, optimizer.pt, scheduler.pt: the random")):
        resume(checkpoint)
