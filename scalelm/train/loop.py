"""`scalelm pretrain` and `scalelm finetune`: the training loop. The step is a few lines; resuming, guards,
validation and checkpoints are calls out of it. The two commands differ in their objective (train.objective or
finetune.objective: scalelm/objectives), the data it trains on and where they start (train/finetune.py), not in
the loop.

    a batch source      train/sources.py: token shards, transformed as the objective needs (its reference); or for
                        RL, the model's own completions, sampled and scored (rl/source.py)
    the engine          parallel/engine.py, handed the model, the objective, AdamW (train/optim.py) and the
                        schedule (train/schedule.py)
    each step           source.take -> engine.forward_backward -> engine.optimizer_step -> log, guard, validate, save
"""

from __future__ import annotations

import time
from pathlib import Path

from scalelm.checkpoint import store
from scalelm.checkpoint.base import base_of
from scalelm.checkpoint.hold import Hold
from scalelm.checkpoint.resume import find_checkpoint, init_weights, load_checkpoint
from scalelm.checkpoint.run_state import RunState
from scalelm.checkpoint.saver import Checkpoints
from scalelm.config import Config
from scalelm.config.finetune import adapter_parameters
from scalelm.data.files import sha256_file
from scalelm.data.loader import loader_from_config
from scalelm.errors import Stopped, TrainingError
from scalelm.model.build import build_model
from scalelm.model.size import flops_per_token_megatron, flops_per_token_palm, parameter_count
from scalelm.model.spec import padded_vocab_size
from scalelm.objectives import Objective, Stage
from scalelm.parallel.engine import Engine
from scalelm.parallel.topology import before_the_ranks_meet, env_rank, gather_objects, process_group, rank_hosts
from scalelm.parallel.watchdog import Watchdog
from scalelm.train import metrics
from scalelm.train.guards import LossGuard
from scalelm.train.log import RunLog
from scalelm.train.optim import AdamW
from scalelm.train.preflight import preflight
from scalelm.train.records import StepRecord
from scalelm.train.schedule import Schedule
from scalelm.train.score import run_reference
from scalelm.train.signals import StopSignals
from scalelm.train.sources import batch_source, run_data


def pretrain(cfg: Config) -> dict:
    """Train to step `cfg.train.steps` on this rank, resuming from a checkpoint when there is one;
    returns the last metrics record on rank 0, None elsewhere. Raises Stopped after SIGTERM."""
    return train(cfg, "pretrain")


def train(cfg: Config, stage: Stage) -> dict:
    """The run of `stage` ("pretrain" or "finetune"), as `pretrain` describes. An error is reported by one rank."""
    with before_the_ranks_meet():
        objective = preflight(cfg, stage, env_rank()[1])
    tokenizer_sha = sha256_file(cfg.data.tokenizer) if cfg.data.tokenizer else None
    with process_group(cfg.parallel, cfg.train.seed) as layout, \
            Hold(Path(cfg.checkpoint.dir), cfg.parallel.timeout, layout) as hold, \
            Watchdog(cfg.parallel.timeout, layout, before_exit=hold.release) as watchdog:
        notes = ([f"{layout.world} ranks, {rank_hosts()}"] if layout.world > 1 else []) + ([hold.note] if hold.note else [])
        return _train(cfg, stage, objective, layout, tokenizer_sha, notes, watchdog)


def _train(cfg: Config, stage: Stage, objective: Objective, layout, tokenizer_sha: str | None, notes: list[str],
           watchdog: Watchdog) -> dict:
    log = None
    try:
        ckpt, manifest, more = find_checkpoint(cfg, layout)
        notes += more
        # DPO without LoRA: train.init_from's log-probs beside the shards, scored first when missing
        reference, more = run_reference(cfg, objective, layout, manifest.get("reference") if ckpt else None)
        notes += more
        scored = reference["model"]["sha256"] if reference else None
        data = run_data(cfg, objective, layout, scored)  # token shards, or for RL its rollouts
        model = build_model(cfg, layout, cfg.model.vocab_size, data.documents, objective.num_labels())
        engine = Engine(cfg, layout, model, objective, AdamW(cfg.optim), Schedule(cfg.optim))
        source = data.source(engine)
        run = RunState()
        if ckpt is not None:
            run, more = load_checkpoint(cfg, layout, engine, source, ckpt, manifest, tokenizer_sha)
            notes += more
        elif cfg.train.init_from:
            notes.append(init_weights(cfg, engine, tokenizer_sha, flag="moving it back to that path"))
        # the weights a LoRA run's checkpoints name as their base: those it loaded, whatever init_from's newest is later
        base = (manifest.get("base") if ckpt is not None else None) or (base_of(Path(cfg.train.init_from))
                                                                        if cfg.finetune.lora else None)
        log = RunLog(cfg, objective, active=layout.rank == 0, total_steps=cfg.train.steps, first_step=run.step, stage=stage)
        if cfg.finetune.lora:
            notes.append(_lora_note(cfg, objective))
        for note in notes + data.notes:
            log.note(run.step, note)
        guard = LossGuard(cfg.train.max_bad_steps, cfg.train.spike_zscore, run.guard)
        validation = _Validation(cfg, layout, engine, scored) if cfg.train.eval_every else None
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        flops, peak = _flops(cfg), metrics.peak_flops(layout.device)
        checkpoints = Checkpoints(cfg, layout, engine, {"tokenizer_sha256": tokenizer_sha, "base": base, "reference": reference},
                                  log.note, newest=run.step if ckpt is not None else None)
        with checkpoints, StopSignals(layout.device) as signals:
            for step in range(run.step + 1, cfg.train.steps + 1):
                started, lr, watchdog.step = time.perf_counter(), engine.lr, step
                micro = source.take(engine.grad_accum)
                data_s = time.perf_counter() - started  # reading, or for RL sampling and scoring
                outcome = engine.forward_backward(micro)
                engine.optimizer_step()
                log.step(_record(step, outcome, {"data_s": data_s, **source.report()}, lr, engine.grad_norm,
                                 tokens_per_step / (time.perf_counter() - started), flops, peak, layout))
                try:
                    note = guard.check(step, outcome.loss, engine.step_applied)
                except TrainingError as e:
                    checkpoints.wait()
                    raise TrainingError(f"{e} (newest checkpoint: {_checkpoint_name(cfg, checkpoints.newest)})") from None
                run = RunState(step, run.consumed_tokens + tokens_per_step, guard.state())
                if note:
                    log.note(step, note + _where(micro))
                if validation and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                    log.eval(step, *validation.run())
                checkpoints.poll()  # a save in the background moves on
                signalled, stop = signals.poll()
                why = _save_reason(cfg, step, signalled, stop)
                if why:  # after a skipped step too: the guard checked the weights were left as they were
                    checkpoints.save(step, run, source.state_dict(), why, wait=why != "checkpoint.every")
                if stop:
                    raise Stopped(f"stopped by SIGTERM after step {step}; newest checkpoint: "
                                  f"{_checkpoint_name(cfg, checkpoints.newest)}; run the same command to resume")
            checkpoints.wait()  # a run resumed at its last step saves nothing, and may have nothing to wait for
        return (log.last or {"step": run.step}) if layout.rank == 0 else None
    finally:
        if log is not None:
            log.close()


def _lora_note(cfg: Config, objective: Objective) -> str:
    lora, total = cfg.finetune.lora, parameter_count(cfg.model, padded_vocab_size(cfg.model.vocab_size))
    trainable = adapter_parameters(cfg.model, lora)
    head = (objective.num_labels() or 0) * cfg.model.hidden_size
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


def _where(micro: list[dict]) -> str:
    """Where the step's sequences (every data-parallel rank's) came from, as SHARD@TOKEN_OFFSET; collective."""
    origins = sorted({o for rank in gather_objects([o for b in micro for o in b["origin"]]) for o in rank})
    return f"; its batch: {', '.join(origins)}"


class _Validation:
    """The validation loss on the same batches every time: the val loader is built once and rewound, its batches
    made as the training ones are (the reference the objective may need)."""

    def __init__(self, cfg: Config, layout, engine: Engine, reference: str | None):
        loader = loader_from_config(cfg, "val", layout.dp_rank, layout.data, reference)
        self.engine, self.source, self.iters = engine, batch_source(loader, engine), cfg.train.eval_iters
        self.start = loader.state_dict()

    def run(self) -> tuple[float, dict[str, float]]:
        self.source.load_state_dict(self.start)
        outcome = self.engine.evaluate(self.source.take(self.iters), self.iters)
        return outcome.loss, outcome.metrics


def _flops(cfg: Config) -> tuple[float, float]:
    full = cfg.train.activation_checkpointing == "full"
    return (flops_per_token_palm(cfg.model, cfg.model.vocab_size, cfg.train.seq_len),
            flops_per_token_megatron(cfg.model, cfg.model.vocab_size, cfg.train.seq_len, full))


def _record(step: int, outcome, measured: dict[str, float], lr: float, grad_norm: float | None, tokens_per_s: float,
            flops: tuple[float, float], peak: float | None, layout) -> StepRecord:
    per_device = tokens_per_s / layout.world
    return StepRecord(step, outcome.loss, lr, grad_norm, tokens_per_s,
                      mfu=per_device * flops[0] / peak if peak else None,
                      mfu_megatron=per_device * flops[1] / peak if peak else None,
                      mem=metrics.memory_bytes(layout.device), units={outcome.unit: outcome.units},
                      metrics={**outcome.metrics, **measured})
