"""DeepSpeed assembly around a built model (model/build.py): the objective, AdamW, the schedule, ZeRO, precision.

    parallel.pipeline == 1   the GPT inside a plain DeepSpeedEngine, ZeRO stage 1-3 over the data group
    parallel.pipeline > 1    its DeepSpeed PipelineModule, 1F1B, ZeRO-1; the objective is the last stage's loss_fn

`Engine.train_step` takes one optimizer step from an iterator of micro-batches and returns the
step's loss over the whole global batch, weighted by target tokens (train/objectives.py);
`Engine.eval_loss` computes the same over micro-batches without touching the weights, and an engine
built with `train=False` has no optimizer at all. A step whose gradients are not finite is skipped by DeepSpeed's ZeRO
optimizer (weights, moments and schedule untouched; `step_applied` says so). For checkpoints,
`gather` / `scatter` move each parameter's state as whole tensors (see state.py) and
`counters` / `load_counters` the rest: AdamW's step count, the schedule and DeepSpeed's own counts.
Everything about which rank holds what stays in here.
"""

from __future__ import annotations

from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from scalelm.config import Config
from scalelm.parallel import state
from scalelm.parallel.grads import sum_sequence_parallel_grads
from scalelm.parallel.topology import Layout, MegatronMPU
from scalelm.train.objectives import NextToken
from scalelm.train.schedule import lr_scheduler


def grad_accum_steps(cfg: Config, layout: Layout) -> int:
    """Micro-batches per rank per optimizer step: global = micro x accum x data-parallel (validated)."""
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data)


def deepspeed_config(cfg: Config, layout: Layout, zero: bool = True) -> dict:
    """DeepSpeed's config; without `zero` (no optimizer: evaluation) ZeRO is off and only precision matters."""
    t = cfg.train
    stage = cfg.parallel.zero_stage if zero else 0
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, layout),
        "gradient_clipping": cfg.optim.grad_clip,
        # On one rank a contiguous gradient buffer is only one more copy of every gradient per step (4% of a
        # 125M CPU step); across ranks it is what ZeRO reduces and partitions from.
        "zero_optimization": {"stage": stage, "contiguous_gradients": stage == 3 or layout.data > 1},
        # bf16 gradients accumulate over micro-batches in fp32 (DeepSpeed does this under ZeRO-1)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if t.precision == "bf16" and stage == 1 else {}),
        "bf16": {"enabled": t.precision == "bf16"},
        # Dynamic loss scaling: start at 2^16, halve on overflow, double after 1000 clean steps.
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def model_inputs(batch: dict) -> list[torch.Tensor]:
    """What the model takes from a batch: input_ids, and for packed documents their position_ids and document_ids."""
    return [batch["input_ids"]] + ([batch["position_ids"], batch["document_ids"]] if "document_ids" in batch else [])


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other vectors are not decayed. Frozen weights (LoRA's
    base) are in no group, so AdamW neither holds state for them nor decays them; an empty group is left out
    (DeepSpeed drops it, and the schedule would then count one group too many)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class Engine:
    """A model on this rank, wrapped by DeepSpeed, one optimizer step at a time; with `train=False`, no
    optimizer at all (evaluation, scoring): the weights are the model's, loaded through `scatter`."""

    def __init__(self, cfg: Config, layout: Layout, model: torch.nn.Module, objective=None, train: bool = True):
        self.pipeline = layout.pipeline > 1
        self.objective = objective or NextToken()
        self.layout = layout
        self.grad_accum = grad_accum_steps(cfg, layout)
        if self.pipeline:
            model.loss_fn = self._pipeline_loss
        if cfg.parallel.sequence_parallel:
            sum_sequence_parallel_grads(model, parallel_state.get_tensor_model_parallel_group())
        model.to(layout.device)
        optimizer = scheduler = None
        if train:
            o = cfg.optim
            optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                          eps=o.eps, fused=True)
            scheduler = lr_scheduler(optimizer, o)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, layout, zero=train), mpu=None if self.pipeline else MegatronMPU())
        if train:  # AdamW's state exists from the start, so checkpoints can read and load it before any step
            state.init_optimizer_state(self.optimizer)
        # the first and last pipeline stages read the micro-batches (inputs, targets); the others never see them
        self.reads_data = not self.pipeline or self.engine.is_first_stage() or self.engine.is_last_stage()
        self.computes_loss = not self.pipeline or self.engine.is_last_stage()
        self.step_metrics: dict[str, float] = {}
        self._sums: torch.Tensor | None = None  # the pipeline's metric sums, added up by _pipeline_loss
        self._capture = None  # (fn, values) while forward_only runs the pipeline

    def train_step(self, batches: Iterator[dict]) -> float:
        """One optimizer step over grad_accum micro-batches; the loss of the global batch, token-weighted (pair-weighted
        for DPO). `step_metrics` then holds the step's unit count (targets, pairs) and the objective's metrics."""
        micro = self._take(batches, self.grad_accum)
        if self.pipeline:
            loss = self.engine.train_batch(data_iter=self._pipeline_batches(micro)).item()
            return self._finish(loss)
        total = torch.zeros((), device=self.layout.device)
        for batch in micro:
            loss = self._micro_loss(batch)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return self._finish(self._data_parallel_mean(total / self.grad_accum))

    @torch.no_grad()
    def eval_loss(self, batches: Iterator[dict], micro_batches: int) -> float:
        """The token-weighted loss of `micro_batches` micro-batches per data-parallel rank, weights untouched."""
        micro = self._take(batches, micro_batches)
        if self.pipeline:
            loss = self.engine.eval_batch(self._pipeline_batches(micro), num_micro_batches=micro_batches).item()
            return self._finish(loss)
        self.engine.eval()
        total = torch.zeros((), device=self.layout.device)
        for batch in micro:
            total += self._micro_loss(batch).float()
        self.engine.train()
        return self._finish(self._data_parallel_mean(total / micro_batches))

    # NOTE: how the token weighting is done. Each micro-batch's loss is its sum over target tokens times
    # scale = micro-batches x data-parallel ranks / (target tokens of the whole batch). DeepSpeed itself
    # divides the backward by the accumulation steps and averages gradients (and, for the pipeline, the
    # reported loss) over data-parallel ranks, which turns every figure into Σ sums / Σ targets.

    def _take(self, batches: Iterator[dict], n: int) -> list[dict]:
        """The step's micro-batches, each with its `scale` (and, for an objective that needs a reference pass, its
        `reference`); collective over the data-parallel group (and the reference pass over the model)."""
        micro = []
        if self.reads_data:
            micro = [next(batches) for _ in range(n)]
            units = torch.tensor(float(sum(self.objective.units(b) for b in micro)), device=self.layout.device)
            if self.layout.data > 1:
                dist.all_reduce(units, group=parallel_state.get_data_parallel_group())
            self._units = int(units.item())
            scale = torch.tensor(n * self.layout.data / max(self._units, 1), dtype=torch.float32)
            micro = [{**b, "scale": scale} for b in micro]
        self._sums = None
        if self.objective.reference_pass:
            self._reference(micro, n)
        return micro

    def _reference(self, micro: list[dict], n: int) -> None:
        """DPO's reference under LoRA: each micro-batch's per-document log-probs by this model with its adapters off,
        as its `reference` field (zeros on a first pipeline stage, which reads the batch but computes no loss)."""
        from scalelm.model.lora import adapters_off

        with adapters_off(self.engine.module):
            values = self.forward_only(micro, n, self.objective.document_logps)
        for batch, value in zip(micro, values):
            batch["reference"] = value.cpu() if value is not None else torch.zeros(batch["labels"].shape)

    def forward_only(self, micro: list[dict], n: int, fn) -> list[torch.Tensor | None]:
        """`fn(logits, batch)` of each of the `n` micro-batches, the model in eval mode and without gradients: the
        values on the ranks that compute the loss, None on the other pipeline stages; collective. On the pipeline
        the last stage gets the objective's fields of each batch, so `fn` may read those."""
        if self.pipeline:
            out: list[torch.Tensor] = []
            self._capture = (fn, out)
            micro = [b if "scale" in b else {**b, "scale": torch.ones(())} for b in micro]  # the targets carry one
            try:
                self.engine.eval_batch(self._pipeline_batches(micro), num_micro_batches=n)
            finally:
                self._capture = None
            return out if self.computes_loss else [None] * len(micro)
        training = self.engine.training
        self.engine.eval()
        with torch.no_grad():
            out = []
            for batch in micro:
                on_device = {k: v.to(self.layout.device) for k, v in batch.items() if torch.is_tensor(v)}
                out.append(fn(self.engine(*model_inputs(on_device)), on_device))
        self.engine.train(training)
        return out

    def _micro_loss(self, batch: dict) -> torch.Tensor:
        on_device = {k: v.to(self.layout.device) for k, v in batch.items() if torch.is_tensor(v)}
        logits = self.engine(*model_inputs(on_device))
        loss_sum, metrics = self.objective(logits, on_device)
        self._add_metrics(metrics)
        return loss_sum * on_device["scale"]

    def _pipeline_batches(self, micro: list[dict]) -> Iterator[tuple]:
        """(inputs, targets) pairs as DeepSpeed's pipeline takes them: the first stage gets the inputs, the
        last the objective's fields and the scale."""
        self._fields = [k for k in self.objective.fields if micro and k in micro[0]]
        for batch in micro:
            inputs = model_inputs(batch)
            yield (inputs[0] if len(inputs) == 1 else tuple(inputs)), (*(batch[k] for k in self._fields), batch["scale"])

    def _pipeline_loss(self, logits: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        *fields, scale = targets
        if self._capture is not None:  # forward_only: keep fn's value, and give DeepSpeed a loss to average
            fn, out = self._capture
            out.append(fn(logits, dict(zip(self._fields, fields))))
            return torch.zeros((), device=logits.device)
        loss_sum, metrics = self.objective(logits, dict(zip(self._fields, fields)))
        self._add_metrics(metrics)
        return loss_sum * scale

    def _add_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        if self.objective.metrics:
            values = torch.stack([metrics[k].detach().float() for k in self.objective.metrics])
            self._sums = values if self._sums is None else self._sums + values

    def _finish(self, loss: float) -> float:
        """Sets step_metrics: the step's target count and metrics (sums over the batch / targets); collective."""
        self.step_metrics = {self.objective.unit: self._units if self.reads_data else None}
        if not self.objective.metrics:
            return loss
        sums = self._sums if self.computes_loss and self._sums is not None else \
            torch.zeros(len(self.objective.metrics), device=self.layout.device)
        if self.computes_loss and self.layout.data > 1:
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if self.pipeline:  # from the last stage to every stage: the others add zeros
            dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        if self.reads_data:
            self.step_metrics |= {k: v / max(self._units, 1) for k, v in zip(self.objective.metrics, sums.tolist())}
        return loss

    @property
    def step_applied(self) -> bool:
        """False when DeepSpeed skipped the last step (gradients not finite, or an fp16 overflow)."""
        return self.engine.was_step_applied()

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under single-process names, in the order every rank of a stage agrees on."""
        return state.named_parameters(self.engine.module)

    def gather(self, param: torch.nn.Parameter, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole fp32 `key` state (param / exp_avg / exp_avg_sq) of `param`, into `out` if given; collective."""
        return state.gather(param, key, self.optimizer, out)

    def whole_shape(self, param: torch.nn.Parameter) -> tuple[int, ...]:
        return state.whole_shape(param)

    def scatter(self, param: torch.nn.Parameter, key: str, whole: torch.Tensor) -> None:
        """Set the `key` state of `param` from its whole fp32 value; collective under ZeRO-3."""
        state.scatter(param, key, whole, self.optimizer)

    def counters(self) -> dict:
        """Everything but tensors that the next step depends on, as JSON-safe data."""
        scaler = getattr(self.optimizer, "loss_scaler", None)
        return {"adam_steps": state.optimizer_steps(self.optimizer), "schedule_step": self.scheduler.last_epoch,
                "global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                "skipped_steps": self.engine.skipped_steps,
                "loss_scaler": {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}
                if scaler is not None else None}

    def load_counters(self, counters: dict) -> None:
        state.set_optimizer_steps(self.optimizer, counters["adam_steps"])
        # Only the position in the schedule is restored: the schedule itself is the config's, so a
        # resumed run may change optim.lr or the decay.
        sched = self.scheduler
        sched.last_epoch = counters["schedule_step"]
        sched._step_count = sched.last_epoch + 1
        sched._last_lr = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, sched._last_lr):
            group["lr"] = lr
        self.engine.global_steps = counters["global_steps"]
        self.engine.global_samples = counters["global_samples"]
        self.engine.skipped_steps = counters["skipped_steps"]
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if scaler is not None and counters["loss_scaler"]:
            for key, value in counters["loss_scaler"].items():
                setattr(scaler, key, value)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping (None where DeepSpeed keeps none)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _data_parallel_mean(self, loss: torch.Tensor) -> float:
        if self.layout.data > 1:
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= self.layout.data
        return loss.item()
