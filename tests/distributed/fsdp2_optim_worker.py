"""Worker of tests/distributed/test_fsdp2_optim.py: the 4-bit optimizers on FSDP2 (``fully_shard``) parameters.

Modes (first argument):
- ``same-grads``: every parameter shape the optimizer treats differently, fully_shard-ed, fed the gradients a plain
  copy on the same rank gets (elementwise in p, so equal on every mesh); a checkpoint is written at step K (DCP,
  and the full state dict by ``get_optimizer_state_dict``); runs resuming from ``--resume DIR`` continue from K.
- ``train``: an MLP with ``fully_shard`` per layer and at the root, trained on this rank's half of a fixed batch,
  against a plain copy trained on the whole batch in the same process; several optimizers, fp32 and bf16.
"""

import argparse
import copy
import warnings

import torch
import torch.distributed.checkpoint as dcp
from launch import finish, init
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_ext.optim import AdamW4bit, AdamW4bitFactor, sharded
from hf_ext.optim.adamw4bit import state_nbytes


# name -> shape: the layouts and splits a parameter can take (world size 2)
SHAPES = {
    "uneven": (75, 256),  # rank-1 v, 38 and 37 rows
    "cube": (6, 64, 128),  # rank-1 v of 3 dims (the twin), dim 0's statistic sharded
    "first_singleton": (1, 64, 128),  # rank-1 v, every statistic replicated, rank 1's shard empty
    "one_row": (1, 8192),  # block-wise v, rows are whole blocks: rank 1's shard empty
    "odd_rows": (40, 150),  # rows are not whole blocks: replicated state
    "flat": (4608,),  # 1-D, block-wise: replicated state
    "small": (3, 5),  # fp32 states
    "scalar_like": (1,),  # fewer elements than ranks
}
STEPS, CHECKPOINT_AT = 6, 3
OPTIMIZERS = {"AdamW4bit": AdamW4bit, "AdamW4bitFactor": AdamW4bitFactor}


class Params(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        for name, shape in SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)))


def same_grads(model: Params, step: int) -> None:
    """g = noise(step) + 0.5 p, the noise drawn whole on every rank: a shard gets its rows of the whole gradient."""
    for index, p in enumerate(model.parameters()):
        noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + index))
        if isinstance(p, DTensor):
            shards = sharded.shards_of(p, "test")
            grad = (shards.rows_of(noise) + 0.5 * p.to_local().float()).to(p.dtype)
            p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            p.grad = (noise + 0.5 * p.detach().float()).to(p.dtype)


def build(cls, dtype, shard: bool):
    model = Params(dtype)
    if shard:
        fully_shard(model)
    return model, cls(model.parameters(), lr=1e-2, min_quantized_numel=64)


def whole(model) -> dict:
    return {name: sharded.full(p.detach()).clone() for name, p in model.named_parameters()}


def run_same_grads(world: int, out, resume: str | None) -> dict:
    result = {}
    for name, cls in OPTIMIZERS.items():
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{name}/{str(dtype)[6:]}"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model, opt = build(cls, dtype, shard=world > 1)
                first = CHECKPOINT_AT if resume else 0
                if resume:
                    _load(model, opt, f"{resume}/{key}")
                for step in range(first, STEPS):
                    same_grads(model, step)
                    opt.step()
                    if step + 1 == CHECKPOINT_AT and not resume:
                        _save(model, opt, f"{out}/{key}")
            result[key] = {
                "params": whole(model),
                "state_types": {k: type(v).__name__ for k, v in opt.state[model.uneven].items()},
                "warnings": [str(w.message) for w in caught if "kept whole on every rank" in str(w.message)],
            }
            if resume:  # control: the same model from the checkpoint with a fresh optimizer
                model, opt = build(cls, dtype, shard=world > 1)
                _load(model, opt, f"{resume}/{key}", optimizer=False)
                for step in range(CHECKPOINT_AT, STEPS):
                    same_grads(model, step)
                    opt.step()
                result[key]["fresh_optimizer"] = whole(model)
            if world > 1:  # the plain copy on this rank, from the same gradients
                plain, plain_opt = build(cls, dtype, shard=False)
                for step in range(STEPS):
                    same_grads(plain, step)
                    plain_opt.step()
                result[key]["plain"] = whole(plain)
    return result


def _save(model, opt, path: str) -> None:
    """A distributed checkpoint of model and optimizer, and the full (gathered) state dicts, as accelerate writes
    for SHARDED_STATE_DICT and FULL_STATE_DICT."""
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/dcp")
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() == 0:
        torch.save({"model": model_sd, "optim": optim_sd}, f"{path}/full.pt")


def _load(model, opt, path: str, optimizer: bool = True) -> None:
    """fp32 runs resume from the distributed checkpoint, bf16 runs from the full state dicts; ``optimizer=False``
    loads the model only (DCP fills a template in place, so the optimizer is left out of it)."""
    if "float32" in path:
        model_sd, optim_sd = get_state_dict(model, opt) if optimizer else (get_model_state_dict(model), None)
        saved = {"model": model_sd, "optim": optim_sd} if optimizer else {"model": model_sd}
        dcp.load(saved, checkpoint_id=f"{path}/dcp")
        options = StateDictOptions()
    else:
        saved = torch.load(f"{path}/full.pt", weights_only=True)
        options = StateDictOptions(full_state_dict=True)
    if optimizer:
        set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"], options=options)
    else:
        set_model_state_dict(model, saved["model"], options=options)


def run_train(rank: int, world: int, torchao: bool) -> dict:
    """Per-layer fully_shard MLP vs a plain copy on the whole batch: distances and per-rank state bytes. With
    ``--torchao``, torchao's AdamW4bit instead (a comparison for the record, not in the suite). Launch it with
    ``TORCHDYNAMO_DISABLE=1``: its compiled step fails on DTensor states on CPU (torch 2.13, torchao 0.18:
    ``aten.view.dtype`` not implemented by its 4-bit state subclass), its eager one runs, on fp32 parameters only
    (with bf16 ones its ``lerp`` meets fp32 states and fails)."""
    makers = {
        "AdamW4bit": lambda ps: AdamW4bit(ps, lr=1e-2),
        "AdamW4bitFactor": lambda ps: AdamW4bitFactor(ps, lr=1e-2),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    }
    if torchao:
        from torchao.optim import AdamW4bit as TorchaoAdamW4bit

        makers = {"torchao AdamW4bit": lambda ps: TorchaoAdamW4bit(ps, lr=1e-2)}
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 256, generator=gen), torch.randn(64, 1024, generator=gen)
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    result = {}
    for dtype in (torch.float32,) if torchao else (torch.float32, torch.bfloat16):
        for name, make in makers.items():
            torch.manual_seed(3)
            plain = torch.nn.Sequential(
                torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024), torch.nn.Tanh(),
                torch.nn.Linear(1024, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024),
            ).to(dtype)  # fmt: skip
            start = {k: v.detach().clone() for k, v in plain.state_dict().items()}
            model = copy.deepcopy(plain)
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
            opt, plain_opt = make(model.parameters()), make(plain.parameters())
            for _ in range(4):
                torch.nn.functional.mse_loss(model(x[rows].to(dtype)), y[rows].to(dtype)).backward()
                opt.step()
                opt.zero_grad()
                torch.nn.functional.mse_loss(plain(x.to(dtype)), y.to(dtype)).backward()
                plain_opt.step()
                plain_opt.zero_grad()
            got = torch.cat([sharded.full(p.detach()).float().flatten() for p in model.parameters()])
            want = torch.cat([p.detach().float().flatten() for p in plain.parameters()])
            moved = want - torch.cat([v.float().flatten() for v in start.values()])
            result[f"{name}/{str(dtype)[6:]}"] = {
                "distance": ((got - want).norm() / want.norm()).item(),
                "distance_to_update": ((got - want).norm() / moved.norm()).item(),
                "max_abs": (got - want).abs().max().item(),
                "bytes_rank": state_nbytes(opt),
                "bytes_plain": state_nbytes(plain_opt),
            }
    return result


def main() -> None:
    rank, world, out, args = init()
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("same-grads", "train"))
    parser.add_argument("--resume")
    parser.add_argument("--torchao", action="store_true")
    opts = parser.parse_args(args)
    if opts.mode == "same-grads":
        result = run_same_grads(world, out, opts.resume)
    else:
        result = run_train(rank, world, opts.torchao)
    finish(out, result)


if __name__ == "__main__":
    main()
