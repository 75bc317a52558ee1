"""`generate(engine, prompts, sampling) -> Rollouts`: samples from the model an engine holds, as it is now, on the
layout it trains on. What a trainer (RL), an evaluation or `scalelm generate` calls.

    prompts × num_samples ─split over data-parallel ranks─▶ batches of `batch_size` ─decode.py─▶ gathered in order

Each data-parallel group decodes its share; the tensor ranks of a group decode the same rows together (their
heads and vocabulary split) and pick the same tokens (the logits they pick from are gathered, the generators
seeded alike); its pipeline stages pass each step's hidden state on, and the last tells the others the tokens.
The results are gathered on every rank, in (prompt, sample) order. Under ZeRO-3 the weights are gathered whole for
the duration (compat.zero3_whole): each data-parallel rank then decodes for its own number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from scalelm import compat
from scalelm.errors import ConfigError
from scalelm.generation.decode import Completion, Stage, decode
from scalelm.generation.sampling import Sampling
from scalelm.objectives import registry
from scalelm.parallel.topology import gather_objects


@dataclass
class Rollouts:
    """Samples in (prompt, sample) order, as padded tensors, n = prompts × num_samples, T = the longest completion:

    prompt_index (n,)         the prompt each sample continues
    input_ids (n, P + T)      prompt and completion, right-padded with 0
    prompt_lengths (n,)       where the completion starts in its row
    completion_mask (n, T)    1 on the completion's tokens
    logprobs (n, T)           the model's log p of each completion token (full softmax, temperature 1); 0 past the end
    sampling_logprobs (n, T)  the log p it was drawn with (after the sampling settings); 0 past the end
    finish                    per sample: "stop" (EOS or a stop text) or "length"
    """

    prompt_index: torch.Tensor
    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    sampling_logprobs: torch.Tensor
    finish: list[str]

    def completion(self, i: int) -> list[int]:
        start = int(self.prompt_lengths[i])
        return self.input_ids[i, start:start + int(self.completion_mask[i].sum())].tolist()


def generate(engine, prompts: list[list[int]], sampling: Sampling, eos: set[int], context: int,
             stopped: Callable[[list[int]], bool] | None = None, batch_size: int = 32) -> Rollouts:
    """Samples of every prompt (token ids) from `engine`'s model (parallel/engine.py), its weights untouched; on every
    rank. `context`: the model's longest sequence (a prompt must leave room for one token); `stopped`: whether a
    completion's tokens have produced a stop text. Collective."""
    layout = engine.layout
    if not registry.generates(engine.objective.name):
        raise ConfigError(f"the model ends in a classification head ({engine.objective.name}): it scores text and "
                          f"generates none")
    for i, prompt in enumerate(prompts):
        if not prompt or len(prompt) >= context:
            raise ConfigError(f"prompt {i} is {len(prompt)} tokens: a prompt needs 1 to {context - 1} "
                              f"(the model's context is {context})")
    model = engine.module
    stage, training = Stage.of(model), model.training
    if stage.vocabulary is not None and any(not 0 <= i < stage.vocabulary for prompt in prompts for i in prompt):
        raise ConfigError(f"a prompt holds a token id outside the model's vocabulary of {stage.vocabulary}")
    work = [(p, s) for p in range(len(prompts)) for s in range(sampling.num_samples)]
    mine = work[layout.dp_rank::layout.data]
    groups = [mine] if stage.masks else [  # without masks, no padding: batches of prompts of one length
        [w for w in mine if len(prompts[w[0]]) == n] for n in sorted({len(prompts[p]) for p, _ in mine})]
    batches = [group[start:start + batch_size] for group in groups for start in range(0, len(group), batch_size)]
    model.eval()
    try:
        with compat.sequence_parallel_off(model), compat.zero3_whole(model, engine.optimizer):
            done = [c for batch in batches for c in decode(stage, context, prompts, batch, sampling, eos, stopped)]
    finally:
        model.train(training)
    first_of_group = layout.tp_rank == 0 and stage.last  # every tensor rank and stage of a group has the same samples
    everyone = gather_objects(done if first_of_group else None)
    completions = sorted((c for part in everyone if part for c in part), key=lambda c: (c.prompt, c.sample))
    return _padded(prompts, completions)


def _padded(prompts: list[list[int]], completions: list[Completion]) -> Rollouts:
    n = len(completions)
    longest = max(len(c.token_ids) for c in completions)
    ids = torch.zeros(n, max(len(p) for p in prompts) + longest, dtype=torch.long)
    mask = torch.zeros(n, longest, dtype=torch.long)
    logprobs, sampling_logprobs = torch.zeros(n, longest), torch.zeros(n, longest)
    for i, c in enumerate(completions):
        prompt, k = prompts[c.prompt], len(c.token_ids)
        ids[i, :len(prompt) + k] = torch.tensor(prompt + c.token_ids)
        mask[i, :k] = 1
        logprobs[i, :k] = torch.tensor(c.logprobs)
        sampling_logprobs[i, :k] = torch.tensor(c.sampling_logprobs)
    return Rollouts(torch.tensor([c.prompt for c in completions]), ids,
                    torch.tensor([len(prompts[c.prompt]) for c in completions]), mask, logprobs, sampling_logprobs,
                    [c.finish for c in completions])
