"""One typed config tree, loaded from YAML and overridden by dotted `key=value` arguments.

    cfg = load_config("configs/tiny.yaml", ["optim.lr=3e-4", "data.train=shards/"])

A YAML file lists only what differs from the defaults below. Unknown keys are errors (with a
suggestion), values are checked against the field's type, and `validate()` is the one place where
derived values are filled in and cross-field rules are checked. Every error names the field, the
bad value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from scalelm.errors import ConfigError


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
class FinetuneConfig:
    """What `scalelm finetune` trains: the objective, and which tokens of a conversation are its targets."""

    objective: Literal["sft"] = "sft"
    """sft: next-token cross entropy on the target tokens of chat shards (`scalelm shard --chat`)."""
    train_on: Literal["assistant", "all", "last"] = "assistant"
    """Targets: every assistant turn with the <|end|> closing it, every token, or the last assistant turn only."""


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written."""

    dir: str | None = None
    """Checkpoint directory; null means LOG_DIR/checkpoints."""
    every: int = 1000
    """Steps between checkpoints (one is also written at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 3
    """Newest checkpoints kept; older ones are deleted."""


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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> Config:
    """Read a YAML config over `base` (a config as dicts; else the defaults), apply `key=value` overrides,
    validate. The file's keys replace base's, section by section."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (the presets are in configs/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...) at the top")
    raw = _merged(copy.deepcopy(base or {}), raw)
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: sections merge key by key, values replace."""
    for key, value in top.items():
        base[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, checking every key and value against the field types."""
    return _build(Config, raw, prefix="")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (example: optim.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}={raw!r}: expected a section of keys, e.g. {name}.{dataclasses.fields(cls)[0].name}=...")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key {prefix}{key}: {hint}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(raw[f.name], hints[f.name], f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], {}, f"{prefix}{f.name}.")
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type hint `tp`, converting the obvious cases (str -> float, x -> [x])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if value is None:
        raise ConfigError(f"{key} may not be null: give a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed: use one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not a boolean: use true or false")
    if tp in (int, float):
        # NOTE: YAML reads yes/no/on/true as booleans, and Python counts a bool as an int: refuse them here.
        number = None if isinstance(value, bool) else _number(value)
        if number is None or not math.isfinite(number) or (tp is int and not number.is_integer()):
            raise ConfigError(f"{key}={value!r} is not {'a whole number' if tp is int else 'a finite number, e.g. 3e-4'}")
        return int(number) if tp is int else number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string: give a single value")
        return str(value)
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a bug in this file


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Fill in derived values and check every cross-field rule; with `world_size`, the layout too.

    Raises ConfigError naming the field, its value and the fix. Returns the same (mutated) config.
    """
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train

    # Derived values (null means "derive it").
    if m.num_kv_heads is None:
        m.num_kv_heads = m.num_heads
    if m.ffn_hidden_size is None:
        # NOTE: SwiGLU has three matrices instead of two, so 8/3 x keeps the MLP's parameter count
        # at the 4 x GELU budget (the Llama rule), rounded up to a multiple of 256 for the kernels.
        m.ffn_hidden_size = 4 * m.hidden_size if m.activation == "gelu" else -(-8 * m.hidden_size // 3 // 256) * 256
    if m.max_position_embeddings is None:
        m.max_position_embeddings = t.seq_len
    if o.decay_steps is None:
        o.decay_steps = t.steps
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(Path(cfg.log.dir) / "checkpoints")

    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size, "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.num_kv_heads, "model.ffn_hidden_size": m.ffn_hidden_size,
        "parallel.tensor": p.tensor, "parallel.pipeline": p.pipeline,
        "train.steps": t.steps, "train.seq_len": t.seq_len, "train.micro_batch_size": t.micro_batch_size,
        "train.global_batch_size": t.global_batch_size, "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep,
        "train.max_bad_steps": t.max_bad_steps, "log.every": cfg.log.every, "train.eval_iters": t.eval_iters,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if m.vocab_size is not None and m.vocab_size < 1:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be at least 1, or null to take it from the tokenizer")
    for key, value in {"optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.weight_decay": o.weight_decay,
                       "optim.grad_clip": o.grad_clip, "optim.warmup_steps": o.warmup_steps,
                       "train.eval_every": t.eval_every, "data.num_workers": cfg.data.num_workers,
                       "train.spike_zscore": t.spike_zscore}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must not be negative")
    for key, value, low, high in [("optim.beta1", o.beta1, 0.0, 1.0), ("optim.beta2", o.beta2, 0.0, 1.0),
                                  ("model.dropout", m.dropout, 0.0, 1.0),
                                  ("model.attention_dropout", m.attention_dropout, 0.0, 1.0)]:
        if not low <= value < high:
            raise ConfigError(f"{key}={value} must be in [{low:g}, {high:g})")
    for key, value in {"optim.eps": o.eps, "model.norm_eps": m.norm_eps, "model.init_std": m.init_std,
                       "model.rope_base": m.rope_base, "optim.lr": o.lr, "optim.decay_steps": o.decay_steps}.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    for key, value in {"train.resume": t.resume, "checkpoint.dir": cfg.checkpoint.dir, "log.dir": cfg.log.dir}.items():
        if not value.strip():
            raise ConfigError(f"{key} is empty: give a path{' (or auto / none)' if key == 'train.resume' else ''}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}: set min_lr <= lr (e.g. lr/10)")
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} does not divide by model.num_heads={m.num_heads}: "
            f"use a head count among {_divisors(m.hidden_size, limit=m.num_heads * 2)}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}: "
            f"use one of {_divisors(m.num_heads)}")
    if m.position_embedding == "learned" and m.max_position_embeddings < t.seq_len:
        raise ConfigError(
            f"model.max_position_embeddings={m.max_position_embeddings} is shorter than train.seq_len={t.seq_len}: "
            f"raise it to at least {t.seq_len} or shorten the sequences")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.train):
        raise ConfigError(
            f"data.weights has {len(cfg.data.weights)} entries but data.train has {len(cfg.data.train)}: "
            f"give one weight per training source, or none")
    if any(w <= 0 for w in cfg.data.weights):
        raise ConfigError(f"data.weights={cfg.data.weights} must all be positive")

    # Parallel layout rules that hold whatever the world size.
    if p.zero_stage == 0:
        # NOTE: without ZeRO, DeepSpeed hands the step to the bare torch optimizer: nothing skips a step
        # whose gradients are not finite, and bf16 keeps its fp32 master weights where checkpoints cannot
        # read them. On one data-parallel rank ZeRO-1 is the same as none.
        raise ConfigError("parallel.zero_stage=0 is not supported: use 1 (on one data-parallel rank it is the same as "
                          "no ZeRO, and with more it all-reduces no more data)")
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not a ZeRO stage: use 1, 2 or 3")
    if p.pipeline > 1 and p.zero_stage != 1:
        # NOTE: ZeRO 2/3 cannot shard gradients across pipeline stages, and without ZeRO DeepSpeed's
        # pipeline clips with a gradient norm that miscounts replicated weights.
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} does not work with parallel.pipeline={p.pipeline}: "
            f"use zero_stage 1 with pipelines, or pipeline=1")
    if m.num_heads % p.tensor or m.num_kv_heads % p.tensor:
        heads = m.num_kv_heads if m.num_heads % p.tensor == 0 else m.num_heads
        raise ConfigError(
            f"parallel.tensor={p.tensor} does not divide the {heads} attention heads: "
            f"use one of {_divisors(heads)}")
    if m.ffn_hidden_size % p.tensor:
        raise ConfigError(
            f"parallel.tensor={p.tensor} does not divide model.ffn_hidden_size={m.ffn_hidden_size}: "
            f"use one of {_divisors(m.ffn_hidden_size, limit=64)}")
    if 128 % p.tensor:
        raise ConfigError(f"parallel.tensor={p.tensor} does not divide 128, the multiple the vocabulary is padded "
                          f"to: use 1, 2, 4, 8, 16, 32, 64 or 128")
    if m.num_layers % p.pipeline:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline} does not divide model.num_layers={m.num_layers}: "
            f"use one of {_divisors(m.num_layers)}")
    if t.packed_attention == "flex" and m.attention_dropout > 0:
        raise ConfigError(f"train.packed_attention=flex has no attention dropout, and model.attention_dropout="
                          f"{m.attention_dropout}: set it to 0, or use train.packed_attention=sdpa")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1: set tensor=2 or more, or turn it off")
    if p.sequence_parallel and t.seq_len % p.tensor:
        raise ConfigError(
            f"train.seq_len={t.seq_len} does not divide by parallel.tensor={p.tensor}, "
            f"which sequence parallelism needs: use a multiple of {p.tensor}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}: use e.g. {_round_up(t.global_batch_size, t.micro_batch_size)}")

    if world_size is not None:
        model_parallel = p.tensor * p.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} does not divide by parallel.tensor x parallel.pipeline = {model_parallel}: "
                f"launch a multiple of {model_parallel} ranks or change the layout")
        data_parallel = world_size // model_parallel
        per_step = t.micro_batch_size * data_parallel
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x data_parallel "
                f"= {t.micro_batch_size} x {data_parallel} = {per_step}: use {_round_up(t.global_batch_size, per_step)}")
    return cfg


def _divisors(n: int, limit: int | None = None) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]
    return ", ".join(map(str, found))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
