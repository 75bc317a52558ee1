"""The rollout source: the batch source (train/sources.py) of a policy-gradient objective (objectives/policy.py). It
holds the engine and samples from it.

    prompts ─take P─▶ generate G each (generation/rollouts.py, the weights as they are, on the training layout)
        ─▶ rewards (rl/rewards.py; split over every rank, gathered) ─▶ advantages by group (the objective's)
        ─▶ rows of prompt + completion, cut into rl.steps_per_rollout minibatches of train.global_batch_size
        ─▶ each optimizer step takes the next minibatch, rl.ppo_epochs times over, then a new rollout is sampled

A rollout holds train.global_batch_size x rl.steps_per_rollout completions, P = that / G prompts. Every rank samples
the same rollout (generate gathers it everywhere) and takes its own rows of each minibatch: data-parallel rank d the
d-th block of micro_batch_size x accumulation rows. A row's targets (loss_mask) are its completion's tokens; it carries
the log-prob each was sampled with (old_logps; the policy's, softmax(logits / T), the same number the trainer
computes), its completion's advantage and, with rl.kl_coef, the reference's log-probs (rl/reference.py: the model with its
LoRA adapters off, or train.init_from's weights in a second engine), made once per rollout; rloo takes the KL off
its rewards instead.

Dynamic sampling (DAPO's, rl.dynamic_sampling) drops groups whose rewards are all equal, which carry no signal, and
samples more prompts until the rollout is full, at most rl.max_sampling_rounds times; the rest is filled with dropped
groups (they weigh in the loss's denominator, with no gradient).

Resuming: the state is the prompts' position, the rollouts sampled so far (which seed the next) and the rollout in
use with the steps taken from it: its completions, their sampling log-probs and advantages (once, in data-parallel
rank 0's state), so a run stopped mid-rollout goes on with the same rows bit for bit (the reference is recomputed:
the start does not change).
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from scalelm.batch import Batch
from scalelm.data.prompts import PromptSet
from scalelm.errors import DataError, TrainingError
from scalelm.generation.rollouts import generate
from scalelm.generation.sampling import Sampling
from scalelm.parallel.topology import gather_objects
from scalelm.rl.rewards import Rewards, Sample


@dataclass
class Rollout:
    """The completions of one rollout, in (prompt, sample) order: per row the prompt's ids, the completion's ids,
    their sampling log-probs and the completion's advantage."""

    prompts: list[list[int]]
    completions: list[list[int]]
    logprobs: list[np.ndarray]  # float32, one per completion token
    advantages: list[float]

    def state(self) -> dict:
        return {"prompts": self.prompts, "completions": self.completions,
                "logprobs": [_encoded(a) for a in self.logprobs], "advantages": _encoded(np.asarray(self.advantages, np.float32))}

    @classmethod
    def of(cls, state: dict) -> Rollout:
        return cls(state["prompts"], state["completions"], [_decoded(s) for s in state["logprobs"]],
                   _decoded(state["advantages"]).tolist())


class RolloutSource:
    """Minibatches of the model's own completions, scored (see the module docstring); every rank calls `take`."""

    def __init__(self, cfg, engine, prompts: PromptSet, rewards: Rewards, decode, eos: set[int], reward_model=None,
                 reference=None):
        self.rl, self.engine, self.prompts, self.rewards, self.decode, self.eos = cfg.rl, engine, prompts, rewards, decode, eos
        self.reward_model, self.reference = reward_model, reference  # rl/reward_model.py's, rl/reference.py's, or None
        self.objective, layout = engine.objective, engine.layout
        self.rows = cfg.train.micro_batch_size * engine.grad_accum  # this rank's rows of a minibatch
        self.micro, self.seq_len, self.context = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.max_position_embeddings
        self.minibatch = cfg.train.global_batch_size
        self.groups = self.minibatch * self.rl.steps_per_rollout // self.rl.group_size  # prompts per rollout
        self.dynamic = self.objective.dynamic_sampling(cfg)
        self.rank, self.world, self.dp_rank = layout.rank, layout.world, layout.dp_rank
        self.rollout: Rollout | None = None
        self.used = 0  # optimizer steps taken from the rollout
        self.count = 0  # rollouts sampled
        self.figures: dict[str, float] = {}  # the rollout's, reported with every step it serves
        self.step_figures: dict[str, float] = {}
        self._batches: list[list[Batch]] | None = None  # this rank's micro-batches of each minibatch

    # ------------------------------------------------------------------------------------------- batch source

    def take(self, count: int) -> list[Batch]:
        timings = {}
        if self.rollout is None or self.used == self.rl.steps_per_rollout * self.rl.ppo_epochs:
            timings = self._sample()
        if self._batches is None:
            self._batches = self._minibatches()
        minibatch = self._batches[self.used % self.rl.steps_per_rollout]
        self.used += 1
        self.step_figures = {**self.figures, "sampling_s": 0.0, "scoring_s": 0.0, **timings}
        return minibatch if self.engine.reads_data else []

    def state_dict(self) -> dict:
        """Every rank holds the same rollout: data-parallel rank 0's state carries it, the others' say so."""
        rollout = self.rollout.state() if self.rollout is not None else None
        return {"prompts": self.prompts.state_dict(), "count": self.count, "used": self.used, "figures": self.figures,
                "rollout": rollout if self.dp_rank == 0 or rollout is None else {"held_by": 0}}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state.get("rollout"), dict) and "held_by" in state["rollout"]:
            raise DataError("the rollout is in data-parallel rank 0's state")  # the resume calls continue_from
        try:
            self.prompts.load_state_dict(state["prompts"])
            self.count, self.used, self.figures = state["count"], state["used"], state["figures"]
            self.rollout = Rollout.of(state["rollout"]) if state["rollout"] is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"a rollout state the run cannot read ({type(e).__name__}: {e})") from None
        if self.rollout is not None and len(self.rollout.completions) != self.minibatch * self.rl.steps_per_rollout:
            raise DataError(f"the checkpoint's rollout holds {len(self.rollout.completions)} completions, and "
                            f"train.global_batch_size x rl.steps_per_rollout is {self.minibatch * self.rl.steps_per_rollout}")
        self._batches = None

    def continue_from(self, states: list[dict | None]) -> str:
        """Every rank holds the whole rollout, so rank 0's state serves any data-parallel rank and size."""
        self.load_state_dict(states[0])
        return f"the rollout in use and the prompts' position carried over to {self.engine.layout.data} data-parallel ranks"

    def report(self) -> dict[str, float]:
        """The rollout's figures for the step just taken: rewards, lengths, and the sampling's time when it sampled."""
        return self.step_figures

    # -------------------------------------------------------------------------------------------- sampling

    def _sample(self) -> dict[str, float]:
        """A new rollout, sampled, scored and made into rows; collective. Returns its timings."""
        started, kept, spare, scored_all, failed, errors, sampled, tokens = time.perf_counter(), [], [], [], 0, [], 0, 0
        kls = []  # rloo's Σ_t (old - ref) of each completion
        sampling_s = scoring_s = 0.0
        for round_ in range(self.rl.max_sampling_rounds if self.dynamic else 1):
            taken = self.prompts.take(self.groups - len(kept))
            sampling = Sampling(max_new_tokens=self.rl.max_new_tokens, temperature=self.rl.temperature,
                                num_samples=self.rl.group_size, seed=_seed(self.rl.seed, self.count, round_))
            t0 = time.perf_counter()
            rollouts = generate(self.engine, [list(p.ids) for _, p in taken], sampling, self.eos, self.context, batch_size=64)
            t1 = time.perf_counter()
            of = [taken[i // self.rl.group_size][1] for i in range(len(rollouts.finish))]  # each completion's prompt
            samples = [Sample(p.prompt, self.decode(rollouts.completion(i)), {**p.metadata, "answer": p.answer},
                              int(rollouts.completion_mask[i].sum())) for i, p in enumerate(of)]
            rewards, round_errors = self._score(samples)
            if self.reward_model is not None:  # NaN, a failed term, stays NaN
                scores = self.reward_model.score([list(p.ids) + rollouts.completion(i) for i, p in enumerate(of)])
                round_errors += [(i, f"rl.reward_model: its score is {score}") for i, score in enumerate(scores)
                                 if not math.isfinite(score) and not math.isnan(rewards[i])]
                rewards = [r + self.rl.reward_model_weight * score if math.isfinite(score) else math.nan
                           for r, score in zip(rewards, scores)]
            sampling_s, scoring_s = sampling_s + t1 - t0, scoring_s + time.perf_counter() - t1
            sampled, tokens = sampled + len(samples), tokens + sum(s.tokens for s in samples)
            failed, errors = failed + int(np.isnan(rewards).sum()), errors + round_errors
            scored_all += [r for r in rewards if not math.isnan(r)]
            drawn = Rollout([list(p.ids) for p in of], [rollouts.completion(i) for i in range(len(of))],
                            [rollouts.sampling_logprobs[i, :samples[i].tokens].numpy() for i in range(len(of))],
                            [0.0] * len(of))
            rewards = torch.tensor(rewards, dtype=torch.float32)
            if self.objective.beta and self.objective.kl_in_reward:  # rloo: the KL to the reference, off the reward
                kl = torch.tensor(self.reference.completion_kl(len(of), lambda rows: self._batch(drawn, rows)))
                rewards, kls = self.objective.penalised(rewards, kl), kls + kl.tolist()
            grouped = rewards.view(len(taken), self.rl.group_size)
            advantages = self.objective.advantages(grouped)
            for g in range(len(taken)):
                rows = range(g * self.rl.group_size, (g + 1) * self.rl.group_size)
                group = ([drawn.prompts[i] for i in rows], [drawn.completions[i] for i in rows],
                         [drawn.logprobs[i] for i in rows], advantages[g].tolist())
                equal = grouped[g][~grouped[g].isnan()].unique().numel() <= 1
                (spare if self.dynamic and equal else kept).append(group)
            if len(kept) == self.groups:
                break
        if failed > self.rl.max_reward_failures * sampled:
            index, message = sorted(errors)[0]
            raise TrainingError(f"the reward failed for {failed} of {sampled} completions of rollout {self.count + 1}, more "
                                f"than rl.max_reward_failures={self.rl.max_reward_failures}; the first, completion "
                                f"{index}: {message}")
        kept += spare[:self.groups - len(kept)]
        self.rollout = Rollout(*(sum((list(group[k]) for group in kept), []) for k in range(4)))
        self.count, self.used, self._batches = self.count + 1, 0, None
        mean = float(np.mean(scored_all)) if scored_all else math.nan
        self.figures = {"reward_mean": mean, "reward_std": float(np.std(scored_all)) if scored_all else math.nan,
                        "reward_failures": failed, "completion_tokens": tokens / sampled,
                        "groups_dropped": len(spare) if self.dynamic else 0,
                        **({"kl": sum(kls) / max(tokens, 1)} if kls else {})}  # per token, as the others report it
        return {"sampling_s": sampling_s, "scoring_s": scoring_s, "sampled_tokens_per_s": tokens / max(sampling_s, 1e-9),
                "rollout_s": time.perf_counter() - started}

    def _score(self, samples: list[Sample]) -> tuple[list[float], list[tuple[int, str]]]:
        """Every sample's reward (NaN where it failed) and the errors, each rank scoring every world-th sample."""
        mine = list(range(self.rank, len(samples), self.world))
        scores = self.rewards([samples[i] for i in mine])
        rewards = [math.nan] * len(samples)
        errors = []
        for indices, part in gather_objects((mine, scores)):
            for i, reward in zip(indices, part.rewards):
                rewards[i] = reward
            errors += [(indices[k], message) for k, message in part.errors]
        return rewards, sorted(errors)

    # ------------------------------------------------------------------------------------------------ rows

    def _minibatches(self) -> list[list[Batch]]:
        """This rank's micro-batches of each minibatch of the rollout, with the reference's log-probs when the
        objective weighs a KL to it; collective (the reference is a forward pass of every stage)."""
        out = []
        for m in range(self.rl.steps_per_rollout):
            first = m * self.minibatch + self.dp_rank * self.rows
            rows = range(first, first + self.rows)
            out.append([self._batch(self.rollout, rows[i:i + self.micro]) for i in range(0, self.rows, self.micro)])
        if self.objective.beta and not self.objective.kl_in_reward:
            flat = [b for minibatch in out for b in minibatch]
            for batch, ref in zip(flat, self.reference.logps(flat)):
                batch["ref_logps"] = ref
        return out

    def _batch(self, r: Rollout, rows: Sequence[int]) -> Batch:
        L = self.seq_len
        batch = {"input_ids": torch.zeros(len(rows), L, dtype=torch.long), "labels": torch.zeros(len(rows), L, dtype=torch.long),
                 "loss_mask": torch.zeros(len(rows), L, dtype=torch.bool), "old_logps": torch.zeros(len(rows), L),
                 "advantages": torch.zeros(len(rows), L)}
        for b, i in enumerate(rows):
            ids = r.prompts[i] + r.completions[i]
            start, end = len(r.prompts[i]) - 1, len(ids) - 1  # the label positions of the completion's tokens
            batch["input_ids"][b, :end] = torch.tensor(ids[:-1])
            batch["labels"][b, :end] = torch.tensor(ids[1:])
            batch["loss_mask"][b, start:end] = True
            batch["old_logps"][b, start:end] = torch.from_numpy(r.logprobs[i])
            batch["advantages"][b, start:end] = r.advantages[i]
        batch["origin"] = [f"rollout {self.count} completion {i}" for i in rows]
        return batch


def _seed(seed: int, rollout: int, round_: int) -> int:
    """The sampling seed of one round of one rollout: unlike any other's, the same on every layout."""
    return int(np.random.SeedSequence([seed, rollout, round_]).generate_state(1, np.uint64)[0] >> 1)


def _encoded(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, np.float32).tobytes()).decode()


def _decoded(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), np.float32).copy()


def rollout_source(cfg, engine) -> RolloutSource:
    """The run's rollout source: data.train's prompts, rl.reward's rewards, completions read with data.tokenizer."""
    from scalelm.data.chat import END_OF_TURN
    from scalelm.data.files import sha256_file
    from scalelm.data.tokenizer import load_tokenizer

    sp = load_tokenizer(cfg.data.tokenizer)
    end_of_turn = sp.piece_to_id(END_OF_TURN) if sp.piece_to_id(END_OF_TURN) != sp.unk_id() else -1
    eos = {sp.eos_id()} | ({end_of_turn} if end_of_turn >= 0 else set())  # a chat's reply ends at <|end|>
    sha = sha256_file(cfg.data.tokenizer)
    prompts = PromptSet(cfg.data.train, "train", sha, cfg.data.seed)
    model = reference = None
    if cfg.rl.reward_model:
        from scalelm.rl.reward_model import RewardModel

        model = RewardModel(cfg, engine.layout, sha, sp.encode("\n"), end_of_turn)
    if cfg.rl.kl_coef:
        from scalelm.rl.reference import Reference

        reference = Reference(cfg, engine, sha)
    return RolloutSource(cfg, engine, prompts, Rewards(cfg.rl), lambda ids: sp.decode([t for t in ids if t not in eos]),
                         eos, model, reference)
