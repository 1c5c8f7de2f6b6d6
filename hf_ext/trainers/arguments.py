"""``HfExtArguments``: what every hf_ext training config adds to its TRL base, and the ``__post_init__`` they share.

Its ``__post_init__`` refuses sizes, rates and step counts that would train nothing or fail only after the model
loaded (``RANGES``, each field checked where the config has it), snapshots the fields the config was given (the
run's recipe, before Transformers derives others), refuses a push that cannot reach the Hub, checks the adapter
switches, and carries an hf_ext ``optim`` name past the base class's enum. A subclass runs its own checks and then
calls ``super().__post_init__()``.
"""

import math
from dataclasses import dataclass, field
from numbers import Real

from ..hub.publish import require_hub_token
from ..hub.recipe import given_fields
from .adapter_args import AdapterArguments
from .optim_args import OptimizerArguments


# (fields, the values allowed, as the error states it, and the test of one value). A field the config does not have
# is skipped; ``None`` (unset, where the field allows it) always passes.
RANGES = (
    (
        (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "max_prompt_length",
            "max_completion_length",
            "num_iterations",
            "steps_per_generation",
            "generation_batch_size",
        ),
        "an integer >= 1",
        lambda value: value >= 1,
    ),
    (
        ("num_generations", "num_generations_eval"),
        "an integer >= 2 (GRPO's advantages compare the completions of one prompt)",
        lambda value: value >= 2,
    ),
    (("learning_rate",), "a finite number > 0 (at 0 no weight moves)", lambda value: 0 < value < math.inf),
    (("temperature",), "a finite number > 0 (sampling divides the logits by it)", lambda value: 0 < value < math.inf),
)


@dataclass
class HfExtArguments(AdapterArguments, OptimizerArguments):
    r"""
    The fields every hf_ext training config adds to its TRL base.

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
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Train into an output_dir that already holds a saved model or checkpoints.
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that already holds a saved model or checkpoints (hf_ext's scripts "
            "refuse that otherwise, unless resume_from_checkpoint is given). Files of the same name are replaced; "
            "others stay."
        },
    )

    def __post_init__(self):
        self._check_ranges()
        self.given_fields = given_fields(self)
        if self.push_to_hub:
            require_hub_token(self.hub_token, "push_to_hub=True")
        self._check_adapter_arguments()
        with self._optim_past_the_enum():
            super().__post_init__()

    def _check_ranges(self) -> None:
        """Raises ``ValueError`` naming the first field outside ``RANGES``, ``max_steps=0``, or, when ``max_steps``
        is negative (train by epochs), a ``num_train_epochs`` that is not a finite number > 0."""
        for names, allowed, test in RANGES:
            for name in names:
                value = getattr(self, name, None)
                if value is not None and not (isinstance(value, Real) and test(value)):
                    raise ValueError(f"{name} must be {allowed}, got {value!r}.")
        if self.max_steps == 0:
            raise ValueError(
                "max_steps=0 would train nothing: give max_steps >= 1, or a negative value (the default, -1) to "
                "train for num_train_epochs epochs."
            )
        if self.max_steps < 0 and not 0 < self.num_train_epochs < math.inf:
            raise ValueError(
                f"num_train_epochs must be a finite number > 0 when max_steps is negative (training by epochs), got "
                f"{self.num_train_epochs!r}: give num_train_epochs > 0 or max_steps >= 1."
            )
