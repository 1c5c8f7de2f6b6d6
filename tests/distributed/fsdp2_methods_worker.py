"""Every hf_ext training method under FSDP2, sharded as accelerate's FSDP2 TRANSFORMER_BASED_WRAP does it:
``fully_shard`` on each decoder layer, then on the root (the PeftModel), on a 1-D mesh over all ranks (1 rank
included, so the same code runs). Run by ``test_fsdp2_methods.py`` through ``launch.run_ranks`` once per world size.

Each scenario trains a tiny Qwen2 with adapters on all linear projections for ``STEPS`` optimizer steps on a fixed
global batch, every rank taking its contiguous slice of it (TRL's process-major layout):

- ``dora``: fast DoRA (``enable_fast_dora``), causal-LM loss, AdamW. On every forward it checks the norm
  n = ||W + s B A|| each fast DoRA layer uses (and its cached ``||W||^2``) against the full base weight kept before
  sharding, and counts how often ``||W||^2`` is recomputed. Then the probe loads 1.5 W into the shards with
  ``set_model_state_dict`` after a forward has filled the cache (as resuming a sharded model from a full
  checkpoint does) and checks the next forward's norms, and its logits against those after
  ``clear_weight_sq_cache``.
- ``allora``: ALLoRA (``enable_allora``), causal-LM loss, SGD.
- ``ba``, ``real``, ``real_bce``, ``gtpo``: hf_ext's GRPO losses on fixed rollouts (prompt + completion ids, fixed
  advantages), plain LoRA. A ``GRPOTrainer`` per loss is built but never trained (TRL's Trainer cannot run FSDP2
  on CPU); per step the loss object's ``prepare`` runs on this rank's rows (it gathers what it needs over ranks, as
  at generation time), then ``trainer._compute_loss(sharded_model, rows)``, backward, optimizer step. Groups of 4
  over 12 rows: with 2 ranks the middle group straddles the ranks (these losses are exact under any layout).
- ``real_offpolicy``: ``real`` with ``num_iterations=3`` (the paper's recipe): old log-probs taken once, then 3
  steps on the same rollouts, so the group log-sum-exp is evaluated at scores != 0; it needs whole groups per rank
  (``whole_groups``), so 16 rows, 2 whole groups per rank, folded as the trainer folds them.

Rank r saves, per scenario, the full (all-gathered) trainable parameters before and after, the full gradients of
the first step, the global mean loss per step, and the sharding it saw.
"""

import math
import tempfile

import torch
import torch.distributed as dist
from launch import finish, init
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh
from trl.trainer.utils import add_fused_lm_head

import hf_ext.peft.dora as dora
from hf_ext import GRPOConfig, GRPOTrainer
from hf_ext.embedded import build_tiny_model, count_dataset, count_reward, materialize_model
from hf_ext.peft import FastDoraLinear, enable_allora, enable_fast_dora
from hf_ext.trainers.grpo import fold_groups


STEPS = 3
PROMPT_LEN, WIDTH = 3, 8  # rollout prompt and completion widths
NUM_GENERATIONS = 4
LM_ROWS, LM_LEN = 8, 12  # the causal-LM batch of the adapter scenarios
PAD_ID, FIRST_LETTER, VOCAB = 0, 3, 35  # the embedded tokenizer: pad, eos, "Ġ", then 32 letter tokens
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shard(model, mesh):
    """accelerate's FSDP2 auto-wrap: each ``_no_split_modules`` block (Qwen2DecoderLayer), then the root."""
    layers = model.base_model.model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return sum(isinstance(m, FSDPModule) for m in model.modules())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it in the same order)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def global_mean(value: torch.Tensor, world: int) -> float:
    total = value.detach().double().clone()
    dist.all_reduce(total)
    return total.item() / world


def peft_model(config: LoraConfig, trainer=None):
    """The tiny Qwen2 with ``config``'s adapters; given a GRPO ``trainer``, with the fused LM head it patches into
    its own model's base (the forward its loss calls), added before PEFT wraps the model, as TRL does."""
    base = build_tiny_model()
    if trainer is not None:
        add_fused_lm_head(
            base,
            temperature=trainer.temperature,
            cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32,
            outputs=("log_probs", "entropy"),
        )
    torch.manual_seed(1)  # the adapters' initialisation, the same on every rank and world size
    return get_peft_model(base, config).train()


def sharding_info(model, num_fsdp_modules: int) -> dict:
    """What FSDP2 did: how many modules it wraps, and the local vs full size of one trainable parameter."""
    name, param = next(iter(trainable(model).items()))
    return {
        "fsdp_modules": num_fsdp_modules,
        "probe_param": name,
        "local_numel": param.to_local().numel() if isinstance(param, DTensor) else -1,
        "full_numel": param.numel(),
    }


def train(model, optimizer, step_loss, world: int, after_forward=None) -> dict:
    """``STEPS`` optimizer steps of ``step_loss(step)``; the result the test compares."""
    params = trainable(model)
    result = {"initial": {n: full(p) for n, p in params.items()}, "losses": []}
    for step in range(STEPS):
        loss = step_loss(step)
        if after_forward is not None:
            after_forward(step)
        result["losses"].append(global_mean(loss, world))
        loss.backward()
        if step == 0:
            result["grads"] = {n: full(p.grad) if p.grad is not None else None for n, p in params.items()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result["final"] = {n: full(p) for n, p in params.items()}
    return result


def lm_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randint(FIRST_LETTER, VOCAB, (LM_ROWS, LM_LEN), generator=generator)


def lm_scenario(model, optimizer, rank: int, world: int, num_fsdp: int, after_forward=None) -> dict:
    per_rank = LM_ROWS // world
    rows = lm_batch()[rank * per_rank : (rank + 1) * per_rank]  # no padding: equal token counts per rank

    def step_loss(step):
        return model(input_ids=rows, labels=rows).loss

    result = train(model, optimizer, step_loss, world, after_forward)
    result["sharding"] = sharding_info(model, num_fsdp)
    return result


def dora_scenario(mesh, rank: int, world: int) -> dict:
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=True, init_lora_weights=False
    )
    model = peft_model(enable_fast_dora(config))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FastDoraLinear)}
    names = {id(m): name for name, m in layers.items()}
    assert len(layers) == 7 * 2, sorted(layers)
    base_weights = {name: m.get_base_layer().weight.detach().double().clone() for name, m in layers.items()}
    num_fsdp = shard(model, mesh)

    # Instrumentation, undone at the end: ``_weight_norm`` is what the forward takes n = ||W + s B A|| from (with
    # the cached ||W||^2 inside); ``weight_sq_norms`` is the ||W||^2 pass the cache saves.
    cache = {"calls": [], "recomputed": [], "norm_error": [], "cache_error": [], "data_ptrs": [], "versions": []}
    seen, recomputed, base_scale = {}, [], [1.0]
    weight_norm, weight_sq_norms = dora._weight_norm, dora.weight_sq_norms

    def checked_weight_norm(module, adapter, weight):
        """n as the forward uses it, against n from the full base weight kept before sharding (times the probe's
        scale) and the current A, B (unsharded during the forward)."""
        norm = weight_norm(module, adapter, weight)
        name = names[id(module)]
        w = base_scale[0] * base_weights[name]
        a, b = (module.lora_A[adapter].weight.double(), module.lora_B[adapter].weight.double())
        want = (w + module.scaling[adapter] * b @ a).norm(dim=1)
        entry = module.__dict__.get(dora._CACHE_ATTR)
        cached = entry[1].double() if entry is not None else None
        seen[name] = (
            ((norm.double() - want).abs().max() / want.abs().max()).item(),
            math.nan if cached is None else ((cached - w.pow(2).sum(1)).abs().max() / w.pow(2).sum(1).max()).item(),
            None if entry is None else entry[0][:2],
        )
        return norm

    def counting_weight_sq_norms(weight, fan_in_fan_out=False):
        recomputed.append(1)
        return weight_sq_norms(weight, fan_in_fan_out)

    def check_cache(step):
        """After each forward: what every fast DoRA layer used in it."""
        cache["calls"].append(len(seen))
        cache["recomputed"].append(len(recomputed))
        cache["norm_error"].append(max(v[0] for v in seen.values()))
        cache["cache_error"].append(max(v[1] for v in seen.values()))
        cache["data_ptrs"].append([v[2][0] if v[2] else None for v in seen.values()])
        cache["versions"].append([v[2][1] if v[2] else None for v in seen.values()])
        seen.clear()
        recomputed.clear()

    dora._weight_norm, dora.weight_sq_norms = checked_weight_norm, counting_weight_sq_norms
    optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2, weight_decay=0.01)
    result = lm_scenario(model, optimizer, rank, world, num_fsdp, after_forward=check_cache)

    # The probe: new base weights (1.5 W) are loaded into the sharded model after a forward has filled the cache:
    # set_model_state_dict copies each full tensor into its FSDP2 shard, as resuming from a full checkpoint does;
    # the next forward all-gathers the new values. Its output is also compared with the output after
    # clear_weight_sq_cache (what DoRA gives with ||W||^2 recomputed).
    probe_rows = lm_batch()[:1]
    with torch.no_grad():
        model(input_ids=probe_rows)
        check_cache(STEPS)
        scaled = {f"{name}.base_layer.weight": 1.5 * full(m.get_base_layer().weight) for name, m in layers.items()}
        model.reshard()  # a forward without backward leaves the root's parameters unsharded
        set_model_state_dict(model, scaled, options=StateDictOptions(full_state_dict=True, strict=False))
        base_scale[0] = 1.5
        logits = model(input_ids=probe_rows).logits
        check_cache(STEPS + 1)
        dora.clear_weight_sq_cache(model)
        cache["probe_logits_error"] = (logits - model(input_ids=probe_rows).logits).abs().max().item()
        check_cache(STEPS + 2)
    dora._weight_norm, dora.weight_sq_norms = weight_norm, weight_sq_norms
    result["cache"] = cache
    return result


def allora_scenario(mesh, rank: int, world: int) -> dict:
    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    model = peft_model(enable_allora(config, eta=2.0))
    num_fsdp = shard(model, mesh)
    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=0.2)
    return lm_scenario(model, optimizer, rank, world, num_fsdp)


def rollouts(num_rows: int) -> dict:
    """Fixed GRPO rollouts: groups of ``NUM_GENERATIONS`` sharing a prompt; completions of 1..WIDTH tokens (right
    padded, masked) sharing a 2-token prefix within a group (GTPO's conflict tokens); advantages from fixed rewards,
    normalised per group as TRL does, every group holding both signs."""
    generator = torch.Generator().manual_seed(0)
    num_groups = num_rows // NUM_GENERATIONS
    prompts = torch.randint(FIRST_LETTER, VOCAB, (num_groups, 1, PROMPT_LEN), generator=generator)
    prompt_ids = prompts.expand(-1, NUM_GENERATIONS, -1).reshape(num_rows, PROMPT_LEN)
    completion_ids = torch.randint(FIRST_LETTER, VOCAB, (num_rows, WIDTH), generator=generator)
    completion_ids.view(num_groups, NUM_GENERATIONS, WIDTH)[:, :, :2] = completion_ids.view(
        num_groups, NUM_GENERATIONS, WIDTH
    )[:, :1, :2]
    row = torch.arange(num_rows)
    lengths = 1 + (row * 5) % WIDTH
    completion_mask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, PAD_ID)
    rewards = ((row * 7) % 5).double().view(num_groups, NUM_GENERATIONS) / 4
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    assert ((advantages > 0).any(1) & (advantages < 0).any(1)).all()
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages.reshape(-1).float(),
    }


def grpo_scenario(
    mesh, rank: int, world: int, out, loss_type: str, optimizer_cls, lr: float, off_policy=False
) -> dict:
    num_rows = 16 if off_policy else 12
    per_rank = num_rows // world
    output_dir = tempfile.mkdtemp(prefix=f"{loss_type}_rank{rank}_", dir=out)  # the test's tmp_path
    args = GRPOConfig(
        output_dir=output_dir,
        loss_type=loss_type,
        num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=per_rank,
        num_iterations=STEPS if off_policy else 1,
        max_completion_length=WIDTH,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(materialize_model()), reward_funcs=count_reward, args=args, train_dataset=count_dataset(8)
    )
    loss_object = trainer.grpo_loss
    assert trainer.accelerator.num_processes == world and loss_object.whole_groups() == off_policy
    trainer.model.train()  # the loss reads the mode from the trainer's model
    trainer.current_gradient_accumulation_steps = 1

    model = peft_model(
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False), trainer
    )
    num_fsdp = shard(model, mesh)
    optimizer = optimizer_cls(list(trainable(model).values()), lr=lr)
    batch = rollouts(num_rows)
    mine = {key: value[rank * per_rank : (rank + 1) * per_rank] for key, value in batch.items()}
    mine["num_items_in_batch"] = batch["completion_mask"].sum()
    generated = {}

    def generate() -> dict:
        """What _generate_and_score_completions hands the loss: the rows, old log-probs when reused, prepare."""
        output = dict(mine)
        if off_policy:
            with torch.no_grad():
                output["old_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                    model,
                    torch.cat([output["prompt_ids"], output["completion_ids"]], 1),
                    torch.cat([output["prompt_mask"], output["completion_mask"]], 1),
                    WIDTH,
                )
        loss_object.prepare(output, "train")
        return fold_groups(output, NUM_GENERATIONS) if loss_object.whole_groups() else output

    def step_loss(step):
        if step % args.num_iterations == 0:
            generated["batch"] = generate()
        return trainer._compute_loss(model, dict(generated["batch"]))

    result = train(model, optimizer, step_loss, world)
    result["sharding"] = sharding_info(model, num_fsdp)
    return result


def main() -> None:
    rank, world, out, _ = init()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = {
        "world_size": world,
        "dora": dora_scenario(mesh, rank, world),
        "allora": allora_scenario(mesh, rank, world),
        "ba": grpo_scenario(mesh, rank, world, out, "ba", torch.optim.SGD, 0.5),
        "real": grpo_scenario(mesh, rank, world, out, "real", torch.optim.SGD, 0.5),
        "real_bce": grpo_scenario(mesh, rank, world, out, "real_bce", torch.optim.AdamW, 1e-2),
        "gtpo": grpo_scenario(mesh, rank, world, out, "gtpo", torch.optim.SGD, 0.5),
        "real_offpolicy": grpo_scenario(mesh, rank, world, out, "real", torch.optim.SGD, 0.5, off_policy=True),
    }
    finish(out, results)


if __name__ == "__main__":
    main()
