"""The embedded task: continue the alphabet.

A prompt is three consecutive letters of a 16-letter cyclic alphabet ("c d e"); the right completion is the next
four ("f g h i") and then end-of-sequence. The reward is verifiable and dense: a letter earns credit when it is the
successor of the letter before it (the prompt's last letter for the first one), the credit is summed over the first
four letters and divided by the completion's length when that is longer than four, so a policy is paid both for
counting correctly and for stopping on time. 1.0 exactly for the target; about 0.05 for a uniformly random policy.
"""

import random

from datasets import Dataset

from .model import ALPHABET


EMBEDDED_TASK = "embedded:count"
PROMPT_LETTERS = 3
TARGET_LETTERS = 4


def _count_from(start: int, n: int) -> str:
    return " ".join(ALPHABET[(start + k) % len(ALPHABET)] for k in range(n))


def count_dataset(num_examples: int = 512, seed: int = 0) -> Dataset:
    """Prompts ("prompt") with their target continuation ("target"), in TRL's standard prompt-only format."""
    rng = random.Random(seed)
    starts = [rng.randrange(len(ALPHABET)) for _ in range(num_examples)]
    return Dataset.from_dict(
        {
            "prompt": [_count_from(s, PROMPT_LETTERS) for s in starts],
            "target": [_count_from(s + PROMPT_LETTERS, TARGET_LETTERS) for s in starts],
        }
    )


def count_sft_dataset(num_examples: int = 512, seed: int = 0) -> Dataset:
    """The same task for supervised fine-tuning: prompt ("c d e") and its completion (" f g h i"), TRL's format."""
    examples = count_dataset(num_examples, seed)
    return Dataset.from_dict({"prompt": examples["prompt"], "completion": [" " + t for t in examples["target"]]})


def _successor(letter: str) -> str | None:
    return ALPHABET[(ALPHABET.index(letter) + 1) % len(ALPHABET)] if letter in ALPHABET else None


def count_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """(number of the first four letters that follow their predecessor) / max(4, letters produced), in [0, 1]."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        produced = completion.split()
        previous = [prompt.split()[-1], *produced]
        pairs = zip(previous, produced[:TARGET_LETTERS], strict=False)  # previous is one longer
        hits = sum(_successor(before) == letter for before, letter in pairs)
        rewards.append(hits / max(TARGET_LETTERS, len(produced)))
    return rewards
