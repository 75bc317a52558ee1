"""The config's derived values and rules: `validate(cfg)`, one function per section, in the order below.

Every error names the field, the bad value and the fix (`parallel.tensor=5 does not divide the 12
attention heads: use one of 1, 2, 3, 4, 6, 12`). The objective's own rules are its own (scalelm/objectives).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scalelm.config.finetune import LORA_TARGETS, layer_sides
from scalelm.errors import ConfigError

if TYPE_CHECKING:
    from scalelm.config.sections import Config


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Fill in derived values and check every section's rules; with `world_size`, the layout too.

    Raises ConfigError naming the field, its value and the fix. Returns the same (mutated) config.
    """
    derive(cfg)
    check_counts(cfg)
    check_model(cfg)
    check_data(cfg)
    check_parallel(cfg)
    check_batch(cfg)
    check_finetune(cfg)
    if world_size is not None:
        check_world(cfg, world_size)
    return cfg


def derive(cfg: Config) -> None:
    """The fields left null, from the others."""
    m, t = cfg.model, cfg.train
    if m.num_kv_heads is None:
        m.num_kv_heads = m.num_heads
    if m.ffn_hidden_size is None:
        # NOTE: SwiGLU has three matrices instead of two, so 8/3 x keeps the MLP's parameter count
        # at the 4 x GELU budget (the Llama rule), rounded up to a multiple of 256 for the kernels.
        m.ffn_hidden_size = 4 * m.hidden_size if m.activation == "gelu" else -(-8 * m.hidden_size // 3 // 256) * 256
    if m.max_position_embeddings is None:
        m.max_position_embeddings = t.seq_len
    if cfg.optim.decay_steps is None:
        cfg.optim.decay_steps = t.steps
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(Path(cfg.log.dir) / "checkpoints")


def check_counts(cfg: Config) -> None:
    """Counts, rates and paths of every section within their ranges."""
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train
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


def check_model(cfg: Config) -> None:
    """The model's shape agrees with itself and with the sequence length."""
    m, t = cfg.model, cfg.train
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


def check_data(cfg: Config) -> None:
    """One blending weight per training source."""
    d = cfg.data
    if d.weights and len(d.weights) != len(d.train):
        raise ConfigError(
            f"data.weights has {len(d.weights)} entries but data.train has {len(d.train)}: "
            f"give one weight per training source, or none")
    if any(w <= 0 for w in d.weights):
        raise ConfigError(f"data.weights={d.weights} must all be positive")


def check_parallel(cfg: Config) -> None:
    """The layout's rules that hold whatever the world size."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.zero_stage == 0:
        # NOTE: without ZeRO, DeepSpeed hands the step to the bare torch optimizer: nothing skips a step
        # whose gradients are not finite, and bf16 keeps its fp32 master weights where checkpoints cannot
        # read them. On one data-parallel rank ZeRO-1 is the same as none.
        raise ConfigError("parallel.zero_stage=0 is not supported: use 1 (on one data-parallel rank it is the same as "
                          "no ZeRO, and with more it all-reduces no more data)")
    if not p.timeout > 0:
        raise ConfigError(f"parallel.timeout={p.timeout} must be a positive number of seconds (the default is 600)")
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


def check_batch(cfg: Config) -> None:
    t = cfg.train
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}: use e.g. {_round_up(t.global_batch_size, t.micro_batch_size)}")


def check_finetune(cfg: Config) -> None:
    """LoRA's adapters fit the model; the head has an output."""
    f = cfg.finetune
    if f.lora is not None:
        check_lora(cfg)
    if f.num_labels < 1:
        raise ConfigError(f"finetune.num_labels={f.num_labels} must be at least 1")


def check_lora(cfg: Config) -> None:
    lora = cfg.finetune.lora
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown or not lora.targets:
        raise ConfigError(f"finetune.lora.targets={lora.targets}: {'no target' if not unknown else repr(unknown[0]) + ' is no target'}; "
                          f"use some of {', '.join(LORA_TARGETS)}")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"finetune.lora.targets={lora.targets} names a target twice")
    narrowest = min(min(layer_sides(cfg.model, t)) for t in lora.targets)
    if not 1 <= lora.rank <= narrowest:
        raise ConfigError(f"finetune.lora.rank={lora.rank} must be from 1 to {narrowest}, the narrowest side of the "
                          f"adapted layers ({', '.join(lora.targets)})")
    if lora.alpha <= 0:
        raise ConfigError(f"finetune.lora.alpha={lora.alpha} must be positive (e.g. 2 x rank = {2 * lora.rank})")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"finetune.lora.dropout={lora.dropout} must be in [0, 1)")


def check_world(cfg: Config, world_size: int) -> None:
    """The layout against the ranks launched."""
    p, t = cfg.parallel, cfg.train
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


def _divisors(n: int, limit: int | None = None) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]
    return ", ".join(map(str, found))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
