"""A tiny Qwen2 causal LM (about 70 k parameters) and a byte-level BPE Qwen2 tokenizer over 16 letters.

The tokenizer is a real ``Qwen2Tokenizer`` (Qwen's pre-tokenizer and byte-level decoder) whose vocabulary is the
letters "a".."p", each also with its leading space ("Ġa"), so ``AutoTokenizer`` reloads it as the same class.
Both are deterministic functions of the code: the same seed gives the same weights on every machine and
process. ``materialize_model`` writes them with ``save_pretrained`` so every loader (TRL, PEFT,
``from_pretrained``) sees an ordinary local checkpoint, exactly as it would a Hub model.
"""

import hashlib
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_model
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from hf_ext.cache import cache_root


EMBEDDED_MODEL = "embedded:tiny-qwen2"
ALPHABET = tuple(chr(ord("a") + i) for i in range(16))  # the task counts through these, cyclically
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"
BYTE_LEVEL_SPACE = "\u0120"  # "Ġ": how byte-level BPE writes a leading space
MODEL_SEED = 0


def build_tokenizer() -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE tokenizer: each letter is one token, with or without its leading space."""
    spaced = [BYTE_LEVEL_SPACE + letter for letter in ALPHABET]
    vocab = {token: i for i, token in enumerate([PAD_TOKEN, EOS_TOKEN, BYTE_LEVEL_SPACE, *ALPHABET, *spaced])}
    merges = [(BYTE_LEVEL_SPACE, letter) for letter in ALPHABET]
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left"
    )


def build_tiny_model(tokenizer: Qwen2Tokenizer | None = None, seed: int = MODEL_SEED) -> Qwen2ForCausalLM:
    tokenizer = tokenizer or build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def default_cache_dir() -> Path:
    return cache_root() / "embedded"


def build_fingerprint() -> str:
    """12 hex digits naming what builds the checkpoint: this module's code (architecture, vocabulary, seed) and the
    torch and transformers versions (initialisation and file format); a cached copy is reused only when they match."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()[:12]


def materialize_model(directory: str | os.PathLike | None = None) -> Path:
    """Save the tiny model and tokenizer to ``directory`` (default: the hf_ext cache, keyed by ``build_fingerprint``)
    and return its path.

    Safe to call from several processes at once: each writes to a private folder, then renames it into place.
    Weights are written with safetensors directly, because ``save_pretrained`` writes them on distributed rank 0
    only and every rank here may be the one whose copy lands.
    """
    target = Path(directory) if directory is not None else default_cache_dir() / f"tiny-qwen2-{build_fingerprint()}"
    if (target / "config.json").exists():
        return target
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process got there first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def resolve_model(name_or_path: str) -> str:
    """Map ``EMBEDDED_MODEL`` to its materialised local path; any other name (Hub id or path) passes through."""
    return str(materialize_model()) if name_or_path == EMBEDDED_MODEL else name_or_path
