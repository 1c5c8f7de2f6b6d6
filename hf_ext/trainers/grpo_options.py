"""The TRL GRPO options that act on a policy loss, and which of them each registered loss honours.

``TRL_OPTIONS`` lists every option of ``trl.GRPOConfig`` (and every input) that TRL's own loss code or the
trainer's forward honours, each with the fields that turn it on, an example value (the tests set it) and where TRL
applies it:

- ``"objective"``: inside the clipped objective (the clip range, ``delta``, the ratio level, the KL term, the
  token masks, vLLM's importance-sampling correction). A loss honours these only if it says so
  (``GRPOLoss.supported_options``); for any other, setting one is refused at config time with the loss's reason.
- ``"terms"``: added to whatever loss runs (the entropy bonus, a mixture-of-experts router loss): every hf_ext loss
  gets them from ``GRPOLoss.finish``, computed as TRL computes them.
- ``"forward"``: how the log-probabilities are computed (multimodal inputs, tool masks, an fp32 LM head, Liger's
  layer kernels): every loss that takes its forward from ``GRPOLoss.forward`` / ``policy_logps`` gets them.
- ``"advantages"``: applied by TRL at generation time, before any loss sees the batch (reward scaling, the
  multi-objective aggregation, masking truncated completions): the same for every loss type.

``feature_table`` renders option x loss type from these declarations; the README shows it, and a test keeps the
two equal, so the table cannot drift from what the checks enforce.
"""

from collections.abc import Callable
from dataclasses import dataclass

import trl

from .grpo_loss import grpo_losses


@dataclass(frozen=True)
class TRLOption:
    name: str
    fields: tuple[str, ...]
    is_set: Callable[[object], bool]  # config -> whether the user turned the option on
    example: dict  # config values that turn it on
    applies: str  # "objective", "terms", "forward" or "advantages"


TRL_OPTIONS = (
    TRLOption(
        "clip range",
        ("epsilon", "epsilon_high"),
        lambda c: c.epsilon != 0.2 or c.epsilon_high is not None,
        {"epsilon_high": 0.28},
        "objective",
    ),
    TRLOption("two-sided clip", ("delta",), lambda c: c.delta is not None, {"delta": 1.5}, "objective"),
    TRLOption(
        "sequence-level ratio",
        ("importance_sampling_level",),
        lambda c: c.importance_sampling_level != "token",
        {"importance_sampling_level": "sequence"},
        "objective",
    ),
    TRLOption(
        "KL to a reference model",
        ("beta", "use_bias_correction_kl"),
        lambda c: c.beta != 0.0,
        {"beta": 0.04},
        "objective",
    ),
    TRLOption(
        "top-entropy token mask",
        ("top_entropy_quantile",),
        lambda c: c.top_entropy_quantile < 1.0,
        {"top_entropy_quantile": 0.5},
        "objective",
    ),
    TRLOption(
        "off-policy sequence mask",
        ("off_policy_mask_threshold",),
        lambda c: c.off_policy_mask_threshold is not None,
        {"off_policy_mask_threshold": 0.5},
        "objective",
    ),
    TRLOption(
        "vLLM importance-sampling correction",
        ("use_vllm", "vllm_importance_sampling_correction"),
        lambda c: c.use_vllm and c.vllm_importance_sampling_correction,
        {"use_vllm": True, "vllm_importance_sampling_correction": True},
        "objective",
    ),
    TRLOption(
        "entropy bonus",
        ("entropy_coef", "use_adaptive_entropy"),
        lambda c: c.entropy_coef != 0.0 or c.use_adaptive_entropy,
        {"entropy_coef": 0.01},
        "terms",
    ),
    TRLOption(
        "router auxiliary loss (MoE)",
        ("router_aux_loss_coef",),
        lambda c: c.router_aux_loss_coef not in (None, 0.0),
        {"router_aux_loss_coef": 0.01},
        "terms",
    ),
    TRLOption("multimodal inputs", ("pixel_values", "image_grid_thw", "..."), lambda c: False, {}, "forward"),
    TRLOption("tool-call masks", ("tool_mask",), lambda c: False, {}, "forward"),
    TRLOption("fp32 LM head", ("cast_lm_head_to_fp32",), lambda c: c.cast_lm_head_to_fp32, {}, "forward"),
    TRLOption("Liger layer kernels", ("use_liger_kernel",), lambda c: c.use_liger_kernel, {}, "forward"),
    TRLOption(
        "reward scaling and aggregation",
        ("scale_rewards", "multi_objective_aggregation"),
        lambda c: False,
        {},
        "advantages",
    ),
    TRLOption(
        "masked truncated completions",
        ("mask_truncated_completions",),
        lambda c: c.mask_truncated_completions,
        {},
        "advantages",
    ),
)
OBJECTIVE_OPTIONS = tuple(option.name for option in TRL_OPTIONS if option.applies == "objective")


def support(loss_cls, option: TRLOption) -> str | None:
    """None when ``loss_cls`` honours ``option`` as TRL would, else why it refuses it."""
    if option.applies != "objective" or option.name in loss_cls.supported_options:
        return None
    return loss_cls.refused_options.get(option.name, loss_cls.refusal_reason)


def check_trl_options(config, loss_cls) -> None:
    """Raises ``ValueError`` naming the first option set in ``config`` that ``loss_cls`` does not honour, with each
    of its fields that differs from TRL's default."""
    defaults = trl.GRPOConfig.__dataclass_fields__
    for option in TRL_OPTIONS:
        reason = support(loss_cls, option)
        if reason is None or not option.is_set(config):
            continue
        changed = [name for name in option.fields if getattr(config, name) != defaults[name].default]
        fixes = "; ".join(
            f"{name} must be {defaults[name].default!r}, got {getattr(config, name)!r}" for name in changed
        )
        raise ValueError(f"loss_type={config.loss_type!r} does not support the {option.name}: {reason} {fixes}.")


_WHERE = {
    "objective": "in the clipped objective",
    "terms": "added to every loss",
    "forward": "in the shared forward",
    "advantages": "by TRL, before the loss",
}


def feature_table() -> str:
    """Markdown: one row per TRL option (where TRL applies it), one column per registered loss: "yes", or
    "refused:" and the reason."""
    losses = grpo_losses()
    lines = [
        "| TRL option (fields) | applied | " + " | ".join(f"`{name}`" for name in losses) + " |",
        "|---|---|" + "---|" * len(losses),
    ]
    for option in TRL_OPTIONS:
        cells = [
            reason and f"refused: {reason}" or "yes" for reason in (support(cls, option) for cls in losses.values())
        ]
        fields = ", ".join(f"`{name}`" for name in option.fields)
        lines.append(f"| {option.name} ({fields}) | {_WHERE[option.applies]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
