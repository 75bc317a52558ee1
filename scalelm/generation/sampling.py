"""How a next token is picked from a row's logits, and the two log-probabilities reported beside it.

    logits (V,) ─repetition penalty─▶ ─/temperature─▶ ─top-k─▶ ─top-p─▶ ─min-p─▶ softmax ─draw─▶ token
        │                                                                          │
        └ log_softmax ▶ `logprobs`: the model's own, what a trainer recomputes      └ log ▶ `sampling_logprobs`

`logprobs` is the full softmax of the model's logits at temperature 1, untouched by any setting here: the
number a training forward pass gives for the same token after the same text. `sampling_logprobs` is the log of
the distribution the token was drawn from, after the penalty, the temperature and the truncations renormalised
(greedy, temperature 0: the chosen token had probability 1, so 0). Keeping them apart by name is the point: an
RL loss that mixes them up computes a wrong importance ratio.

Each sample draws from its own generator, seeded from (seed, prompt index, sample index), so a seed gives the
same text whatever the batch, the order or the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from scalelm.errors import ConfigError

GREEDY_BELOW = 1e-5  # a temperature under this is greedy


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 (or below 1e-5) picks the most likely token every time (greedy)."""
    top_k: int = 0
    """Draw among the k most likely tokens (and any tied with the k-th); 0: all."""
    top_p: float = 1.0
    """Draw among the most likely tokens whose probabilities add up to p; 1: all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0: none."""
    repetition_penalty: float = 1.0
    """Above 1, tokens already in the prompt or the completion are made less likely (logit / p, or x p below 0)."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Texts that end a sample (it keeps the token that completed one); EOS always does."""
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name, ok, rule in (("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                               ("temperature", self.temperature >= 0, "0 (greedy) or more"),
                               ("top_k", self.top_k >= 0, "0 (off) or more"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
                               ("repetition_penalty", self.repetition_penalty > 0, "above 0 (1 is off)"),
                               ("num_samples", self.num_samples >= 1, "at least 1"),
                               ("seed", self.seed >= 0, "0 or more")):
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)}: use {rule}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that dividing by it would overflow the logits: the most likely token."""
        return self.temperature < GREEDY_BELOW


def seeded(sampling: Sampling, prompt: int, sample: int, device: torch.device) -> torch.Generator:
    """The generator of one sample: the same for (seed, prompt, sample) on any layout, and unlike any other's."""
    seed = np.random.SeedSequence([sampling.seed, prompt, sample]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed) >> 1)


def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (b, V) with the tokens marked in `seen` (b, V bool) made less likely; Hugging Face's rule."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def truncated(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits (b, V) / temperature, with what top-k, top-p and min-p drop set to -inf; temperature > 0."""
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # the mass of the more likely tokens
        drop = (before >= s.top_p).scatter(-1, order, before >= s.top_p)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    if s.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def pick(logits: torch.Tensor, seen: torch.Tensor, s: Sampling,
         generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (b,), logprobs (b,), sampling_logprobs (b,)) from fp32 logits (b, V) over the real vocabulary."""
    logprobs = logits.log_softmax(-1)
    adjusted = penalised(logits, seen, s.repetition_penalty)
    if s.greedy:
        tokens = adjusted.argmax(-1)
        return tokens, logprobs.gather(-1, tokens[:, None])[:, 0], torch.zeros_like(tokens, dtype=logits.dtype)
    drawn_from = truncated(adjusted, s).log_softmax(-1)
    probs = drawn_from.exp()
    tokens = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0], drawn_from.gather(-1, tokens[:, None])[:, 0]
