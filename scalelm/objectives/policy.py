"""grpo, dr_grpo, dapo, rloo (finetune.objective): policy gradients on the model's own completions, scored by rewards.

Their batches come from rollouts (rl/source.py): completions of prompt shards sampled by the model as it
is, G per prompt (rl.group_size), each a row of prompt + completion whose targets (loss_mask) are the completion's
tokens, carrying per target the log-prob it was sampled with (old_logps), its completion's advantage (advantages)
and, with rl.kl_coef, the reference's log-prob (ref_logps). Per target t of completion i, with
logp = log softmax(logits / rl.temperature)[label]:

    r_t = exp(logp_t - old_t)                  the importance ratio (rl.ratio=sequence, GSPO: one per completion,
                                               exp of the mean of its tokens' log-ratios)
    l_t = -min(r_t A_i, clip(r_t, 1 - clip, 1 + clip_high) A_i) + beta k3_t,   k3 = exp(ref - logp) - (ref - logp) - 1

    grpo      Σ_i mean_t l_t / completions;    A = (R - mean_group R) / (std_group R + 1e-4)
    dr_grpo   Σ_i Σ_t l_t / (completions x rl.max_new_tokens);    A = R - mean_group R     (Liu et al. 2025)
    dapo      Σ_i Σ_t l_t / tokens;    A as grpo; clip-higher (rl.clip_high) and dynamic sampling are its
              settings (Yu et al. 2025)
    rloo      one ratio per completion, exp(Σ_t logp - Σ_t old): -min(r A, clip(r) A) / completions;
              A = R - mean of the group's other rewards; the KL is a penalty on the reward, beta Σ_t (old - ref),
              applied when sampling (Ahmadian et al. 2024)

as TRL's GRPOTrainer (loss_type grpo, dr_grpo, dapo; scale_rewards none for dr_grpo) and RLOOTrainer compute them. A
completion whose reward failed (NaN) takes no part in its group's mean and std and gets advantage 0.

Metrics, each a mean over completions (grpo, dr_grpo, rloo; of their per-token means) or over tokens (dapo):
logprob_gap |logp - old| (on a rollout's first step, the trainer against the sampler: 0 up to rounding), clipped (the
share of targets whose ratio is clipped where it matters), kl (k3, with a reference) and entropy.
"""

from __future__ import annotations

import torch

from scalelm.errors import ConfigError
from scalelm.objectives.base import Defaults, Output
from scalelm.objectives.registry import register
from scalelm.objectives.tokens import token_entropy, token_logps


@register
class GRPO(Defaults):
    name, stage, data, output = "grpo", "finetune", "prompts", Output.LOGITS
    samples = True  # its batches are the model's own completions (rl/source.py)
    unit = "completions"
    fields = ("labels", "loss_mask", "old_logps", "advantages", "ref_logps")
    metrics = ("logprob_gap", "clipped", "kl", "entropy")
    scaled = True  # advantages over the group's std
    kl_in_reward = False  # the KL to the reference weighs in the loss, per token (rloo: off the reward, per completion)

    def __init__(self, cfg):
        rl = cfg.rl
        self.low, self.high = rl.clip, rl.clip if rl.clip_high is None else rl.clip_high
        self.beta, self.temperature, self.sequence = rl.kl_coef, rl.temperature, rl.ratio == "sequence"
        self.max_new_tokens = rl.max_new_tokens

    @classmethod
    def check(cls, cfg) -> None:
        rl = cfg.rl
        field = f"finetune.objective={cls.name}"
        if not cfg.model.causal:
            raise ConfigError(f"{field} samples text, which a bidirectional model (model.causal=false) cannot: set "
                              f"model.causal=true")
        if not rl.reward and not rl.reward_model:
            raise ConfigError(f"{field} needs a reward: set rl.reward to module:function (e.g. rl.reward=my_rewards:score) "
                              f"or a built-in (exact_match, format, length), or rl.reward_model to a reward model")
        if rl.reward_weights and len(rl.reward_weights) != len(rl.reward):
            raise ConfigError(f"rl.reward_weights={rl.reward_weights} for {len(rl.reward)} rl.reward terms: give one "
                              f"weight each, or none")
        if rl.group_size < 2:
            raise ConfigError(f"rl.group_size={rl.group_size}: {cls.name} compares the completions of one prompt, so it "
                              f"needs at least 2 (8 is usual)")
        for name, ok, rule in (("max_new_tokens", rl.max_new_tokens >= 1, "at least 1"),
                               ("temperature", rl.temperature >= 1e-3, "1e-3 or more (1 samples the model as it is)"),
                               ("steps_per_rollout", rl.steps_per_rollout >= 1, "at least 1"),
                               ("ppo_epochs", rl.ppo_epochs >= 1, "at least 1"),
                               ("clip", 0 < rl.clip < 1, "in (0, 1)"),
                               ("clip_high", rl.clip_high is None or rl.clip_high > 0, "above 0, or null (rl.clip)"),
                               ("kl_coef", rl.kl_coef >= 0, "0 (no reference) or more"),
                               ("max_reward_failures", 0 <= rl.max_reward_failures <= 1, "in [0, 1]"),
                               ("max_sampling_rounds", rl.max_sampling_rounds >= 1, "at least 1")):
            if not ok:
                raise ConfigError(f"rl.{name}={getattr(rl, name)}: use {rule}")
        dropouts = {"model.dropout": cfg.model.dropout, "model.attention_dropout": cfg.model.attention_dropout,
                    "finetune.lora.dropout": cfg.finetune.lora.dropout if cfg.finetune.lora else 0.0}
        for name, value in dropouts.items():
            if value:
                raise ConfigError(f"{name}={value}: {cls.name} compares the trainer's log-probs with the sampler's, "
                                  f"which a dropout draws apart; set {name}=0")
        t = cfg.train
        rollout = t.global_batch_size * rl.steps_per_rollout
        if rollout % rl.group_size:
            raise ConfigError(f"a rollout holds train.global_batch_size x rl.steps_per_rollout = {rollout} completions, "
                              f"which must be whole groups of rl.group_size={rl.group_size}")
        if rl.max_new_tokens >= t.seq_len:
            raise ConfigError(f"rl.max_new_tokens={rl.max_new_tokens} leaves no room for a prompt in train.seq_len="
                              f"{t.seq_len}: raise train.seq_len")
        if not cfg.data.tokenizer:
            raise ConfigError(f"{field} reads each completion as text for its reward: set data.tokenizer (the one the "
                              f"prompt shards were made with)")
        if t.eval_every:
            raise ConfigError(f"train.eval_every={t.eval_every}: {cls.name} measures its reward on every rollout "
                              f"(reward_mean in the log); set train.eval_every=0")

    @classmethod
    def check_data(cls, cfg, shards) -> None:
        room = cfg.train.seq_len - cfg.rl.max_new_tokens
        longest = shards.chat.get("longest", 0) if shards.chat else 0
        if longest > room:
            raise ConfigError(f"{shards.source} holds a prompt of {longest} tokens, and train.seq_len - rl.max_new_tokens "
                              f"= {cfg.train.seq_len} - {cfg.rl.max_new_tokens} = {room}: raise train.seq_len, lower "
                              f"rl.max_new_tokens or leave the longer prompts out")

    def dynamic_sampling(self, cfg) -> bool:
        """Whether groups of equal rewards are dropped and replaced (rl.dynamic_sampling; null: dapo's)."""
        return bool(cfg.rl.dynamic_sampling)

    # ------------------------------------------------------------------------------------ advantages and penalty

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(P, G) advantages from (P, G) rewards, NaN where a reward failed (advantage 0 there)."""
        mean = rewards.nanmean(dim=1, keepdim=True)
        advantages = rewards - mean
        if self.scaled:
            advantages = advantages / (_nanstd(rewards) + 1e-4)
        return advantages.nan_to_num(0.0)

    def penalised(self, rewards: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """The rewards (n,) less beta x each completion's Σ_t (old - ref) log-probs (kl_in_reward: rloo's)."""
        return rewards - self.beta * kl

    # ------------------------------------------------------------------------------------------------ the loss

    def units(self, batch: dict) -> int:
        return int(batch["loss_mask"].any(dim=1).sum())

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["loss_mask"].float()  # (b, s)
        logps, entropy = self._logps(logits, batch)
        old, advantages = batch["old_logps"], batch["advantages"]
        log_ratio = logps - old
        if self.sequence:  # GSPO: the mean log-ratio of each completion, for all its tokens
            log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(logps)
        ratio = log_ratio.exp()
        losses = -torch.min(ratio * advantages, ratio.clamp(1 - self.low, 1 + self.high) * advantages)
        kl = None
        if self.beta:
            delta = batch["ref_logps"] - logps
            kl = delta.exp() - delta - 1
            losses = losses + self.beta * kl
        weights = self._weights(mask)
        with torch.no_grad():
            clipped = ((ratio < 1 - self.low) & (advantages < 0)) | ((ratio > 1 + self.high) & (advantages > 0))
            per_unit = self._metric_weights(mask)
            metrics = {"logprob_gap": (logps.detach() - old).abs(), "clipped": clipped.float(),
                       "kl": kl.detach() if kl is not None else torch.zeros_like(logps), "entropy": entropy}
            metrics = {k: (v * per_unit).sum() for k, v in metrics.items()}
        return (losses * weights).sum(), metrics

    def _logps(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each label, entropy of each position's distribution), both (b, s), at the policy's temperature."""
        if self.temperature != 1:
            logits = logits.float() / self.temperature
        entropy = token_entropy(logits).t()  # first: the log-probs consume fp32 logits
        return token_logps(logits, batch["labels"]), entropy

    def _weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Each target's weight in the loss sum, which the engine divides by the units of the batch."""
        return mask / mask.sum(1, keepdim=True).clamp(min=1)

    def _metric_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Each target's weight in a metric's sum: its completion's mean, per unit."""
        return mask / mask.sum(1, keepdim=True).clamp(min=1)

    def progress(self, metrics: dict[str, float]) -> str:
        return f" reward {metrics['reward_mean']:.3f}" if metrics.get("reward_mean") is not None else ""

    def validation(self, loss: float, metrics: dict[str, float]) -> tuple[dict[str, float], str]:
        return {"val_loss": loss}, f"val loss {loss:.4f}"

    def evaluate(self, engine, batches, count, context):
        raise ConfigError(f"{self.name} models are language models: evaluate them on text or chat shards")


@register
class DrGRPO(GRPO):
    """GRPO done right: no std scaling of the advantages, no division by each completion's length."""

    name, scaled = "dr_grpo", False

    def units(self, batch: dict) -> int:
        return super().units(batch) * self.max_new_tokens

    def _weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def _metric_weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask * self.max_new_tokens / mask.sum(1, keepdim=True).clamp(min=1)


@register
class DAPO(GRPO):
    """Token-level loss (every token of the batch weighs the same), clip-higher and dynamic sampling."""

    name, unit = "dapo", "tokens"

    def dynamic_sampling(self, cfg) -> bool:
        return cfg.rl.dynamic_sampling is not False

    def units(self, batch: dict) -> int:
        return int(batch["loss_mask"].sum())

    def _weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def _metric_weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask


@register
class RLOO(GRPO):
    """REINFORCE leave-one-out: a baseline of the group's other rewards, one ratio per completion, KL in the reward."""

    name, kl_in_reward = "rloo", True
    metrics = ("logprob_gap", "clipped", "entropy")  # its KL is the rollout's, reported by the source

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.rl.ratio != "token":
            raise ConfigError("rl.ratio=sequence is GSPO's ratio for grpo, dr_grpo and dapo: rloo's ratio is already one "
                              "per completion (of its summed log-probs)")

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        scored = (~rewards.isnan()).sum(dim=1, keepdim=True)
        baseline = (rewards.nansum(dim=1, keepdim=True) - rewards) / (scored - 1)
        return (rewards - baseline).nan_to_num(0.0)

    def __call__(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["loss_mask"].float()
        logps, entropy = self._logps(logits, batch)
        old = batch["old_logps"]
        ratio = ((logps - old) * mask).sum(1).exp()  # (b,)
        advantages = (batch["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1)  # one per completion
        losses = -torch.min(ratio * advantages, ratio.clamp(1 - self.low, 1 + self.high) * advantages)
        real = mask.any(dim=1)
        with torch.no_grad():
            clipped = ((ratio < 1 - self.low) & (advantages < 0)) | ((ratio > 1 + self.high) & (advantages > 0))
            per_unit = self._metric_weights(mask)
            metrics = {"logprob_gap": ((logps.detach() - old).abs() * per_unit).sum(),
                       "clipped": (clipped & real).float().sum(), "entropy": (entropy * per_unit).sum()}
        return torch.where(real, losses, 0.0).sum(), metrics


def _nanstd(rewards: torch.Tensor) -> torch.Tensor:
    """Each row's sample standard deviation (n - 1) over its non-NaN values, as TRL's nanstd."""
    mean = rewards.nanmean(dim=1, keepdim=True)
    count = (~rewards.isnan()).sum(dim=1, keepdim=True)
    return ((rewards - mean) ** 2).nansum(dim=1, keepdim=True).div(count - 1).sqrt()
