"""Contract tests for what hf_ext.peft.peft_compat takes from PEFT beyond its documented API (and for the documented
``lora_variants`` hook): each checks that the upstream symbol is still there and behaves as hf_ext relies on, and
fails with a message naming it."""

import copy
import importlib
import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import DoraCaching
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_ext.peft.peft_compat import (
    DoraVariantFromMapping,
    base_layer_of,
    dora_cached_weight_norm,
    layer_variants,
    linear_layer_kwargs,
    register_layer_factory,
)


def upstream(path: str):
    """The object at dotted ``path`` (a module, then attributes), or a test failure naming it."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for depth, name in enumerate(parts[split:], start=split + 1):
            if not hasattr(obj, name):
                pytest.fail(f"{'.'.join(parts[:depth])} is gone (hf_ext relies on {path})")
            obj = getattr(obj, name)
        return obj
    pytest.fail(f"{path} is gone: no module of it imports")


def changed(symbol: str, detail: str) -> str:
    """The failure message of a contract test."""
    return f"{symbol} changed: {detail}"


def lora_linear(layer_cls=None, base=None, **config):
    """A PEFT LoRA ``Linear`` (or ``layer_cls``) on a fresh 6 -> 4 ``nn.Linear`` (or ``base``)."""
    torch.manual_seed(0)
    layer_cls = layer_cls or upstream("peft.tuners.lora.Linear")
    base = base if base is not None else nn.Linear(6, 4)
    return layer_cls(base, "default", config=LoraConfig(**config), r=2, lora_alpha=4)


# ---------------------------------------------------------------- variants


def test_lora_variants_property_chooses_the_variant():
    symbol = "peft.tuners.lora.LoraLayer.lora_variants"
    linear_cls = upstream("peft.tuners.lora.Linear")
    dora = upstream("peft.tuners.lora.variants.DoraLinearVariant")
    assert isinstance(inspect.getattr_static(upstream("peft.tuners.lora.LoraLayer"), "lora_variants"), property), (
        changed(symbol, "no longer a property")
    )
    mapping = lora_linear().lora_variants
    assert mapping.get(()) is None and mapping.get(("use_dora",)) is dora, changed(
        "peft.tuners.lora.Linear.lora_variants", f"no () -> None, ('use_dora',) -> DoraLinearVariant: {mapping}"
    )

    class Marker(dora):
        pass

    class PlainMarker(upstream("peft.tuners.lora.layer.LoraVariant")):
        @staticmethod
        def init(module, adapter_name, **kwargs):
            pass

    class Overridden(linear_cls):
        @property
        def lora_variants(self):
            return {(): PlainMarker, ("use_dora",): Marker}

    for config, expected in (({"use_dora": True}, Marker), ({}, PlainMarker)):
        variant = lora_linear(Overridden, **config).lora_variant.get("default")
        assert type(variant) is expected, changed(symbol, f"an override is not used for {config}: got {variant}")


def test_lora_variant_interface_and_forward_call():
    symbol = "peft.tuners.lora.layer.LoraVariant"
    variant_cls = upstream(symbol)
    for name in ("init", "merge_safe", "merge_unsafe", "unmerge", "forward"):
        assert isinstance(inspect.getattr_static(variant_cls, name, None), staticmethod), changed(
            f"{symbol}.{name}", "no longer a staticmethod"
        )
    parameters = inspect.signature(variant_cls.forward).parameters
    assert list(parameters)[:4] == ["module", "active_adapter", "x", "result"], changed(
        f"{symbol}.forward", f"parameters are {list(parameters)}"
    )
    assert any(p.kind is p.VAR_KEYWORD for p in parameters.values()), changed(f"{symbol}.forward", "no **kwargs")

    seen = {}

    class Recording(variant_cls):
        @staticmethod
        def init(module, adapter_name, **kwargs):
            pass

        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            seen.update(adapter=active_adapter, x=x, result=result)
            return result

    class Layer(upstream("peft.tuners.lora.Linear")):
        @property
        def lora_variants(self):
            return {(): Recording}

    layer = lora_linear(Layer)
    x = torch.randn(3, 6)
    out = layer(x)
    assert seen["adapter"] == "default" and torch.equal(seen["x"], x), changed(
        "peft.tuners.lora.Linear.forward", "the variant's forward no longer gets the adapter name and the input"
    )
    assert torch.equal(seen["result"], layer.get_base_layer()(x)) and torch.equal(out, seen["result"]), changed(
        "peft.tuners.lora.Linear.forward", "result is no longer the base layer's output, or the variant's is not used"
    )


def test_dora_linear_variant_builds_the_magnitude_the_fast_variant_reads():
    symbol = "peft.tuners.lora.variants.DoraLinearVariant"
    dora = upstream(symbol)
    assert issubclass(dora, upstream("peft.tuners.lora.layer.LoraVariant")), changed(symbol, "not a LoraVariant")
    layer = lora_linear(use_dora=True, init_lora_weights=False)
    assert type(layer.lora_variant["default"]) is dora, changed(symbol, "no longer the linear layer's DoRA variant")
    magnitude = layer.lora_magnitude_vector["default"]
    base = layer.get_base_layer().weight
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert isinstance(magnitude.weight, nn.Parameter) and magnitude.weight.shape == (4,), changed(
        f"{symbol}.init", "lora_magnitude_vector[adapter].weight is no longer a (d_out,) parameter"
    )
    torch.testing.assert_close(
        magnitude.weight.detach(),
        (base + delta).norm(dim=1),
        msg=lambda m: changed(f"{symbol}.init", f"the magnitude is no longer ||W + s B A|| per row: {m}"),
    )


@pytest.mark.parametrize("name", ["Linear4bit", "Linear8bitLt"])
def test_bnb_lora_layers_resolve_their_variant_in_code(name):
    symbol = f"peft.tuners.lora.bnb.{name}.resolve_lora_variant"
    import bitsandbytes as bnb

    layer_cls = upstream(f"peft.tuners.lora.{name}")
    method = inspect.getattr_static(layer_cls, "resolve_lora_variant", None)
    assert method is not None, changed(symbol, "the layer no longer defines it")
    config = inspect.signature(method).parameters.get("config")
    assert config is not None and config.kind is config.KEYWORD_ONLY, changed(symbol, "no keyword-only config")

    def base():
        torch.manual_seed(0)
        if name == "Linear4bit":
            layer = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32)
        else:
            layer = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False, threshold=0.0)
        return layer.to("cpu")

    dora = upstream("peft.tuners.lora.variants.DoraLinearVariant")
    variant = lora_linear(layer_cls, base(), use_dora=True).lora_variant.get("default")
    assert type(variant) is dora, changed(symbol, f"use_dora=True resolves to {variant}, not DoraLinearVariant")
    assert "default" not in lora_linear(layer_cls, base()).lora_variant, changed(symbol, "plain LoRA gets a variant")

    class Marker(dora):
        pass

    class Mapped(DoraVariantFromMapping, layer_cls):
        @property
        def lora_variants(self):
            return {**super().lora_variants, ("use_dora",): Marker}

    variant = lora_linear(Mapped, base(), use_dora=True).lora_variant.get("default")
    assert type(variant) is Marker, changed(symbol, f"overriding it no longer sets the layer's variant: {variant}")


# ---------------------------------------------------------------- dispatch


class Flagged(nn.Module):
    """A linear, an embedding and an inner module, flagged as a 4-bit model the way transformers flags one."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)
        self.embed = nn.Embedding(10, 6)
        self.is_loaded_in_4bit = True

    def forward(self, ids):
        return self.proj(self.embed(ids))


def test_custom_module_registration_runs_first_for_every_target_and_none_falls_through():
    symbol = "peft.LoraConfig._register_custom_module"
    assert callable(getattr(LoraConfig, "_register_custom_module", None)), changed(symbol, "no such method")
    calls = []
    custom_linear = upstream("peft.tuners.lora.Linear")

    def factory(target, adapter_name, config, **kwargs):
        calls.append((type(base_layer_of(target)), adapter_name, config, kwargs))
        if isinstance(target, nn.Linear):
            return custom_linear(target, adapter_name, config=config, **kwargs)
        return None

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "embed"])
    register_layer_factory(config, factory)
    assert "_custom_modules" not in config.to_dict(), changed(symbol, "the registration is serialized")
    model = get_peft_model(Flagged(), config)
    dispatch = "peft.tuners.lora.model.LoraModel._create_new_module"
    assert sorted(c[0].__name__ for c in calls) == ["Embedding", "Linear"], changed(
        dispatch, f"an nn.Module key no longer sees every target: {calls}"
    )
    for _, adapter_name, passed_config, kwargs in calls:
        assert adapter_name == "default" and isinstance(passed_config, LoraConfig), changed(
            dispatch, "the factory is no longer called as factory(target, adapter_name, config=config, ...)"
        )
        assert kwargs.get("loaded_in_4bit") is True and kwargs.get("loaded_in_8bit") is False, changed(
            dispatch, f"the factory no longer gets loaded_in_4bit / loaded_in_8bit: {sorted(kwargs)}"
        )
        assert kwargs.get("r") == 2 and kwargs.get("lora_alpha") == 4, changed(dispatch, "no r / lora_alpha")
    embed = model.base_model.model.embed
    assert type(embed) is upstream("peft.tuners.lora.Embedding"), changed(
        dispatch, f"a None from the factory no longer leaves the target to PEFT's dispatchers: {type(embed)}"
    )


def test_custom_modules_registered_earlier_take_precedence():
    dispatch = "peft.tuners.lora.model.LoraModel._create_new_module"
    linear_cls = upstream("peft.tuners.lora.Linear")
    used = []

    def first(target, adapter_name, config, **kwargs):
        used.append("first")
        return linear_cls(target, adapter_name, config=config, **kwargs)

    def catch_all(target, adapter_name, config, **kwargs):
        used.append("catch_all")
        return None

    config = LoraConfig(r=2, target_modules=["proj"])
    config._register_custom_module({nn.Linear: first})
    register_layer_factory(config, catch_all)
    get_peft_model(Flagged(), config)
    assert used == ["first"], changed(dispatch, f"custom modules are no longer tried in registration order: {used}")


def dispatched_and_ours(base, fan_in_fan_out: bool):
    """PEFT's ``dispatch_default`` layer and a LoRA ``Linear`` built with ``linear_layer_kwargs``, with warnings."""
    dispatch_default = upstream("peft.tuners.lora.layer.dispatch_default")
    linear_cls = upstream("peft.tuners.lora.Linear")
    built = []
    for make in (
        lambda config: dispatch_default(copy.deepcopy(base), "default", config, r=2, lora_alpha=4),
        lambda config: linear_cls(
            copy.deepcopy(base), "default", config=config, **linear_layer_kwargs(base, config, dict(r=2, lora_alpha=4))
        ),
    ):
        config = LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=fan_in_fan_out)
        with pytest.warns(UserWarning) as record:
            layer = make(config)
        built.append((layer, config.fan_in_fan_out, [str(w.message) for w in record if "fan_in_fan_out" in str(w)]))
    return built


@pytest.mark.parametrize(("base", "fan_in_fan_out"), [(nn.Linear(6, 4), True), (Conv1D(4, 6), False)])
def test_dispatch_default_linear_and_conv1d_handling_matches(base, fan_in_fan_out):
    symbol = "peft.tuners.lora.layer.dispatch_default"
    (theirs, their_fan, their_warnings), (ours, our_fan, our_warnings) = dispatched_and_ours(base, fan_in_fan_out)
    assert type(theirs) is upstream("peft.tuners.lora.Linear"), changed(symbol, f"builds {type(theirs)}")
    assert (their_fan, theirs.fan_in_fan_out) == (our_fan, ours.fan_in_fan_out) == (not fan_in_fan_out,) * 2, changed(
        symbol, f"fan_in_fan_out handling: PEFT {their_fan}, hf_ext {our_fan}"
    )
    assert theirs.is_target_conv_1d_layer == ours.is_target_conv_1d_layer == isinstance(base, Conv1D), changed(
        symbol, "is_target_conv_1d_layer"
    )
    assert len(their_warnings) == len(our_warnings) == 1, changed(symbol, f"warnings {their_warnings}")


def layer_settings(layer: nn.Module) -> dict:
    """A LoRA layer's plain attributes (variants by type), for comparing how two layers were built."""
    settings = {}
    for name, value in vars(layer).items():
        if name.startswith("_") or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        settings[name] = {k: type(v) for k, v in value.items()} if name == "lora_variant" else value
    return settings


@pytest.mark.parametrize("name", ["4bit", "8bit"])
def test_bnb_dispatch_settings_do_not_reach_peft_bnb_layers(name):
    """PEFT's bnb dispatchers add settings read from the bnb layer; hf_ext builds its layers without them."""
    import bitsandbytes as bnb

    symbol = f"peft.tuners.lora.bnb.dispatch_bnb_{name}"
    dispatcher = upstream(symbol)
    layer_cls = upstream(f"peft.tuners.lora.{'Linear4bit' if name == '4bit' else 'Linear8bitLt'}")

    def base():
        torch.manual_seed(0)
        if name == "4bit":
            layer = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32)
        else:
            layer = bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False, threshold=0.0)
        return layer.to("cpu")

    config = LoraConfig(r=2, lora_alpha=4, use_dora=True)
    common = {"r": 2, "lora_alpha": 4, f"loaded_in_{name}": True}
    theirs = dispatcher(base(), "default", config=copy.deepcopy(config), **common)
    ours = layer_cls(base(), "default", config=copy.deepcopy(config), **common)
    assert type(theirs) is layer_cls, changed(symbol, f"builds {type(theirs)}")
    assert layer_settings(theirs) == layer_settings(ours), changed(
        f"peft.tuners.lora.{layer_cls.__name__}.__init__",
        "the settings PEFT's bnb dispatcher adds now change the layer",
    )


def test_base_layer_of_unwraps_tuner_layers():
    symbol = "peft.tuners.tuners_utils.BaseTunerLayer.get_base_layer"
    base = nn.Linear(6, 4)
    wrapped = lora_linear(base=base)
    assert base_layer_of(wrapped) is base, changed(symbol, "no longer returns the wrapped layer")
    assert base_layer_of(base) is base


# ---------------------------------------------------------------- the DoRA cache


def test_dora_cache_decorator_keeps_values_in_eval_under_dora_caching_only():
    symbol = "peft.tuners.lora.dora.cache_decorator"
    upstream(symbol)
    layer = lora_linear(use_dora=True, init_lora_weights=False).eval()
    magnitude = layer.lora_magnitude_vector["default"]
    assert isinstance(getattr(magnitude, "_dora_cache", None), dict), changed(
        "peft.tuners.lora.dora.DoraLinearLayer._dora_cache", "no such dict"
    )
    with DoraCaching(), torch.no_grad():
        layer(torch.randn(2, 6))  # PEFT's own DoRA stores its norm under the key hf_ext shares
    assert "weight-norm-default" in magnitude._dora_cache, changed(
        symbol, f"PEFT's weight-norm key is no longer 'weight-norm-<adapter>': {list(magnitude._dora_cache)}"
    )
    computed = []

    def compute():
        computed.append(1)
        return torch.full((4,), float(len(computed)))

    magnitude._dora_cache.clear()
    with DoraCaching():
        first = dora_cached_weight_norm(magnitude, "default", compute)
        again = dora_cached_weight_norm(magnitude, "default", compute)
    assert len(computed) == 1 and again is first, changed(symbol, "no caching under DoraCaching in eval mode")
    assert magnitude._dora_cache.get("weight-norm-default") is first, changed(symbol, "not stored under PEFT's key")
    dora_cached_weight_norm(magnitude, "default", compute)
    assert len(computed) == 2 and not magnitude._dora_cache, changed(symbol, "cache not bypassed and cleared when off")
    magnitude.train()
    with DoraCaching():
        dora_cached_weight_norm(magnitude, "default", compute)
    assert len(computed) == 3 and not magnitude._dora_cache, changed(symbol, "cache used in training mode")


def test_layer_variants_is_the_live_map_the_forward_runs():
    symbol = "peft.tuners.lora.LoraLayer.lora_variant"
    dora = upstream("peft.tuners.lora.variants.DoraLinearVariant")
    calls = []

    class Spy(dora):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            calls.append(active_adapter)
            return result

    layer = lora_linear(use_dora=True)
    variants = layer_variants(layer)
    assert type(variants.get("default")) is dora, changed(symbol, f"holds {variants} for a DoRA adapter")
    variants["default"] = Spy()
    layer(torch.randn(3, 6))
    assert calls == ["default"], changed(symbol, "assigning an entry does not change the variant the forward runs")
    assert layer_variants(nn.Linear(2, 2)) == {}
