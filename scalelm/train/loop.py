"""`scalelm pretrain` and `scalelm finetune`: the training loop. The step is a few lines; resuming, guards,
validation and checkpoints are calls out of it. The two stages differ in their data (text or chat
shards), their objective and where they start (train/finetune.py), not in the loop."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator

import torch

from scalelm.checkpoint import store
from scalelm.checkpoint.base import base_of
from scalelm.checkpoint.hold import Hold
from scalelm.checkpoint.resume import find_checkpoint, init_weights, load_checkpoint
from scalelm.checkpoint.saver import Checkpoints
from scalelm.config import Config, validate
from scalelm.data.files import sha256_file
from scalelm.data.loader import loader_from_config
from scalelm.data.tokenizer import load_tokenizer
from scalelm.errors import ConfigError, Stopped, TrainingError
from scalelm.model.build import build_model
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import destroy_distributed, env_rank, gather_objects, init_distributed, rank_hosts
from scalelm.parallel.watchdog import Watchdog
from scalelm.train import metrics
from scalelm.train.finetune import check_data
from scalelm.train.guards import LossGuard
from scalelm.train.log import RunLog
from scalelm.train.objectives import objective_for
from scalelm.train.score import run_reference
from scalelm.train.signals import StopSignals


def pretrain(cfg: Config) -> dict:
    """Train to step `cfg.train.steps` on this rank, resuming from a checkpoint when there is one;
    returns the last metrics record on rank 0, None elsewhere. Raises Stopped after SIGTERM."""
    return train(cfg, "pretrain")


def train(cfg: Config, stage: str) -> dict:
    """The run of `stage` ("pretrain" or "finetune"), as `pretrain` describes."""
    _, world, _ = env_rank()
    validate(cfg, world_size=world)  # layout errors surface before any process group starts
    if cfg.finetune.lora and not cfg.train.init_from:
        raise ConfigError("finetune.lora adapts a trained model, and train.init_from is not set: set it to a checkpoint "
                          "or to `scalelm convert from-hf` output")
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on the CPU): use bf16 or fp32 here")
    vocab_size = cfg.model.vocab_size = resolve_vocab_size(cfg)  # saved with checkpoints, resolved
    tokenizer_sha = sha256_file(cfg.data.tokenizer) if cfg.data.tokenizer else None
    check_data(cfg, stage)  # the stage's kind of shards, before any process group starts
    layout = init_distributed(cfg.parallel, cfg.train.seed)
    try:
        with Hold(Path(cfg.checkpoint.dir), cfg.parallel.timeout, layout) as hold, \
                Watchdog(cfg.parallel.timeout, layout, before_exit=hold.release) as watchdog:
            notes = ([f"{layout.world} ranks, {rank_hosts()}"] if layout.world > 1 else []) + ([hold.note] if hold.note else [])
            return _train(cfg, stage, layout, vocab_size, tokenizer_sha, notes, watchdog)
    finally:
        destroy_distributed()


def _train(cfg: Config, stage: str, layout, vocab_size: int, tokenizer_sha: str | None, notes: list[str],
           watchdog: Watchdog) -> dict:
    log = None
    try:
        ckpt, manifest, more = find_checkpoint(cfg, layout)
        notes += more
        # DPO without LoRA: train.init_from's log-probs beside the shards, scored first when missing
        reference, more = run_reference(cfg, stage, layout, vocab_size, manifest.get("reference") if ckpt else None)
        notes += more
        scored = reference["model"]["sha256"] if reference else None
        loader = loader_from_config(cfg, "train", layout.dp_rank, layout.data, reference=scored)
        objective = objective_for(cfg, stage)
        engine = Engine(cfg, layout, build_model(cfg, layout, vocab_size, loader.documents), objective)
        run = {"step": 0, "consumed_tokens": 0, "guard": None}
        if ckpt is not None:
            run, more = load_checkpoint(cfg, layout, engine, loader, ckpt, manifest, tokenizer_sha)
            notes += more
        elif cfg.train.init_from:
            notes.append(init_weights(cfg, engine, tokenizer_sha, flag="moving it back to that path"))
        # the weights a LoRA run's checkpoints name as their base: those it loaded, whatever init_from's newest is later
        base = (manifest.get("base") if ckpt is not None else None) or (base_of(Path(cfg.train.init_from))
                                                                        if cfg.finetune.lora else None)
        log = RunLog(cfg, active=layout.rank == 0, total_steps=cfg.train.steps, first_step=run["step"], stage=stage)
        if cfg.finetune.lora:
            notes.append(_lora_note(cfg, vocab_size))
        for note in notes + ([loader.packing()] if loader.chat else []):
            log.note(run["step"], note)
        guard = LossGuard(cfg.train.max_bad_steps, cfg.train.spike_zscore, run["guard"])
        batches = _Traced(iter(loader))
        validation = _Validation(cfg, layout, scored) if cfg.train.eval_every else None
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        flops, peak = _flops(cfg, vocab_size), metrics.peak_flops(layout.device)
        checkpoints = Checkpoints(cfg, layout, engine, {"tokenizer_sha256": tokenizer_sha, "base": base, "reference": reference},
                                  log.note, newest=run["step"] if ckpt is not None else None)
        with checkpoints, StopSignals(layout.device) as signals:
            for step in range(run["step"] + 1, cfg.train.steps + 1):
                started, lr, watchdog.step = time.perf_counter(), engine.lr, step
                loss = engine.train_step(batches.for_step())
                seconds = time.perf_counter() - started
                log.step(_record(step, loss, lr, engine.grad_norm, tokens_per_step / seconds, flops, peak, layout)
                         | engine.step_metrics)
                try:
                    note = guard.check(step, loss, engine.step_applied)
                except TrainingError as e:
                    checkpoints.wait()
                    raise TrainingError(f"{e} (newest checkpoint: {_checkpoint_name(cfg, checkpoints.newest)})") from None
                run = {"step": step, "consumed_tokens": run["consumed_tokens"] + tokens_per_step, "guard": guard.state()}
                if note:
                    log.note(step, note + batches.where())
                if validation and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                    log.eval(step, *validation.run(engine), metrics=engine.step_metrics)
                checkpoints.poll()  # a save in the background moves on
                signalled, stop = signals.poll()
                why = _save_reason(cfg, step, signalled, stop)
                if why:  # after a skipped step too: the guard checked the weights were left as they were
                    checkpoints.save(step, run, loader.state_dict(), why, wait=why != "checkpoint.every")
                if stop:
                    raise Stopped(f"stopped by SIGTERM after step {step}; newest checkpoint: "
                                  f"{_checkpoint_name(cfg, checkpoints.newest)}; run the same command to resume")
            checkpoints.wait()  # a run resumed at its last step saves nothing, and may have nothing to wait for
        return (log.last or {"step": run["step"]}) if layout.rank == 0 else None
    finally:
        if log is not None:
            log.close()


def _lora_note(cfg: Config, vocab_size: int) -> str:
    from scalelm.model.lora import adapter_parameters
    from scalelm.model.spec import padded_vocab_size

    lora, total = cfg.finetune.lora, metrics.parameter_count(cfg.model, padded_vocab_size(vocab_size))
    trainable = adapter_parameters(cfg.model, lora)
    head = cfg.finetune.num_labels * cfg.model.hidden_size if cfg.finetune.head == "classification" else 0
    return (f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: {trainable + head:,} trainable parameters"
            + (f" ({head:,} of them the classification head's)" if head else "")
            + f", {100 * (trainable + head) / total:.2f}% of the frozen base's {total:,}")


def _save_reason(cfg: Config, step: int, signalled: bool, stop: bool) -> str | None:
    if stop:
        return "SIGTERM"
    if signalled:
        return "SIGUSR1"
    if step == cfg.train.steps:
        return "end of run"
    return "checkpoint.every" if step % cfg.checkpoint.every == 0 else None


def _checkpoint_name(cfg: Config, step: int | None) -> str:
    return "none" if step is None else str(store.step_dir(Path(cfg.checkpoint.dir), step))


class _Traced:
    """The micro-batch iterator, remembering where the current step's sequences came from."""

    def __init__(self, batches: Iterator[dict]):
        self.batches, self.origins = batches, []

    def for_step(self) -> Iterator[dict]:
        self.origins = []
        return self

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        self.origins += batch["origin"]
        return batch

    def where(self) -> str:
        """The step's sequences (every data-parallel rank's) as SHARD@TOKEN_OFFSET; collective."""
        origins = sorted({o for rank in gather_objects(self.origins) for o in rank})
        return f"; its batch: {', '.join(origins)}"


class _Validation:
    """The validation loss on the same batches every time: the val loader is built once and rewound."""

    def __init__(self, cfg: Config, layout, reference: str | None):
        self.loader = loader_from_config(cfg, "val", layout.dp_rank, layout.data, reference)
        self.start, self.iters = self.loader.state_dict(), cfg.train.eval_iters

    def run(self, engine: Engine) -> tuple[float, float]:
        self.loader.load_state_dict(self.start)
        val = engine.eval_loss(iter(self.loader), self.iters)
        return val, math.exp(min(val, 50.0))


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
