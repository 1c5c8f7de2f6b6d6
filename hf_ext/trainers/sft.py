"""``SFTConfig`` / ``SFTTrainer``: TRL's SFT with hf_ext's training switches (ALLoRA: ``use_allora``)."""

from dataclasses import dataclass

import trl

from .adapter_args import adapter_peft_config, apply_adapter_switches
from .arguments import HfExtArguments
from .checkpoints import CheckpointMixin
from .model_card import ModelCardMixin
from .optim_args import OptimizerMixin


@dataclass
class SFTConfig(HfExtArguments, trl.SFTConfig):
    r"""
    TRL's [`trl.SFTConfig`] plus hf_ext's switches. Every TRL field keeps its meaning and default.

    Parameters:
        use_allora, allora_eta, dora_impl, optim, overwrite_output_dir:
            hf_ext's switches shared by its training configs: see [`hf_ext.trainers.arguments.HfExtArguments`].
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
