"""The rewards of completions (rl.reward): Python functions named module:function, and built-ins, added up with
rl.reward_weights.

    f(prompt, completion, metadata) -> float     prompt: its text, or its messages [{role, content}] for a chat
                                                 prompt; completion: the sampled text (without EOS); metadata: the
                                                 prompt's metadata, with its "answer" when it has one
    exact_match     1 when the completion's final answer (rl.answer_pattern's last match) equals metadata["answer"]
                    (as numbers when both are), else 0
    format          1 when the stripped completion matches rl.format_pattern whole, else 0
    length          minus the completion's tokens over rl.max_new_tokens

A term that raises, or returns something that is not a finite number, fails that completion: its reward is NaN
(the objective gives it no advantage) and the error is kept for the report. A function that cannot be found is a
ConfigError when the run is checked, before any rank starts.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from scalelm.errors import ConfigError

Reward = Callable[["Sample"], float]  # a term, on one sample


@dataclass
class Sample:
    """What a reward sees of one completion."""

    prompt: str | list[dict]
    completion: str
    metadata: dict
    tokens: int  # the completion's length in tokens


@dataclass
class Scores:
    """Rewards of a list of samples: NaN where one failed, with the first errors (sample index, message)."""

    rewards: list[float]
    errors: list[tuple[int, str]] = field(default_factory=list)


class Rewards:
    """The config's reward terms, resolved: call it on samples."""

    def __init__(self, rl):
        self.terms = [(term, resolve(term, rl)) for term in rl.reward]
        self.weights = rl.reward_weights or [1.0] * len(self.terms)

    def __call__(self, samples: list[Sample], first: int = 0) -> Scores:
        """Scores of `samples`; error indices count from `first`."""
        rewards, errors = [], []
        for i, sample in enumerate(samples):
            total = 0.0
            for (term, fn), weight in zip(self.terms, self.weights):
                try:
                    value = float(fn(sample))
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}")
                except Exception as e:  # noqa: BLE001  a user's function may fail any way: count it, go on
                    errors.append((first + i, f"{term}: {type(e).__name__}: {' '.join(str(e).split())}"[:300]))
                    total = math.nan
                    break
                total += weight * value
            rewards.append(total)
        return Scores(rewards, errors)


def resolve(term: str, rl) -> Reward:
    """The function of one rl.reward term; ConfigError naming it when it cannot be found."""
    if ":" not in term:
        built = BUILT_IN.get(term)
        if built is None:
            close = difflib.get_close_matches(term, sorted(BUILT_IN), n=1)
            raise ConfigError(f"rl.reward={term!r} is no built-in reward ({', '.join(sorted(BUILT_IN))})"
                              + (f": did you mean {close[0]}?" if close else " and not module:function"))
        return built(rl)
    module_name, _, name = term.partition(":")
    if os.getcwd() not in sys.path:  # the working directory's modules, as `python -m` would find them
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  ImportError, or the module's own error while importing
        raise ConfigError(f"rl.reward={term}: cannot import {module_name} ({type(e).__name__}: "
                          f"{' '.join(str(e).split())}): the module must be importable from the working directory "
                          f"({os.getcwd()}) or PYTHONPATH") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"rl.reward={term}: {module_name} has no function {name!r}"
                          + (f" ({getattr(module, '__file__', '')})" if getattr(module, "__file__", None) else ""))
    return lambda sample: fn(sample.prompt, sample.completion, sample.metadata)


def _exact_match(rl) -> Reward:
    try:
        pattern = re.compile(rl.answer_pattern)
    except re.error as e:
        raise ConfigError(f"rl.answer_pattern={rl.answer_pattern!r} is not a regex ({e})") from None

    def exact_match(sample: Sample) -> float:
        if sample.metadata.get("answer") is None:
            raise ValueError("the prompt has no answer to match (give each prompt an \"answer\")")
        found = list(pattern.finditer(sample.completion))
        if not found:
            return 0.0
        answer = (found[-1].group(1) if pattern.groups else found[-1].group(0)).strip()
        return float(_same(answer, str(sample.metadata["answer"]).strip()))

    return exact_match


def _format(rl) -> Reward:
    if not rl.format_pattern:
        raise ConfigError("rl.reward names format, and rl.format_pattern is not set: give the regex a completion must "
                          "match, e.g. rl.format_pattern='(?s).*#### \\d+'")
    try:
        pattern = re.compile(rl.format_pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"rl.format_pattern={rl.format_pattern!r} is not a regex ({e})") from None
    return lambda sample: float(pattern.fullmatch(sample.completion.strip()) is not None)


def _length(rl) -> Reward:
    return lambda sample: -sample.tokens / rl.max_new_tokens


def _same(found: str, answer: str) -> bool:
    try:
        return float(found.replace(",", "")) == float(answer.replace(",", ""))
    except ValueError:
        return found == answer


BUILT_IN: dict[str, Callable[..., Reward]] = {"exact_match": _exact_match, "format": _format, "length": _length}
