"""The adapter switches shared by hf_ext's trainer configs (ALLoRA: ``use_allora``, ``allora_eta``; DoRA:
``dora_impl``) and how a trainer applies them to its ``peft_config``.

Training flags live in the training config, never in ``adapter_config.json``: the adapter stays a plain PEFT one.
"""

from dataclasses import dataclass, field

from .. import papers
from ..papers import Method
from ..peft.allora import check_allora_config, check_eta, enable_allora
from ..peft.dora import apply_fast_dora, enable_fast_dora, uses_fast_dora


DORA_IMPLS = ("fused", "peft")


@dataclass
class AdapterArguments:
    use_allora: bool = field(
        default=False,
        metadata={
            "help": "Train the LoRA adapter with ALLoRA (arXiv 2410.09692): no dropout, no scaling (lora_alpha = r), "
            "each output row's gradient scaled by 1/sqrt(||(BA)_row|| + 1/allora_eta^2)."
        },
    )
    allora_eta: float = field(
        default=2.0,
        metadata={"help": "ALLoRA's eta (> 0): the gradient scale of a zero row; the paper sweeps eta^2 in 1, 2, 4."},
    )
    dora_impl: str = field(
        default="fused",
        metadata={
            "help": "DoRA (use_dora in the LoRA config): 'fused' (hf_ext's factored weight norm, no dense B @ A) or "
            "'peft' (PEFT's own). Ignored without DoRA."
        },
    )

    def _check_adapter_arguments(self) -> None:
        check_eta(self.allora_eta)
        if self.dora_impl not in DORA_IMPLS:
            raise ValueError(f"dora_impl={self.dora_impl!r} is not known; allowed values: {', '.join(DORA_IMPLS)}.")


def adapter_peft_config(args: AdapterArguments, model, peft_config):
    """The ``peft_config`` a trainer should build its adapter from, with ALLoRA or fast DoRA applied."""
    if args.use_allora:
        if peft_config is None:
            raise ValueError(
                "use_allora=True needs a LoRA adapter to train: pass peft_config=LoraConfig(r=..., lora_alpha=r, "
                "lora_dropout=0.0) to the trainer (CLI or YAML: use_peft, lora_r, lora_alpha equal to lora_r, "
                "lora_dropout 0)."
            )
        if hasattr(model, "peft_config"):
            raise ValueError(
                "use_allora=True needs the trainer to build the adapter: pass the base model and a peft_config, not a "
                "model that already carries one."
            )
        check_allora_config(peft_config, args.allora_eta)
        return enable_allora(peft_config, args.allora_eta)
    if args.dora_impl == "fused" and getattr(peft_config, "use_dora", False):
        return enable_fast_dora(peft_config)
    return peft_config


def apply_adapter_switches(args: AdapterArguments, model) -> None:
    """After the trainer built its model: DoRA adapters that arrived already built (a ``PeftModel`` passed in, e.g.
    from ``PeftModel.from_pretrained``) also get the fast path when ``dora_impl="fused"``."""
    if args.dora_impl == "fused":
        apply_fast_dora(model)


def adapter_card_sections(args, model, peft_config) -> list[Method]:
    """The model card's entries for DoRA (naming the implementation that runs) and ALLoRA, where the run uses them.
    ``args`` may be a plain TRL config, which has no hf_ext switch; ``peft_config`` is the active adapter's or None."""
    sections = []
    if peft_config is not None and peft_config.use_dora:
        fast = uses_fast_dora(model)
        sections.append(
            Method(
                "DoRA, factored weight norm (hf_ext fast path)" if fast else "DoRA (PEFT's implementation)",
                "dora",
                (papers.DORA, papers.SCALING_DORA) if fast else (papers.DORA,),
                {"r": peft_config.r, "lora_alpha": peft_config.lora_alpha, "fast_path": fast},
            )
        )
    if getattr(args, "use_allora", False):
        sections.append(
            Method(
                "ALLoRA",
                "allora",
                (papers.ALLORA,),
                {"allora_eta": args.allora_eta, "r": peft_config.r, "lora_alpha": peft_config.lora_alpha},
            )
        )
    return sections
