"""Reward functions the RL tests name as rl.reward=tests.helpers.rewards:NAME (module:function)."""

import math
import zlib


def letter_e(prompt, completion, metadata):
    """The share of the completion's letters that are an 'e': a reward a tiny model learns in a few steps (its
    completions move to pieces rich in e), whose mean at random is about 0.06 on the test corpus."""
    text = completion.replace(" ", "")
    return text.count("e") / max(len(text), 1)


def always_fails(prompt, completion, metadata):
    """A reward whose lookup fails for every sample."""
    raise KeyError("no such entry")


def nan_for_some(prompt, completion, metadata):
    """letter_e, but NaN for about half the completions (by a checksum of their text, the same on any rank)."""
    return math.nan if zlib.crc32(completion.encode()) % 2 else letter_e(prompt, completion, metadata)


def flat_below_20(prompt, completion, metadata):
    """1 for every completion of a prompt whose number is under 20 (a group with nothing to learn), else letter_e."""
    return 1.0 if int(metadata["answer"]) < 20 else letter_e(prompt, completion, metadata)
