"""`scalelm pretrain`: the training loop. The step is five lines; everything else is a call out."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from scalelm.config import Config, validate
from scalelm.data.loader import loader_from_config
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import ConfigError
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import destroy_distributed, env_rank, init_distributed
from scalelm.train import metrics
from scalelm.train.log import RunLog


def pretrain(cfg: Config) -> dict:
    """Train `cfg.train.steps` steps on this rank; returns the last metrics record on rank 0, None elsewhere."""
    _, world, _ = env_rank()
    validate(cfg, world_size=world)  # layout errors surface before any process group starts
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on the CPU): use bf16 or fp32 here")
    vocab_size = resolve_vocab_size(cfg)
    layout = init_distributed(cfg.parallel, cfg.train.seed)
    log = RunLog(cfg, active=layout.rank == 0, total_steps=cfg.train.steps)
    try:
        engine = Engine(cfg, layout, vocab_size)
        batches = iter(loader_from_config(cfg, "train", layout.dp_rank, layout.data))
        val_loader = loader_from_config(cfg, "val", layout.dp_rank, layout.data) if cfg.train.eval_every else None
        val_start = val_loader.state_dict() if val_loader else None  # every evaluation reads the same batches
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        flops = _flops(cfg, vocab_size)
        peak = metrics.peak_flops(layout.device)
        for step in range(1, cfg.train.steps + 1):
            started, lr = time.perf_counter(), engine.lr
            loss = engine.train_step(batches)
            seconds = time.perf_counter() - started
            log.step(_record(step, loss, lr, engine.grad_norm, tokens_per_step / seconds, flops, peak, layout))
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                val_loader.load_state_dict(val_start)
                val = engine.eval_loss(iter(val_loader), cfg.train.eval_iters)
                log.eval(step, val, math.exp(min(val, 50.0)))
        return log.last if layout.rank == 0 else None
    finally:
        log.close()
        destroy_distributed()


def resolve_vocab_size(cfg: Config) -> int:
    """The tokenizer's vocabulary, or model.vocab_size; they must agree when both are given."""
    if cfg.data.tokenizer is None:
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is null and there is no data.tokenizer to take it from: set one")
        return cfg.model.vocab_size
    size = load_tokenizer(Path(cfg.data.tokenizer)).vocab_size()
    if cfg.model.vocab_size not in (None, size):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but data.tokenizer has {size} pieces: "
                          f"set model.vocab_size={size} or null")
    return size


def _flops(cfg: Config, vocab_size: int) -> tuple[float, float]:
    full = cfg.train.activation_checkpointing == "full"
    return (metrics.flops_per_token_palm(cfg.model, vocab_size, cfg.train.seq_len),
            metrics.flops_per_token_megatron(cfg.model, vocab_size, cfg.train.seq_len, full))


def _record(step: int, loss: float, lr: float, grad_norm: float | None, tokens_per_s: float,
            flops: tuple[float, float], peak: float | None, layout) -> dict:
    per_device = tokens_per_s / layout.world
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": per_device * flops[0] / peak if peak else None,
            "mfu_megatron": per_device * flops[1] / peak if peak else None,
            "mem": metrics.memory_bytes(layout.device)}
