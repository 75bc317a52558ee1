"""The config tree: one dataclass per section, a docstring line per field. A YAML file lists only what differs from
these defaults (config/load.py reads it); config/validate.py derives the null fields and checks the rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from scalelm.config.finetune import FinetuneConfig
from scalelm.config.rl import RLConfig


@dataclass
class ModelConfig:
    """The decoder's shape. Defaults are GPT-3 Small (125M)."""

    num_layers: int = 12
    """Transformer layers."""
    hidden_size: int = 768
    """Width of the residual stream (d_model)."""
    num_heads: int = 12
    """Attention heads; hidden_size must divide by it."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; null means num_heads (plain multi-head)."""
    ffn_hidden_size: int | None = None
    """MLP width; null means 4 x hidden_size for GELU, 8/3 x hidden_size rounded up to 256 for SwiGLU."""
    vocab_size: int | None = None
    """Vocabulary size; null takes it from data.tokenizer."""
    max_position_embeddings: int | None = None
    """Longest sequence the learned position table holds; null means train.seq_len."""
    position_embedding: Literal["learned", "rope"] = "learned"
    """learned (GPT-3) or rope (Llama)."""
    rope_base: float = 10000.0
    """RoPE frequency base (theta)."""
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    """LayerNorm (GPT-3) or RMSNorm (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    """MLP activation: gelu (GPT-3) or swiglu (Llama)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    bias: bool = True
    """Biases in the linear layers (GPT-3 has them, Llama does not)."""
    dropout: float = 0.0
    """Dropout on the residual stream."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    causal: bool = True
    """Each token attends to those before it (a decoder); false: to every token of its window or document (an
    encoder), for objectives that do not predict the next token."""


@dataclass
class ParallelConfig:
    """How the model is split over ranks; data parallel size is world_size / (tensor x pipeline)."""

    tensor: int = 1
    """Tensor-parallel degree (megatron-core layers)."""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed PipelineModule, 1F1B)."""
    sequence_parallel: bool = False
    """Shard layer-norm and dropout activations along the sequence over the tensor group."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage over the data-parallel group: 1, 2 or 3 (1 with pipeline > 1)."""
    timeout: float = 600.0
    """Seconds a rank waits for a silent peer (a lost host, a hung or stopped rank) before the run stops with
    one line naming it; also the hold on checkpoint.dir of a run that stopped renewing it."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine (or linear) decay."""

    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float = 6e-5
    """Learning rate at the end of the decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from lr to min_lr after warmup."""
    decay_steps: int | None = None
    """Steps over which lr decays to min_lr; null means train.steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class DataConfig:
    """Where the token shards are and how they are read."""

    train: list[str] = field(default_factory=list)
    """Shard directories or URLs written by `scalelm shard` (their train split); several are blended."""
    val: list[str] = field(default_factory=list)
    """Shard directories or URLs for validation (their val split); empty means the val split of data.train."""
    weights: list[float] = field(default_factory=list)
    """Blending weight per data.train entry; empty means in proportion to their token counts."""
    tokenizer: str | None = None
    """SentencePiece model the shards were made with; shards made with another one are refused."""
    num_workers: int = 2
    """Loader worker processes per data-parallel rank (0 reads in the training process)."""
    seed: int = 1234
    """Seed of the shard and window shuffle."""
    on_bad_shard: Literal["error", "skip"] = "error"
    """What a corrupt or truncated shard does: stop with its name, or skip it and count it."""
    document_mask: bool = False
    """Pretraining: attend within each document of a window only, positions restarting at each (as Llama 3
    trained); chat shards always are."""


@dataclass
class TrainConfig:
    """Length and batch shape of the run."""

    objective: str = "next_token"
    """What `scalelm pretrain` minimises (scalelm/objectives): next_token, the cross entropy of every next token."""
    steps: int = 1000
    """Optimizer steps to train for."""
    seq_len: int = 2048
    """Tokens per training sequence."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks: micro_batch_size x grad_accum x data_parallel."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision; bf16 and fp16 keep fp32 master weights, fp16 adds dynamic loss scaling."""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """Recompute activations in backward: none, selective (attention core) or full (whole layers)."""
    compile: bool = False
    """Compile each transformer layer with torch.compile (inductor; a C++ compiler on the CPU): the first steps
    take longer while it compiles, the rest run fused kernels. Off: megatron-core's layers run eagerly."""
    packed_attention: Literal["sdpa", "flex"] = "sdpa"
    """Attention kernel for packed documents: sdpa with a boolean block mask (any device, attention dropout), or
    flex attention's block mask (compiled on a GPU, skips masked blocks; no attention dropout)."""
    eval_every: int = 100
    """Steps between validation passes; 0 disables validation."""
    eval_iters: int = 10
    """Micro-batches per validation pass."""
    resume: str = "auto"
    """auto (newest checkpoint in checkpoint.dir that verifies), none, or a checkpoint path."""
    init_from: str | None = None
    """Start a new run from these weights (any checkpoint, or `scalelm convert from-hf`'s output) with a
    fresh optimizer, schedule and data order; ignored once the run has a checkpoint of its own to resume."""
    max_bad_steps: int = 5
    """Steps in a row with a non-finite loss (each one skipped) after which training stops."""
    spike_zscore: float = 6.0
    """Log a loss spike, with the batch's shards, when a loss is this many standard deviations above
    the mean of the last 100 steps; 0 turns it off."""
    seed: int = 1234
    """Seed of weight initialisation and dropout."""


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written."""

    dir: str | None = None
    """Checkpoint directory; null means LOG_DIR/checkpoints."""
    every: int = 1000
    """Steps between checkpoints (one is also written at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 3
    """Newest checkpoints kept; older ones are deleted."""
    background: bool = True
    """Write checkpoints in the background: training waits only while the state is copied to host memory
    (one snapshot, kept for the next save); false writes while training waits, one tensor in memory at a time."""


@dataclass
class LogConfig:
    """What the run writes for people to read."""

    dir: str = "runs/latest"
    """Run directory: metrics.jsonl, TensorBoard events, the resolved config."""
    every: int = 10
    """Steps between log lines and metrics records."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
