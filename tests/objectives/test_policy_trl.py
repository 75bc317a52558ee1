"""The GRPO family (objectives/policy.py) against TRL, the oracle: on one fixed batch of log-probs, old log-probs,
reference log-probs, advantages and masks, TRL's GRPOTrainer and RLOOTrainer compute the loss (their own
`_compute_loss`, the model's forward replaced by the fixed log-probs) and its gradient; scalelm's objectives must give
the same to 1e-6. Advantages from rewards are checked against TRL's formulas (its nanstd)."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from scalelm.config import Config
from scalelm.objectives import policy
from scalelm.objectives.registry import lookup

B, T, G = 6, 7, 3  # completions, their longest, group size


def fixed_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios in and out of the clip region
    ref = logps + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    return {"logps": logps.float(), "old": (old * mask).float(), "ref": (ref * mask).float(),
            "advantages": advantages.float(), "mask": mask}


def ours(name: str, batch: dict, **rl) -> tuple[float, torch.Tensor]:
    """scalelm's loss (the engine's division: the sum over the batch's units) and its gradient by the log-probs."""
    cfg = Config()
    for key, value in {"max_new_tokens": T, **rl}.items():
        setattr(cfg.rl, key, value)
    objective = lookup(name, "finetune.objective")(cfg)
    logps = batch["logps"].clone().requires_grad_()
    objective._logps = lambda logits, b: (logps, torch.zeros_like(logps))
    rows = {"labels": torch.zeros(B, T, dtype=torch.long), "loss_mask": batch["mask"].bool(), "old_logps": batch["old"],
            "ref_logps": batch["ref"], "advantages": batch["advantages"][:, None].expand(B, T) * batch["mask"]}
    total, _ = objective(None, rows)
    loss = total / objective.units(rows)
    loss.backward()
    return loss.item(), logps.grad


def trl_grpo(batch: dict, loss_type: str, beta: float, epsilon_high: float, level: str = "token"):
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    logps = batch["logps"].clone().requires_grad_()
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high,
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": batch["mask"],
              "advantages": batch["advantages"], "old_per_token_logps": batch["old"], "ref_per_token_logps": batch["ref"],
              "num_items_in_batch": batch["mask"].sum()}
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    return loss.item(), logps.grad


@pytest.mark.parametrize("name,loss_type,beta,clip_high,level", [
    ("grpo", "grpo", 0.0, None, "token"),
    ("grpo", "grpo", 0.04, None, "token"),
    ("grpo", "grpo", 0.04, None, "sequence"),  # GSPO's ratio
    ("dr_grpo", "dr_grpo", 0.04, None, "token"),
    ("dapo", "dapo", 0.0, 0.28, "token"),
    ("dapo", "dapo", 0.04, 0.28, "sequence"),
], ids=["grpo", "grpo-kl", "gspo-kl", "dr_grpo-kl", "dapo", "dapo-gspo-kl"])
def test_loss_and_gradient_equal_trls(name, loss_type, beta, clip_high, level):
    batch = fixed_batch()
    loss, grad = ours(name, batch, kl_coef=beta, clip_high=clip_high, ratio=level)
    expected, expected_grad = trl_grpo(batch, loss_type, beta, clip_high if clip_high is not None else 0.2, level)
    assert loss == pytest.approx(expected, abs=1e-6)
    assert (grad - expected_grad).abs().max().item() <= 1e-6
    assert expected_grad.abs().max() > 1e-3  # the batch moves the policy: a zero gradient would prove nothing


def test_rloo_loss_and_gradient_equal_trls():
    from trl import RLOOTrainer

    batch = fixed_batch(1)
    batch["old"] = batch["logps"] + 0.1 * torch.randn(B, T, generator=torch.Generator().manual_seed(3)) * batch["mask"]
    loss, grad = ours("rloo", batch)
    trainer = RLOOTrainer.__new__(RLOOTrainer)
    logps = batch["logps"].clone().requires_grad_()
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, epsilon_low=0.2, epsilon_high=0.2, model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": batch["mask"],
              "advantages": batch["advantages"], "old_logps": (batch["old"] * batch["mask"]).sum(1)}
    expected = trainer._compute_loss(None, inputs)
    expected.backward()
    assert loss == pytest.approx(expected.item(), abs=1e-6)
    assert (grad - logps.grad).abs().max().item() <= 1e-6
    assert logps.grad.abs().max() > 1e-3


def test_advantages_are_trls():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([[1.0, 0.0, 0.5], [2.0, float("nan"), 1.0], [3.0, 3.0, 3.0]])
    mean = rewards.nanmean(1, keepdim=True)
    grpo = ((rewards - mean) / (nanstd(rewards, dim=1, keepdim=True) + 1e-4)).nan_to_num(0.0)
    cfg = Config()
    assert torch.allclose(policy.GRPO(cfg).advantages(rewards), grpo, atol=1e-6)
    assert torch.allclose(policy.DAPO(cfg).advantages(rewards), grpo, atol=1e-6)
    assert torch.allclose(policy.DrGRPO(cfg).advantages(rewards), (rewards - mean).nan_to_num(0.0), atol=1e-6)
    scored = (~rewards.isnan()).sum(1, keepdim=True)
    leave_one_out = ((rewards - (rewards.nansum(1, keepdim=True) - rewards) / (scored - 1))).nan_to_num(0.0)
    assert torch.allclose(policy.RLOO(cfg).advantages(rewards), leave_one_out, atol=1e-6)
    assert policy.GRPO(cfg).advantages(rewards)[1, 1] == 0  # a failed reward: no advantage
    assert (policy.GRPO(cfg).advantages(rewards)[2] == 0).all()  # a group of equal rewards teaches nothing
