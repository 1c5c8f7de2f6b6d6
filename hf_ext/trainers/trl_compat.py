"""Every private part of TRL that hf_ext uses, behind this one door; ``tests/trainers/test_trl_compat.py`` is the
contract test that names the symbol when an upstream change breaks one.

TRL's GRPO trainer offers no extension point for a policy loss: ``loss_type`` is a string compared inside
``GRPOTrainer._compute_loss``. hf_ext's losses therefore use:

- ``GRPOTrainer._compute_loss`` (overridden; its source is where the loss types are read, ``trl_loss_types``) and
  ``GRPOTrainer._generate_and_score_completions`` (overridden, to add per-row tensors from whole groups); the keys
  of the dict it returns that hf_ext reads are ``GENERATION_KEYS``.
- ``GRPOTrainer._get_per_token_logps_and_entropies`` (the forward, with the model-input keys ``MODEL_INPUT_KEYS``
  TRL passes for multimodal models), ``GRPOTrainer._metrics`` (what TRL averages and logs), the entropy-bonus
  controller state (``entropy_coef``, ``use_adaptive_entropy``, ``_entropy_bonus_enabled``,
  ``_last_world_entropy``, ``_entropy_window_stats``), the router auxiliary loss switch (``aux_loss_enabled``,
  ``router_aux_loss_coef``), ``trl.trainer.grpo_trainer.is_async_callable`` (how TRL tells an async reward
  function) and ``trl.trainer.utils.nanmin`` / ``nanmax`` (its clip-ratio metrics).
- ``GRPOTrainer._calculate_rewards`` (overridden, to refuse rewards that would teach nothing): it returns the
  rewards of all processes' completions (process-major) x reward functions, NaN where a function returned None;
  ``reward_funcs`` / ``reward_func_names``, which hf_ext wraps after ``__init__``, and ``reward_weights``.
- The trainer state the clipped objective reads: ``beta``, ``epsilon_low`` / ``epsilon_high``,
  ``top_entropy_quantile``, ``off_policy_mask_threshold``, ``use_vllm``, ``vllm_importance_sampling_correction``,
  ``num_generations`` / ``num_generations_eval``, and the public ``get_high_entropy_mask`` / ``get_off_policy_mask``.
- Model cards: the class attributes ``_tag_names`` (extended per run), ``_name`` and ``_paper`` (the trainer's
  paper as ``{"title", "id", "citation"}``).
- Scripts: ``trl.scripts.grpo.GRPOScriptArguments`` (the ``trl grpo`` arguments, not exported at the top) and
  ``TrlParser.parse_args_and_config(..., separate_remaining_strings=True)``.
"""

import ast
import functools
import inspect
import textwrap

import torch
import trl
from trl.scripts.grpo import GRPOScriptArguments
from trl.trainer.grpo_trainer import is_async_callable
from trl.trainer.utils import nanmax, nanmin


__all__ = [
    "GENERATION_KEYS",
    "adds_terms",
    "GRPOScriptArguments",
    "MODEL_INPUT_KEYS",
    "entropy_bonus",
    "is_async_callable",
    "metrics",
    "nanmax",
    "nanmin",
    "policy_forward",
    "reward_weights",
    "router_aux_term",
    "trl_loss_types",
]

# Keys of ``_generate_and_score_completions``' output that hf_ext's losses read (``old_per_token_logps``,
# ``tool_mask``, ``ref_per_token_logps``, ``sampling_per_token_logps`` and ``importance_sampling_ratio`` only when
# TRL computes them).
GENERATION_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "num_items_in_batch",
)
# The model inputs beside the token ids that TRL's loss forwards to ``_get_per_token_logps_and_entropies``.
MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def loss_type_names(function) -> tuple[str, ...]:
    """Strings compared with ``self.loss_type`` (``==`` / ``in``) in ``function``'s source, in source order."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Compare) and _is_self_loss_type(node.left)):
            continue
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            if not isinstance(op, (ast.Eq, ast.In)):
                continue
            values = comparator.elts if isinstance(comparator, (ast.List, ast.Tuple, ast.Set)) else [comparator]
            found += [(v.lineno, v.col_offset, v.value) for v in values if _is_string(v)]
    return tuple(dict.fromkeys(name for *_, name in sorted(found)))


@functools.cache
def trl_loss_types() -> tuple[str, ...] | None:
    """The loss types of the installed TRL's GRPO trainer, or None where its source cannot be read."""
    try:
        return loss_type_names(trl.GRPOTrainer._compute_loss) or None
    except (OSError, TypeError, SyntaxError):  # no source shipped (zipped or compiled install), or unparsable
        return None


def _is_self_loss_type(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "loss_type"
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _is_string(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def reward_weights(trainer) -> torch.Tensor:
    """(F,) float32: the weight of each reward function in the reward TRL sums (``reward_weights``, ones by
    default)."""
    return trainer.reward_weights


def metrics(trainer, mode: str) -> dict[str, list]:
    """TRL's per-mode metric lists (name -> values since the last log), which it averages and logs."""
    return trainer._metrics[mode]


def policy_forward(trainer, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-token log-probs (B, T), entropies (B, T), router auxiliary loss or None) of the completions in
    ``inputs``, computed as TRL's loss computes them (multimodal inputs included)."""
    completion_ids = inputs["completion_ids"]
    return trainer._get_per_token_logps_and_entropies(
        model,
        torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        completion_ids.size(1),
        compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled,
        **{key: inputs.get(key) for key in MODEL_INPUT_KEYS},
    )


def adds_terms(trainer) -> bool:
    """Whether TRL adds an entropy bonus or a router auxiliary loss to the policy loss of this run."""
    return bool(trainer._entropy_bonus_enabled or trainer.aux_loss_enabled)


def entropy_bonus(trainer, entropies: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor | None:
    """TRL's entropy bonus for one micro-batch, or None when ``entropy_coef`` is 0 and adaptive control is off.

    Returns coef * H / accumulation, with H the mean entropy over ``mask``'s tokens (to subtract from the loss).
    The coefficient is the one in force since the last optimizer step (adaptive control: ``entropy_coef`` while the
    last window's token-weighted entropy, over all processes, was <= ``entropy_target``, else 0); in training the
    adaptive controller then counts this micro-batch and, at the optimizer step, moves ``entropy_coef`` by
    ``entropy_coef_delta`` within [``entropy_coef_min``, ``entropy_coef_max``].
    """
    if not trainer._entropy_bonus_enabled:
        return None
    args = trainer.args
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    entropy = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    coef = trainer.entropy_coef
    if trainer.use_adaptive_entropy and trainer._last_world_entropy > args.entropy_target:
        coef = 0.0
    if trainer.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropies * mask).sum(), mask.sum()]).detach()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if trainer.accelerator.sync_gradients:
            totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            trainer._last_world_entropy = world_entropy
            trainer._entropy_window_stats = None
    if mode == "train" and trainer.accelerator.sync_gradients:
        metrics(trainer, mode)["entropy_coef"].append(trainer.entropy_coef)
    return coef * entropy


def router_aux_term(trainer, aux_loss: torch.Tensor | None, mode: str) -> torch.Tensor | None:
    """router_aux_loss_coef * aux / accumulation when TRL adds a mixture-of-experts router loss (logged as
    ``aux_loss``), else None."""
    if not trainer.aux_loss_enabled:
        return None
    metrics(trainer, mode)["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    return trainer.router_aux_loss_coef * aux_loss / accumulation
