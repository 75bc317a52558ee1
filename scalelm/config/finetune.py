"""The finetuning part of the config tree (`finetune:`): the objective, LoRA, DPO and the head; config/sections.py
holds the rest and config/load.py loads them all alike. Also the adapted layers' sides, which LoRA's rank is checked
against (config/validate.py) and the plan counts (parallel/plan.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from scalelm.config.sections import ModelConfig

# LoRA's targets, the linears of each transformer layer it may adapt (model/lora.py finds them in the layer)
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
COLUMN = ("qkv", "fc1")  # column-parallel bases; proj and fc2 are row-parallel


def layer_sides(model: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of a LoRA target's whole weight."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.hidden_size // model.num_heads
    kv = (model.num_kv_heads or model.num_heads) * d
    fc1 = 2 * f if model.activation == "swiglu" else f
    return {"qkv": (h, h + 2 * kv), "proj": (h, h), "fc1": (h, fc1), "fc2": (f, h)}[target]


def adapter_parameters(model: ModelConfig, lora: LoRAConfig) -> int:
    """The adapters' parameters over the whole model: r (in + out) per adapted linear per layer."""
    return model.num_layers * sum(lora.rank * sum(layer_sides(model, t)) for t in lora.targets)


@dataclass
class LoRAConfig:
    """Low-rank adapters on the transformer layers' linears, the base frozen (model/lora.py):
    W x + scale · B A x, A (rank, in) and B (out, rank), B starting at zero."""

    rank: int = 8
    """r: the adapters' inner width; at most the smaller side of each adapted layer."""
    alpha: float = 16.0
    """Scale numerator: scale = alpha / rank, or alpha / sqrt(rank) with rslora."""
    dropout: float = 0.0
    """Dropout on the adapters' input (the base sees the input whole)."""
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])
    """Adapted linears of each layer: qkv (the fused query/key/value), proj (attention output), fc1 (the MLP's
    first, SwiGLU's fused gate and up), fc2 (the MLP's second)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank."""


@dataclass
class DPOConfig:
    """Direct preference optimisation (objectives/dpo.py): the policy's log-ratio to its reference, chosen over rejected."""

    beta: float = 0.1
    """β: how far the policy may move from its reference (the rewards are β · log-ratios)."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid (DPO), ipo (squared, on per-token log-ratios), hinge (SLiC), robust (DPO under label noise)."""
    label_smoothing: float = 0.0
    """robust: the share of pairs assumed flipped, in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of an SFT term on the chosen reply (RPO): its mean per-token cross entropy, per pair."""


@dataclass
class FinetuneConfig:
    """What `scalelm finetune` trains: the objective, which tokens of a conversation are its targets, and
    whether the whole model or low-rank adapters on a frozen one."""

    objective: str = "sft"
    """What `scalelm finetune` minimises (scalelm/objectives): sft, next-token cross entropy on the target tokens of
    chat shards (`scalelm shard --chat`); dpo, preference pairs (`scalelm shard --preference`), the reference being
    the base (LoRA) or train.init_from's scored log-probs; reward, a reward model (head: classification, num_labels:
    1) on preference pairs, Bradley-Terry; classify, the classes of labelled texts (`scalelm shard --labels`, head:
    classification), cross entropy; grpo, dr_grpo, dapo, rloo, policy gradients on the model's own completions of
    prompts (`scalelm shard --prompts`), scored by the rewards of the rl: section."""
    head: Literal["lm", "classification"] = "lm"
    """lm: next-token logits; classification: num_labels scores read at each document's last token (objectives/reward.py, classify.py)."""
    num_labels: int = 2
    """The classification head's outputs: the classes, or 1 for a reward model's score."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO's settings (finetune.objective=dpo)."""
    train_on: Literal["assistant", "all", "last"] = "assistant"
    """Targets: every assistant turn with the <|end|> closing it, every token, or the last assistant turn only."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters on train.init_from's frozen weights (e.g. finetune.lora.rank=16); null trains every weight."""
