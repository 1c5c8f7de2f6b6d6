"""GRPO losses as plugins: the ``GRPOLoss`` base class, ``register_grpo_loss`` and the checks losses share.

A loss is one subclass in one module: its ``name`` (the ``loss_type`` value), its ``papers``, a ``settings``
dataclass (its config fields, each with ``metadata={"help": ...}``, and a ``check(config)`` that raises naming the
field), ``prepare`` (per-row tensors added at generation time, from whole groups), ``loss`` (the micro-batch loss),
the metrics it logs (``log``, under ``<metric_prefix>/``) and its model-card section (``card_section``).
Registering adds the settings' fields to ``hf_ext.GRPOConfig`` in place, so configs built afterwards, from Python,
YAML or the CLI, accept them. hf_ext's own losses (``grpo_ba``, ``grpo_real``, ``grpo_gtpo``) register the same way
a user's does; the CLI also loads the losses that installed packages declare in the entry-point group
``hf_ext.grpo_losses``.
"""

import dataclasses
import math
import typing
from collections.abc import Callable
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import ClassVar

import torch
from accelerate.utils import gather

from ..papers import Method, Paper
from . import trl_compat


ENTRY_POINT_GROUP = "hf_ext.grpo_losses"
_LOSSES: dict[str, type["GRPOLoss"]] = {}
_FIELD_OWNERS: dict[str, type] = {}  # config field -> the settings dataclass that declared it
_CONFIGS: list[tuple[type, Callable[[], str]]] = []  # config classes that grow the fields, with their help


class GRPOLoss:
    """A GRPO policy loss that ``hf_ext.GRPOTrainer`` runs when ``loss_type == name``.

    Subclasses set ``name``, ``papers`` and ``settings`` and override ``loss`` (and ``prepare`` when the loss needs
    whole groups, which TRL scatters over micro-batches and processes). One instance serves one trainer; the
    helpers below are the trainer state a loss may use.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""  # what the model card calls the method
    papers: ClassVar[tuple[Paper, ...]] = ()
    settings: ClassVar[type | None] = None  # a dataclass: config fields + ``check(config)``
    metric_prefix: ClassVar[str | None] = None  # logged metrics are "<prefix>/<name>"; default: ``name``
    # Options of TRL's clipped objective (``grpo_options.OBJECTIVE_OPTIONS``) this loss honours as TRL would; the
    # others are refused at config time, with ``refused_options[name]`` or ``refusal_reason`` as the reason.
    supported_options: ClassVar[frozenset[str]] = frozenset()
    refused_options: ClassVar[dict[str, str]] = {}
    refusal_reason: ClassVar[str] = "it belongs to TRL's clipped objective, which this loss does not compute."

    def __init__(self, trainer):
        self.trainer = trainer
        self.args = trainer.args

    # What a loss defines.

    def prepare(self, output: dict, mode: str) -> None:
        """Adds per-row tensors to TRL's generation ``output`` (this process's rows) for ``mode`` "train"/"eval"."""

    def whole_groups(self) -> bool:
        """Whether each training micro-batch must hold whole groups (rows of a group consecutive, on one process):
        the trainer then shuffles and splits the generation batch by groups. Needs ``per_device_train_batch_size``
        to be a multiple of ``num_generations`` (the loss's ``check`` says so)."""
        return False

    def observe_rewards(self, rewards: torch.Tensor) -> None:
        """Sees the rewards of the generation batch being scored, before ``prepare``: (N_all, F) float, every
        process's completions (process-major) x reward functions, NaN where a function returned None."""

    def loss(self, model, inputs: dict) -> torch.Tensor:
        """The 0-d loss of one micro-batch, scaled for gradient accumulation as TRL's losses are."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, inputs).")

    def state_dict(self) -> dict:
        """What this loss keeps across steps (JSON-serialisable), saved with every checkpoint; {} when nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``'s output on resume."""
        if state:
            raise ValueError(f"loss_type={self.name!r} keeps no state, but the checkpoint holds {sorted(state)}.")

    def card_hyperparameters(self) -> dict:
        fields = dataclasses.fields(self.settings) if self.settings is not None else ()
        return {
            "loss_type": self.name,
            "num_generations": self.args.num_generations,
            **{f.name: getattr(self.args, f.name) for f in fields},
        }

    def card_section(self) -> Method:
        """The model card's entry for this loss: its label, tag, papers and hyper-parameters."""
        return Method(f"GRPO loss `{self.name}`", self.name, self.papers, self.card_hyperparameters())

    # Trainer state a loss may use.

    @property
    def mode(self) -> str:
        return "train" if self.trainer.model.training else "eval"

    def group_size(self, mode: str) -> int:
        return self.trainer.num_generations if mode == "train" else self.trainer.num_generations_eval

    def accumulation(self, mode: str) -> int:
        """Micro-batches per optimizer step (1 in evaluation, which does not accumulate)."""
        return self.trainer.current_gradient_accumulation_steps if mode == "train" else 1

    def local_rows(self, num_local: int) -> slice:
        return local_rows(self.trainer.accelerator, num_local)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return gather(tensor)

    @staticmethod
    def loss_mask(inputs: dict) -> torch.Tensor:
        """(B, T): the completion tokens that enter the loss (tool-call output excluded)."""
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def log(self, mode: str, name: str, value: float) -> None:
        """Appends ``value`` to the metric ``<metric_prefix>/<name>`` that TRL averages and logs."""
        trl_compat.metrics(self.trainer, mode)[f"{self.metric_prefix or self.name}/{name}"].append(value)

    def forward(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token log-probs (B, T), entropies (B, T), loss mask (B, T)) of the completions under the current
        policy, computed as TRL's loss computes them (multimodal inputs included). ``finish`` adds the entropy bonus
        over ``mask`` (``bonus_mask`` narrows it) and the router loss of this forward."""
        per_token_logps, entropies, aux_loss = trl_compat.policy_forward(self.trainer, model, inputs)
        mask = self.loss_mask(inputs)
        self._forward = (entropies, mask, aux_loss)
        return per_token_logps, entropies, mask

    def policy_logps(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward``, logging the mean entropy of the micro-batch."""
        per_token_logps, entropies, mask = self.forward(model, inputs)
        entropy = (entropies.detach() * mask).sum() / mask.sum().clamp(min=1)
        trl_compat.metrics(self.trainer, self.mode)["entropy"].append(
            self.trainer.accelerator.gather(entropy).mean().item()
        )
        return per_token_logps, entropies, mask

    def bonus_mask(self, mask: torch.Tensor) -> None:
        """Restricts the entropy bonus of this micro-batch to ``mask`` (B, T), as TRL's top-entropy mask does."""
        entropies, _, aux_loss = self._forward
        self._forward = (entropies, mask, aux_loss)

    def finish(self, loss: torch.Tensor, mode: str) -> torch.Tensor:
        """``loss`` (what ``loss`` returned) with the terms TRL adds to any policy loss: minus the entropy bonus
        (``entropy_coef``, static or adaptive) and plus the router auxiliary loss of a mixture-of-experts model,
        both from this micro-batch's ``forward``."""
        forward, self._forward = getattr(self, "_forward", None), None
        if not trl_compat.adds_terms(self.trainer):
            return loss
        if forward is None:
            raise RuntimeError(
                f"loss_type={self.name!r}: the entropy bonus and the router loss need the micro-batch's forward; "
                "compute it with GRPOLoss.forward (or policy_logps)."
            )
        entropies, mask, aux_loss = forward
        bonus = trl_compat.entropy_bonus(self.trainer, entropies, mask, mode)
        if bonus is not None:
            policy_loss = loss.detach() * self.accumulation(mode)
            trl_compat.metrics(self.trainer, mode)["policy_loss"].append(
                self.trainer.accelerator.gather(policy_loss).nanmean().item()
            )
            loss = loss - bonus
        aux = trl_compat.router_aux_term(self.trainer, aux_loss, mode)
        return loss if aux is None else loss + aux


def local_rows(accelerator, num_local: int) -> slice:
    """This process's rows in a tensor gathered over processes (process-major, as TRL lays them out)."""
    first = accelerator.process_index * num_local
    return slice(first, first + num_local)


def register_grpo_loss(cls: type[GRPOLoss]) -> type[GRPOLoss]:
    """Makes ``loss_type=cls.name`` available to ``hf_ext.GRPOConfig`` / ``GRPOTrainer``; usable as a decorator.

    Registering the same class again does nothing. Raises ``ValueError`` when the name is taken by another class or
    by a loss type of the installed TRL, or when a settings field is already a config field of someone else.
    """
    if not (isinstance(cls, type) and issubclass(cls, GRPOLoss)):
        raise TypeError(f"register_grpo_loss() takes a subclass of hf_ext.GRPOLoss, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"{cls.__qualname__}.name must be an identifier-like string (the loss_type), got {name!r}.")
    if _LOSSES.get(name) is cls:
        return cls
    if name in _LOSSES:
        raise ValueError(f"loss_type {name!r} is already registered by {_LOSSES[name].__qualname__}.")
    if name in (trl_compat.trl_loss_types() or ()):
        raise ValueError(f"loss_type {name!r} is one of TRL's own loss types: choose another name.")
    fields = _settings_fields(cls)
    for config_cls, _ in _CONFIGS:
        _check_new_fields(cls, config_cls)
    _LOSSES[name] = cls
    for f in fields:
        _FIELD_OWNERS[f.name] = cls.settings
    for config_cls, help_text in _CONFIGS:
        _extend_config(config_cls, cls.settings, help_text)
    return cls


def grpo_losses() -> dict[str, type[GRPOLoss]]:
    """The registered losses by ``loss_type``, in registration order."""
    return dict(_LOSSES)


def grpo_loss_class(loss_type: str) -> type[GRPOLoss] | None:
    return _LOSSES.get(loss_type)


def load_entry_point_losses() -> None:
    """Imports and registers every loss declared in the ``hf_ext.grpo_losses`` entry-point group."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as error:
            raise RuntimeError(
                f"the GRPO loss plugin {entry.name!r} ({entry.value}, entry-point group {ENTRY_POINT_GROUP}) failed "
                f"to import: {error}"
            ) from error
        register_grpo_loss(cls)


def attach_config(config_cls: type, loss_type_help: Callable[[], str]) -> None:
    """Gives ``config_cls`` the fields of every loss registered now or later; ``loss_type_help()`` is its
    ``loss_type`` help text, rebuilt at each registration."""
    taken = set(config_cls.__dataclass_fields__)
    for settings in dict.fromkeys(cls.settings for cls in _LOSSES.values() if cls.settings is not None):
        clashes = sorted(taken & {f.name for f in dataclasses.fields(settings)})
        check(not clashes, f"{settings.__qualname__} declares {', '.join(clashes)}, already {config_cls.__name__}'s.")
    _CONFIGS.append((config_cls, loss_type_help))
    for cls in _LOSSES.values():
        _extend_config(config_cls, cls.settings, loss_type_help)
    _extend_config(config_cls, None, loss_type_help)


def _settings_fields(cls: type[GRPOLoss]) -> tuple[dataclasses.Field, ...]:
    if cls.settings is None:
        return ()
    if not dataclasses.is_dataclass(cls.settings):
        raise TypeError(f"{cls.__qualname__}.settings must be a dataclass, got {cls.settings!r}.")
    fields = dataclasses.fields(cls.settings)
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(
                f"{cls.settings.__qualname__}.{f.name} needs a default (configs are built field by field)."
            )
        if "help" not in f.metadata:
            raise ValueError(
                f'{cls.settings.__qualname__}.{f.name} needs metadata={{"help": ...}} (the CLI shows it).'
            )
    return fields


def _check_new_fields(cls: type[GRPOLoss], config_cls: type) -> None:
    """Each settings field of ``cls`` is new to ``config_cls`` or was added by the same settings dataclass."""
    for f in _settings_fields(cls):
        owner = _FIELD_OWNERS.get(f.name)
        if owner is cls.settings:
            continue
        if owner is not None or f.name in config_cls.__dataclass_fields__:
            declared = f" (declared by {owner.__qualname__})" if owner is not None else ""
            raise ValueError(
                f"{cls.settings.__qualname__}.{f.name} is already a field of {config_cls.__name__}{declared}: give "
                "the loss's fields a prefix of their own."
            )


def _extend_config(config_cls: type, settings: type | None, loss_type_help: Callable[[], str]) -> None:
    """Adds the fields of the dataclass ``settings`` to the dataclass ``config_cls`` in place: its ``__init__``, field
    table, annotations and class defaults become those of a subclass declaring them, so every existing reference to
    the class sees the new fields. Then rebuilds the ``loss_type`` help."""
    new = (
        [f for f in dataclasses.fields(settings) if f.name not in config_cls.__dataclass_fields__] if settings else []
    )
    if new:
        hints = typing.get_type_hints(settings)  # resolved, as the CLI parser needs them
        specs = [
            (
                f.name,
                hints[f.name],
                dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata),
            )
            for f in new
        ]
        grown = dataclasses.make_dataclass(config_cls.__name__, specs, bases=(config_cls,))
        for attribute in ("__init__", "__repr__", "__eq__", "__match_args__", "__dataclass_fields__"):
            if attribute in grown.__dict__:
                setattr(config_cls, attribute, grown.__dict__[attribute])
        annotations = dict(config_cls.__dict__.get("__annotations__", {}))
        for name, hint, _ in specs:
            annotations[name] = hint
        config_cls.__annotations__ = annotations
        for f in new:
            if f.default is not dataclasses.MISSING:
                setattr(config_cls, f.name, f.default)
    loss_type = config_cls.__dataclass_fields__["loss_type"]
    loss_type.metadata = MappingProxyType({**loss_type.metadata, "help": loss_type_help()})


# Checks the losses share.


def check(condition: bool, message: str) -> None:
    """Raises ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def check_finite(config, name: str, low: float = 0.0, strict: bool = False) -> None:
    """``config.<name>`` is a finite number > ``low`` (``strict``) or >= ``low``."""
    value = getattr(config, name)
    relation = ">" if strict else ">="
    inside = (value > low if strict else value >= low) and value < math.inf
    check(inside, f"{name} must be a finite number {relation} {low:g}, got {value}.")


def check_choice(config, name: str, allowed) -> None:
    value = getattr(config, name)
    check(value in allowed, f"{name}={value!r} is not known; allowed values: {', '.join(allowed)}.")
