"""Every TRL option x every registered hf_ext loss (hf_ext.trainers.grpo_options): each refused cell fails at config
time naming the option's fields; each honoured cell has a test that fails if the option were ignored; the README
shows the table generated from the same declarations.

Cells of BA's column that belong to TRL's clipped objective are held equal to TRL's own loss in
test_grpo_clipped.py; here the other cells."""

import inspect
import re

import pytest
import torch
import trl
from runs import REPO, tiny_grpo_config
from test_grpo_trainer import crafted_batch, independent_logps_and_entropies

from hf_ext import GRPOTrainer
from hf_ext.embedded import count_dataset, count_reward, materialize_model
from hf_ext.trainers import grpo_losses
from hf_ext.trainers.grpo_options import TRL_OPTIONS, feature_table, support


LOSSES = ["ba", "gtpo", "real", "real_bce"]  # hf_ext's own; a plugin's column is built the same way
OBJECTIVE = [option for option in TRL_OPTIONS if option.applies == "objective"]
REFUSED = [(name, o) for name in LOSSES for o in OBJECTIVE if support(grpo_losses()[name], o) is not None]
HONOURED = [(name, o) for name in LOSSES for o in OBJECTIVE if support(grpo_losses()[name], o) is None]


def test_the_losses_under_test_are_the_registered_ones():
    assert set(LOSSES) <= set(grpo_losses())


@pytest.mark.parametrize(("loss_type", "option"), REFUSED, ids=[f"{n}-{o.name}" for n, o in REFUSED])
def test_refused_cell_fails_at_config_time_naming_the_option(tmp_path, loss_type, option):
    field = next(iter(option.example))
    with pytest.raises(ValueError, match=rf"loss_type='{loss_type}' does not support the {option.name}: .*{field}"):
        tiny_grpo_config(tmp_path, loss_type=loss_type, **option.example)


def trainer_for(tmp_path, loss_type: str, **options) -> GRPOTrainer:
    torch.manual_seed(0)
    trainer = GRPOTrainer(
        model=str(materialize_model()),
        reward_funcs=count_reward,
        args=tiny_grpo_config(tmp_path, loss_type=loss_type, **options),
        train_dataset=count_dataset(8),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    return trainer


def loss_of(trainer, batch: dict) -> torch.Tensor:
    trainer.grpo_loss.prepare(batch, "train")
    return trainer._compute_loss(trainer.model, batch)


def off_policy(batch: dict, model) -> dict:
    with torch.no_grad():
        logps, _ = independent_logps_and_entropies(model, batch)
    generator = torch.Generator().manual_seed(1)
    batch["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=generator)
    return batch


@pytest.mark.parametrize(("loss_type", "option"), HONOURED, ids=[f"{n}-{o.name}" for n, o in HONOURED])
def test_honoured_objective_cell_changes_the_loss(tmp_path, loss_type, option):
    """Ratios off 1 (old log-probs perturbed), so a clip range, delta or correction has something to act on."""
    extra = {"delta": 1.05, "epsilon_high": 0.05, "off_policy_mask_threshold": 0.01}
    example = {k: extra.get(k, v) for k, v in option.example.items()}
    vllm = example.pop("use_vllm", False)
    plain, changed = trainer_for(tmp_path / "a", loss_type), trainer_for(tmp_path / "b", loss_type, **example)
    batch = off_policy(crafted_batch(), plain.model)
    if vllm:  # vLLM itself does not run on CPU: the trainer is told it generated, with its sampling ratios
        changed.use_vllm = True
        batch["importance_sampling_ratio"] = torch.linspace(0.5, 1.5, 36).view(6, 6)
    if option.name == "KL to a reference model":
        batch["ref_per_token_logps"] = batch["old_per_token_logps"] - 0.2
    assert not torch.allclose(loss_of(plain, dict(batch)), loss_of(changed, dict(batch)))


@pytest.mark.parametrize("loss_type", LOSSES)
def test_entropy_bonus_is_subtracted_as_trl_defines_it(tmp_path, loss_type):
    """loss(entropy_coef = c) - loss(0) = -c * H / accumulation, H the mean entropy over the loss tokens, computed
    here from an independent forward."""
    coef = 0.3
    plain, bonus = trainer_for(tmp_path / "a", loss_type), trainer_for(tmp_path / "b", loss_type, entropy_coef=coef)
    batch = crafted_batch()
    _, entropies = independent_logps_and_entropies(plain.model, batch)
    mask = batch["completion_mask"].float()
    expected = -coef * (entropies * mask).sum() / mask.sum() / 2
    difference = loss_of(bonus, dict(batch)) - loss_of(plain, dict(batch))
    assert difference.item() == pytest.approx(expected.item(), rel=1e-4)
    assert bonus._metrics["train"]["entropy_coef"] == [coef]


def per_token_gradient(trainer, batch: dict) -> torch.Tensor:
    """d loss / d log-prob of each completion token (B, T), with the forward replaced by fixed log-probs."""
    generator = torch.Generator().manual_seed(2)
    logps = (-1.0 - torch.rand(batch["completion_ids"].shape, generator=generator)).requires_grad_()
    entropies = torch.rand(logps.shape, generator=generator)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    (grad,) = torch.autograd.grad(loss_of(trainer, batch), logps)
    return grad


@pytest.mark.parametrize("loss_type", LOSSES)
def test_tool_masked_tokens_get_no_gradient(tmp_path, loss_type):
    trainer = trainer_for(tmp_path, loss_type)
    tool_mask = torch.ones(6, 6, dtype=torch.long)
    tool_mask[1, 2:4] = 0
    tool_mask[3, 1] = 0
    masked = tool_mask == 0
    free = per_token_gradient(trainer, crafted_batch())
    assert free[masked].abs().min() > 0  # without the tool mask these tokens do move
    grad = per_token_gradient(trainer, {**crafted_batch(), "tool_mask": tool_mask})
    assert grad[masked].abs().max() == 0
    assert grad[~masked & (crafted_batch()["completion_mask"] == 1)].abs().max() > 0


def test_options_applied_before_the_loss_are_not_read_by_trl_s_loss():
    """ "advantages" and "forward" options: TRL's loss code does not read them, so hf_ext's losses, which replace
    only that code, get them exactly as TRL's loss types do."""
    loss_source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    generation_source = inspect.getsource(trl.GRPOTrainer._generate_and_score_completions)
    init_source = inspect.getsource(trl.GRPOTrainer.__init__)
    for option in TRL_OPTIONS:
        if option.applies == "advantages":
            for field in option.fields:
                assert field not in loss_source and field in generation_source + init_source, (
                    f"trl.GRPOTrainer._compute_loss now reads {field}"
                )
    assert "liger" not in inspect.getsource(trl.GRPOTrainer.compute_loss).lower(), (
        "trl.GRPOTrainer.compute_loss now has a Liger path that bypasses _compute_loss"
    )
    for option in TRL_OPTIONS:
        if option.name in ("fp32 LM head", "Liger layer kernels"):
            assert option.fields[0] not in loss_source and option.fields[0] in init_source, (
                f"trl.GRPOTrainer._compute_loss now reads {option.fields[0]}"
            )


def test_readme_shows_the_generated_table():
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"<!-- grpo-options -->\n(.*?)\n<!-- /grpo-options -->", readme, re.S)
    assert shown is not None, "README.md lacks the <!-- grpo-options --> block"
    assert shown[1] == feature_table(), (
        "README's option table is stale: paste hf_ext.trainers.grpo_options.feature_table()"
    )


def test_gtpo_divide_by_num_conflicts_scales_each_row_by_its_conflict_count(tmp_path):
    """With the option, each row's gradient is the one without it divided by max(1, its conflict tokens), as in
    the official code; the counts come from the conflict runs of the whole groups."""
    from hf_ext.losses.gtpo import conflict_runs

    def conflicted_batch() -> dict:
        """The crafted batch with the first row (positive) 4 tokens long and its first 3 shared by its group."""
        batch = crafted_batch()
        batch["completion_mask"][0, :4] = 1
        batch["completion_ids"][1:3, :3] = batch["completion_ids"][0, :3]
        batch["num_items_in_batch"] = batch["completion_mask"].sum()
        return batch

    plain = trainer_for(tmp_path / "a", "gtpo")
    divided = trainer_for(tmp_path / "b", "gtpo", gtpo_divide_by_num_conflicts=True)
    batch = conflicted_batch()
    prefix, suffix = conflict_runs(batch["completion_ids"], batch["completion_mask"], batch["advantages"], 3)
    counts = (prefix | suffix).sum(-1).clamp(min=1).float()
    assert counts.max() > 1  # rows with several conflict tokens
    expected = per_token_gradient(plain, conflicted_batch()) / counts[:, None]
    torch.testing.assert_close(per_token_gradient(divided, conflicted_batch()), expected)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> str:
    """A random-init 2-layer Qwen3-MoE (4 experts, 2 per token) with the embedded tokenizer, saved locally: the
    shape of TRL's tiny MoE test models, built here because tests download nothing."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from hf_ext.embedded.model import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_moe")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("loss_type", LOSSES)
def test_router_auxiliary_loss_is_added_as_trl_adds_it(tiny_moe, tmp_path, loss_type):
    """loss(router_aux_loss_coef = c) - loss(c = 0) = c * aux / accumulation, aux the model's own load-balancing
    loss of the same forward, read here from a plain forward with output_router_logits."""
    coef = 0.5

    def trainer(path, value):
        torch.manual_seed(0)
        built = GRPOTrainer(
            model=tiny_moe,
            reward_funcs=count_reward,
            args=tiny_grpo_config(path, loss_type=loss_type, router_aux_loss_coef=value),
            train_dataset=count_dataset(8),
        )
        built.model.train()
        built.current_gradient_accumulation_steps = 2
        return built

    with_aux, without = trainer(tmp_path / "a", coef), trainer(tmp_path / "b", 0.0)
    assert with_aux.aux_loss_enabled and not without.aux_loss_enabled
    batch = crafted_batch()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    aux = with_aux.model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    difference = loss_of(with_aux, dict(batch)) - loss_of(without, dict(batch))
    assert aux.item() > 0
    assert difference.item() == pytest.approx(coef * aux.item() / 2, rel=1e-4)
    assert with_aux._metrics["train"]["aux_loss"][-1] == pytest.approx(aux.item(), rel=1e-4)


@pytest.mark.parametrize("loss_type", LOSSES)
def test_multimodal_inputs_reach_the_forward_of_every_loss(tmp_path, loss_type):
    """Each model input TRL's loss forwards (pixel values, image grids, ...) reaches the policy forward as TRL
    passes it, whatever the loss type."""
    from hf_ext.trainers.trl_compat import MODEL_INPUT_KEYS

    trainer = trainer_for(tmp_path, loss_type)
    batch = crafted_batch()
    sentinels = {key: torch.full((6, 1), float(i)) for i, key in enumerate(MODEL_INPUT_KEYS)}
    seen = {}
    generator = torch.Generator().manual_seed(4)
    logps = (-1.0 - torch.rand(batch["completion_ids"].shape, generator=generator)).requires_grad_()

    def forward(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        seen.update(kwargs)
        return logps, torch.rand(logps.shape, generator=generator), None

    trainer._get_per_token_logps_and_entropies = forward
    loss_of(trainer, {**batch, **sentinels})
    assert all(seen[key] is sentinels[key] for key in MODEL_INPUT_KEYS), sorted(set(MODEL_INPUT_KEYS) - set(seen))
