"""``HfExtArguments``: what every hf_ext training config adds to its TRL base, and the ``__post_init__`` they share.

Its ``__post_init__`` snapshots the fields the config was given (the run's recipe, before Transformers derives
others), refuses a push that cannot reach the Hub, checks the adapter switches, and carries an hf_ext ``optim`` name
past the base class's enum. A subclass runs its own checks and then calls ``super().__post_init__()``.
"""

from dataclasses import dataclass

from ..hub.card import given_fields
from ..hub.publish import require_hub_token
from .adapter_args import AdapterArguments
from .optim_args import OptimizerArguments


@dataclass
class HfExtArguments(AdapterArguments, OptimizerArguments):
    def __post_init__(self):
        self.given_fields = given_fields(self)
        if self.push_to_hub:
            require_hub_token(self.hub_token, "push_to_hub=True")
        self._check_adapter_arguments()
        optim = self._hand_over_optim()
        super().__post_init__()
        self._take_back_optim(optim)
