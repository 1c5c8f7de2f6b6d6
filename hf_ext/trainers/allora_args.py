"""The ALLoRA switch shared by hf_ext's trainer configs (``use_allora``, ``allora_eta``) and how a trainer applies it.

Training flags live in the training config, never in ``adapter_config.json``: the adapter stays plain LoRA.
"""

from dataclasses import dataclass, field

from ..peft.allora import check_allora_config, check_eta, enable_allora


@dataclass
class ALLoRAArguments:
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

    def _check_allora(self) -> None:
        check_eta(self.allora_eta)


def allora_peft_config(args: ALLoRAArguments, model, peft_config):
    """The ``peft_config`` a trainer should build its adapter from: ALLoRA's when ``args.use_allora``."""
    if not args.use_allora:
        return peft_config
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
