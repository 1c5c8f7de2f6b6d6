"""Worker of tests/distributed/test_deepspeed_optim.py: the 4-bit optimizers as DeepSpeed ZeRO-2 client optimizers.

ZeRO-2 hands the client optimizer one flat 1-D fp32 partition per rank (of the whole model's parameters, bf16 or
fp32), so the 4-bit state is block-wise and each rank holds the state of its partition only. The MLP has no biases,
so that its element count is a multiple of 2 x 128 and rank 1's partition starts on a 128-element block boundary:
2 ranks then form the same blocks as 1 process.

Modes (first argument):
- ``train``: an MLP trained on this rank's share of a fixed batch for ``STEPS`` steps by a ZeRO-2 engine, for each
  optimizer and dtype, writing an engine checkpoint at step ``CHECKPOINT_AT`` under ``--dir``; returns the final
  parameters and this rank's optimizer state bytes.
- ``resume``: loads those checkpoints (written at any world size) and continues to ``STEPS``.
"""

import argparse
import logging

import deepspeed
import deepspeed.ops
import torch
from launch import finish, init

from hf_ext.optim import AdamW4bit, AdamW4bitFactor
from hf_ext.optim.adamw4bit import state_nbytes


STEPS, CHECKPOINT_AT, BATCH = 4, 2, 16
OPTIMIZERS = {"AdamW4bit": AdamW4bit, "AdamW4bitFactor": AdamW4bitFactor, "AdamW": torch.optim.AdamW}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(512, 256, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(256, 64, bias=False),
    )


def engine_for(name: str, dtype: str, world: int):
    model = mlp()
    optimizer = OPTIMIZERS[name](model.parameters(), lr=1e-2, weight_decay=0.01)
    config = {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


def train(engine, rank: int, world: int, steps: range) -> None:
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(BATCH, 256, generator=gen), torch.randn(BATCH, 64, generator=gen)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in steps:
        out = engine(x[share].to(engine.module[0].weight.dtype))
        loss = torch.nn.functional.mse_loss(out.float(), y[share])
        engine.backward(loss)
        engine.step()


def main() -> None:
    # DeepSpeed would JIT-compile its shared-memory all-reduce (an inference op) at init: gloo serves training
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank, world, out, rest = init()
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "resume"])
    parser.add_argument("--dir", required=True)
    args = parser.parse_args(rest)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    result = {}
    for name in OPTIMIZERS:
        for dtype in DTYPES:
            key = f"{name}/{dtype}"
            engine, optimizer = engine_for(name, dtype, world)
            tag = key.replace("/", "_")
            if args.mode == "resume":
                engine.load_checkpoint(args.dir, tag=tag)
            else:
                train(engine, rank, world, range(CHECKPOINT_AT))
                engine.save_checkpoint(args.dir, tag=tag)
            train(engine, rank, world, range(CHECKPOINT_AT, STEPS))
            result[key] = {
                "params": [p.detach().float().clone() for p in engine.module.parameters()],
                "bytes_rank": state_nbytes(optimizer),
            }
    finish(out, result)


if __name__ == "__main__":
    main()
