"""The reinforcement-learning part of the config tree (`rl:`): how a policy-gradient objective (objectives/policy.py:
grpo, dr_grpo, dapo, rloo) samples, scores and steps. Read only when finetune.objective is one of them; the objective
checks it (ConfigError naming the field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RLConfig:
    """Each rollout: train.global_batch_size x steps_per_rollout completions, group_size per prompt, sampled by the
    model as it is, scored by the rewards, then trained on for ppo_epochs x steps_per_rollout optimizer steps."""

    reward: list[str] = field(default_factory=list)
    """The reward terms, added up: module:function (called as f(prompt, completion, metadata) -> float, the module
    importable from the working directory) or a built-in: exact_match (the answer rl.answer_pattern finds in the
    completion equals the prompt's answer: 1, else 0), format (the completion matches rl.format_pattern: 1, else 0),
    length (minus the completion's tokens over rl.max_new_tokens)."""
    reward_weights: list[float] = field(default_factory=list)
    """A weight per rl.reward term; empty: 1 each."""
    reward_model: str | None = None
    """A reward model (a checkpoint of finetune.objective=reward) whose score of each completion is one more term, run
    on the same ranks beside the policy."""
    reward_model_weight: float = 1.0
    """The reward model's weight in the sum."""
    answer_pattern: str = r"####\s*(\S+)"
    """exact_match: a regex whose first group (or whole match) in the completion's last match is its final answer."""
    format_pattern: str | None = None
    """format: a regex the whole completion (stripped) must match, e.g. '(?s).*#### \\d+'."""
    max_reward_failures: float = 0.1
    """A reward that raises or is not a finite number counts as failed (that completion's advantage is 0); the run stops
    when more than this share of a rollout's completions failed."""
    group_size: int = 8
    """Completions sampled per prompt (G): advantages compare the completions of one prompt."""
    max_new_tokens: int = 64
    """Longest completion; train.seq_len must hold the longest prompt and this."""
    temperature: float = 1.0
    """The policy's temperature: completions are drawn from, and log-probs computed by, softmax(logits / T)."""
    steps_per_rollout: int = 1
    """Optimizer steps (minibatches of train.global_batch_size completions) in one rollout."""
    ppo_epochs: int = 1
    """Passes over a rollout's minibatches; the ratio is to the log-probs the completions were sampled with."""
    clip: float = 0.2
    """PPO's clip: the ratio is kept in [1 - clip, 1 + clip_high]."""
    clip_high: float | None = None
    """The upper clip (DAPO's clip-higher, e.g. 0.28); null: rl.clip."""
    kl_coef: float = 0.0
    """beta: weight of the KL to the reference (the base, with LoRA's adapters off), k3 estimator per token (grpo,
    dr_grpo, dapo) or a penalty on the reward (rloo); 0 needs no reference."""
    ratio: Literal["token", "sequence"] = "token"
    """The importance ratio per token (PPO), or one per completion, the exp of its mean token log-ratio (GSPO)."""
    dynamic_sampling: bool | None = None
    """Drop groups whose rewards are all equal (no signal) and sample more prompts to fill the rollout; null: on for
    dapo."""
    max_sampling_rounds: int = 4
    """Dynamic sampling: rounds of sampling per rollout before the rest is filled with groups of equal rewards."""
    seed: int = 0
    """Seed of the sampling, with the rollout's number (data.seed orders the prompts)."""
