"""The embedded default: tokenizer, tiny model and the alphabet task, all built from code, never downloaded."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Tokenizer

from hf_ext.embedded import (
    EMBEDDED_MODEL,
    build_tiny_model,
    build_tokenizer,
    count_dataset,
    count_reward,
    materialize_model,
    resolve_model,
)


def test_tokenizer_reloads_as_qwen2_and_round_trips_text():
    path = materialize_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(tokenizer, Qwen2Tokenizer)
    ids = tokenizer("c d e").input_ids
    assert len(ids) == 3  # one token per letter, the space folded into the token
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "c d e"
    assert tokenizer.decode(tokenizer(" f g", add_special_tokens=False).input_ids).split() == ["f", "g"]


def test_model_is_deterministic_and_tiny():
    first, second = build_tiny_model(), build_tiny_model()
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sum(p.numel() for p in first.parameters()) < 200_000


def test_materialized_checkpoint_loads_with_from_pretrained():
    path = materialize_model()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    reference = build_tiny_model(build_tokenizer())
    ids = torch.tensor([[3, 20, 21]])
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)


def test_cache_is_keyed_by_what_builds_the_model(monkeypatch, tmp_path):
    """A checkpoint left by another build (older code or library versions) in the same cache is never reused."""
    from hf_ext.embedded import model as embedded_model

    monkeypatch.setenv("HF_EXT_CACHE", str(tmp_path))
    fresh = materialize_model()
    assert fresh.parent == tmp_path / "embedded" and fresh.name.endswith(embedded_model.build_fingerprint())
    monkeypatch.setattr(embedded_model.transformers, "__version__", "0.0.1")
    rebuilt = materialize_model()
    assert rebuilt != fresh and (rebuilt / "config.json").exists()
    stale = (fresh / "model.safetensors").read_bytes()
    monkeypatch.setattr(embedded_model, "__file__", str(tmp_path / "edited_model.py"))
    (tmp_path / "edited_model.py").write_text("# the builder's code changed\n")
    assert materialize_model() not in (fresh, rebuilt)
    assert (fresh / "model.safetensors").read_bytes() == stale  # other builds' copies are left alone


def test_resolve_model_only_rewrites_the_embedded_name():
    assert resolve_model(EMBEDDED_MODEL) == str(materialize_model())
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_dataset_is_seeded_and_consistent():
    dataset = count_dataset(16, seed=3)
    assert dataset[:] == count_dataset(16, seed=3)[:]
    for prompt, target in zip(dataset["prompt"], dataset["target"], strict=True):
        assert count_reward([prompt], [" " + target])[0] == 1.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("f g h i", 1.0),  # the target
        ("f g h i j k l m", 0.5),  # right letters, no stop: 4 / 8
        ("f g x y", 0.5),  # "x" is no letter of the alphabet
        ("g h i j", 0.75),  # wrong first letter, then each follows its predecessor
        ("p a", 0.25),  # "p" does not follow "e"; "a" follows "p" (the alphabet is cyclic): 1 / 4
        ("", 0.0),
    ],
)
def test_reward_hand_values(completion, expected):
    assert count_reward(["c d e"], [completion]) == [pytest.approx(expected)]
