"""``SFTConfig`` / ``SFTTrainer``: TRL's SFT with hf_ext's training switches (ALLoRA: ``use_allora``)."""

from dataclasses import dataclass

import trl

from .adapter_args import adapter_peft_config, apply_adapter_switches
from .arguments import HfExtArguments
from .card import ModelCardMixin
from .checkpoints import CheckpointMixin
from .optim_args import OptimizerMixin


@dataclass
class SFTConfig(HfExtArguments, trl.SFTConfig):
    r"""
    TRL's [`trl.SFTConfig`] plus hf_ext's switches. Every TRL field keeps its meaning and default.

    Parameters:
        use_allora (`bool`, *optional*, defaults to `False`):
            Train the LoRA adapter (``peft_config``) with ALLoRA, arXiv 2410.09692.
        allora_eta (`float`, *optional*, defaults to `2.0`):
            ALLoRA's eta: the gradient scale of an output row while it is zero.
        dora_impl (`str`, *optional*, defaults to `"fused"`):
            With DoRA (`use_dora=True` in the LoRA config): `"fused"` for hf_ext's factored weight norm, `"peft"`
            for PEFT's own.
        optim (`str`):
            Any Transformers optimizer, or `"hf_ext_adamw_4bit"` / `"hf_ext_adamw_4bit_factor"` (4-bit AdamW states,
            arXiv 2309.01507) with `optim_args` keys `block_size`, `min_quantized_numel`, `nonfinite_grads`.
    """


class SFTTrainer(OptimizerMixin, ModelCardMixin, CheckpointMixin, trl.SFTTrainer):
    """TRL's [`trl.SFTTrainer`] that honours [`hf_ext.SFTConfig`]'s switches."""

    _tag_names = ["trl", "sft", "hf_ext"]

    def __init__(self, model, args: SFTConfig | None = None, *pos_args, **kwargs):
        if isinstance(args, SFTConfig):
            kwargs["peft_config"] = adapter_peft_config(args, model, kwargs.get("peft_config"))
            if args.use_allora:
                self._tag_names = [*self._tag_names, "allora"]
        super().__init__(model, args, *pos_args, **kwargs)
        if isinstance(args, SFTConfig):
            apply_adapter_switches(args, self.model)
