"""The config's derived values and cross-field rules: `validate(cfg)`, the one place they live.

Every error names the field, the bad value and the fix (`parallel.tensor=5 does not divide the 12
attention heads: use one of 1, 2, 3, 4, 6, 12`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scalelm.errors import ConfigError

if TYPE_CHECKING:
    from scalelm.config import Config


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
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}: use e.g. {_round_up(t.global_batch_size, t.micro_batch_size)}")

    if cfg.finetune.lora is not None:
        _check_lora(cfg)
    if cfg.finetune.objective == "dpo":
        _check_dpo(cfg)
    _check_head(cfg)

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


def _check_lora(cfg: Config) -> None:
    from scalelm.model.lora import TARGETS, layer_sides

    lora = cfg.finetune.lora
    unknown = [t for t in lora.targets if t not in TARGETS]
    if unknown or not lora.targets:
        raise ConfigError(f"finetune.lora.targets={lora.targets}: {'no target' if not unknown else repr(unknown[0]) + ' is no target'}; "
                          f"use some of {', '.join(TARGETS)}")
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


def _check_head(cfg: Config) -> None:
    f = cfg.finetune
    if f.objective in ("dpo", "reward") and f.train_on == "all":
        raise ConfigError(f"finetune.train_on=all would count the prompt in each reply's log-prob, and "
                          f"finetune.objective={f.objective} compares replies: use assistant (the default)")
    if f.objective == "reward" and (f.head != "classification" or f.num_labels != 1):
        raise ConfigError(f"finetune.objective=reward scores each reply with one number: set finetune.head=classification "
                          f"and finetune.num_labels=1 (now head={f.head}, num_labels={f.num_labels})")
    if f.objective == "classify" and (f.head != "classification" or f.num_labels < 2):
        raise ConfigError(f"finetune.objective=classify needs finetune.head=classification and finetune.num_labels of 2 "
                          f"or more, the classes (now head={f.head}, num_labels={f.num_labels})")
    if f.head == "classification" and f.objective not in ("reward", "classify"):
        raise ConfigError(f"finetune.head=classification trains with finetune.objective=classify (labelled texts) or "
                          f"reward (a reward model on preference pairs), not {f.objective}")
    if f.num_labels < 1:
        raise ConfigError(f"finetune.num_labels={f.num_labels} must be at least 1")


def _check_dpo(cfg: Config) -> None:
    dpo = cfg.finetune.dpo
    if dpo.beta <= 0:
        raise ConfigError(f"finetune.dpo.beta={dpo.beta} must be positive (0.1 is usual; smaller lets the policy move further)")
    if not 0 <= dpo.label_smoothing < 0.5:
        raise ConfigError(f"finetune.dpo.label_smoothing={dpo.label_smoothing} must be in [0, 0.5)")
    if dpo.label_smoothing and dpo.loss != "robust":
        raise ConfigError(f"finetune.dpo.label_smoothing={dpo.label_smoothing} goes with finetune.dpo.loss=robust, "
                          f"not {dpo.loss}")
    if dpo.sft_weight < 0:
        raise ConfigError(f"finetune.dpo.sft_weight={dpo.sft_weight} must be 0 (off) or positive")


def _divisors(n: int, limit: int | None = None) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]
    return ", ".join(map(str, found))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
