"""The engine: a built model (model/build.py) on this rank, wrapped by DeepSpeed, and handed its work from outside:
an objective (scalelm/objectives), and for training an optimizer factory and a learning rate schedule.

    parallel.pipeline == 1   the model inside a plain DeepSpeedEngine, ZeRO stage 1-3 over the data group
    parallel.pipeline > 1    its DeepSpeed PipelineModule, 1F1B, ZeRO-1; the objective is the last stage's loss_fn

    forward_backward(micro)              one step's micro-batches forward and backward, gradients accumulated
    optimizer_step()                     the step: DeepSpeed skips it when the gradients are not finite (weights,
                                         moments and schedule untouched; `step_applied` says so)
    evaluate(micro, count)               the objective's loss and metrics, weights untouched
    forward_only(micro, count, output)   what the model computes for each micro-batch (objectives.Output: logits,
                                         per-token log-probs, scores, hidden states), without gradients

Each takes this rank's micro-batches ([] on a pipeline's middle stages, which read none) and is collective. The
step's loss is the objective's sum over the global batch divided by its units (objectives/base.py): each
micro-batch's loss is scaled by micro-batches x data-parallel ranks / (units of the whole batch), and DeepSpeed
divides the backward by the accumulation steps and averages gradients (and the pipeline's reported loss) over
data-parallel ranks, which turns every figure into Σ sums / Σ units.

For checkpoints the state is whole tensors under single-process names (parallel/state.py): `named_parameters`,
`gather`, `scatter`, `states`, and `counters` / `load_counters` for the rest. An engine without an optimizer
(evaluation, scoring) has only weights. Everything about which rank holds what stays in here.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from scalelm import compat
from scalelm.batch import Batch
from scalelm.config import Config
from scalelm.model.build import canonical_parameters
from scalelm.model.gpt import hidden_states
from scalelm.objectives.base import Objective, Output
from scalelm.objectives.tokens import token_logps
from scalelm.parallel import state
from scalelm.parallel.grads import sum_sequence_parallel_grads
from scalelm.parallel.state import OptimizerFactory
from scalelm.parallel.topology import Layout, MegatronMPU


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
        # no "steps_per_print": DeepSpeed's own progress lines stay off (None), not just rare
        "wall_clock_breakdown": False,
    }


def model_inputs(batch: Batch) -> list[torch.Tensor]:
    """What the model takes from a batch: input_ids, and for packed documents their position_ids and document_ids."""
    return [batch["input_ids"]] + ([batch["position_ids"], batch["document_ids"]] if "document_ids" in batch else [])


@dataclass
class Outcome:
    """A pass over micro-batches: the loss over the whole batch (every data-parallel rank's), the objective's units
    in it (None on a rank that read none) and its metrics, each a mean over those units."""

    loss: float
    unit: str  # what the objective's loss is a mean over (targets, pairs, texts)
    units: int | None
    metrics: dict[str, float]


@dataclass
class Counters:
    """What the next step depends on besides tensors, as checkpoints keep it (manifest "counters")."""

    adam_steps: int  # the optimizer's step count (AdamW's bias correction's t)
    schedule_step: int  # optimizer steps applied: the schedule's position
    global_steps: int  # DeepSpeed's own counts
    global_samples: int
    skipped_steps: int
    loss_scaler: dict | None  # fp16's dynamic loss scale and its counters

    def as_dict(self) -> dict:
        return asdict(self)


class Engine:
    """A model on this rank, wrapped by DeepSpeed; see the module docstring. Without an `optimizer` factory (and
    `schedule`), no optimizer at all: the weights are the model's, loaded through `scatter`."""

    def __init__(self, cfg: Config, layout: Layout, model: torch.nn.Module, objective: Objective,
                 optimizer: OptimizerFactory | None = None, schedule: Callable[[int], float] | None = None):
        self.pipeline = layout.pipeline > 1
        self.objective, self.layout, self.factory, self.schedule = objective, layout, optimizer, schedule
        self.grad_accum = grad_accum_steps(cfg, layout)
        if self.pipeline:
            model.loss_fn = self._pipeline_loss
        if cfg.parallel.sequence_parallel:
            sum_sequence_parallel_grads(model, parallel_state.get_tensor_model_parallel_group())
        model.to(layout.device)
        built = optimizer(model) if optimizer is not None else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=built, config=deepspeed_config(cfg, layout, zero=built is not None),
            mpu=None if self.pipeline else MegatronMPU())
        self.schedule_step = 0
        if built is not None:
            # the optimizer's state exists from the start, so checkpoints can read and load it before any step
            state.init_optimizer_state(self.optimizer, optimizer)
            self._groups = built.param_groups  # DeepSpeed steps the optimizer's own groups
            self._base_lrs = [group["lr"] for group in self._groups]
            self._set_lr()
            if self.pipeline:
                compat.defer_pipeline_step(self.engine)
        # the first and last pipeline stages read the micro-batches (inputs, targets); the others never see them
        self.reads_data = not self.pipeline or self.engine.is_first_stage() or self.engine.is_last_stage()
        self.computes_loss = not self.pipeline or self.engine.is_last_stage()
        self._sums: torch.Tensor | None = None  # the step's metric sums, added up by each micro-batch's loss
        self._units = 0
        self._fields: list[str] = []  # what the last pipeline stage is handed of each batch
        self._capture = None  # (output, temperature, values) while forward_only runs the pipeline

    @property
    def module(self) -> torch.nn.Module:
        """The model this engine wraps (a GPT, or this rank's PipelineModule)."""
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.layout.device

    # ------------------------------------------------------------------------------------------------ the step

    def forward_backward(self, micro: Sequence[Batch]) -> Outcome:
        """The step's grad_accum micro-batches forward and backward; the gradients wait for `optimizer_step`."""
        micro = self._scaled(micro, self.grad_accum)
        if self.pipeline:
            with self._emitting(self.objective.output):
                loss = self.engine.train_batch(data_iter=self._pipeline_batches(micro, self.objective.fields)).item()
            return self._outcome(loss)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            loss = self._micro_loss(batch)
            self.engine.backward(loss)
            if i < len(micro) - 1:
                self.engine.step()  # within the accumulation: DeepSpeed only counts it; the last is optimizer_step's
            total += loss.detach().float()
        return self._outcome(self._data_parallel_mean(total / self.grad_accum))

    def optimizer_step(self) -> None:
        """Apply the step's gradients (or skip them, when not finite), and move the schedule on if applied."""
        if self.pipeline:
            compat.pipeline_step(self.engine)
        else:
            self.engine.step()
        if self.engine.was_step_applied():
            self.schedule_step += 1
            self._set_lr()

    @torch.no_grad()
    def evaluate(self, micro: Sequence[Batch], count: int) -> Outcome:
        """The objective's loss and metrics over `count` micro-batches per data-parallel rank, weights untouched."""
        micro = self._scaled(micro, count)
        if self.pipeline:
            with self._emitting(self.objective.output):
                loss = self.engine.eval_batch(self._pipeline_batches(micro, self.objective.fields), num_micro_batches=count)
            return self._outcome(loss.item())
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for batch in micro:
            total += self._micro_loss(batch).float()
        self.engine.train()
        return self._outcome(self._data_parallel_mean(total / count))

    def forward_only(self, micro: Sequence[Batch], count: int, output: Output,
                     temperature: float = 1.0) -> list[torch.Tensor | None]:
        """`output` (objectives.Output) of each of `count` micro-batches, the model in eval mode and without gradients:
        on the ranks that compute the loss (the last pipeline stage), None on a first stage, [] on the others.
        Log-probs are of softmax(logits / temperature)."""
        fields = list(dict.fromkeys([*self.objective.fields, *(["labels"] if output is Output.LOGPROBS else [])]))
        with self._emitting(output), torch.no_grad():
            if self.pipeline:
                out: list[torch.Tensor] = []
                self._capture = (output, temperature, out)
                micro = [b if "scale" in b else {**b, "scale": torch.ones(())} for b in micro]  # the targets carry one
                try:
                    self.engine.eval_batch(self._pipeline_batches(micro, fields), num_micro_batches=count)
                finally:
                    self._capture = None
                return out if self.computes_loss else [None] * len(micro)
            training = self.engine.training
            self.engine.eval()
            out = []
            for batch in micro:
                on_device = self._on_device(batch)
                out.append(self._wanted(self.engine(*model_inputs(on_device)), on_device, output, temperature))
            self.engine.train(training)
            return out

    # NOTE: why units are counted before the first forward pass. Each micro-batch's loss is its sum over units
    # times scale = micro-batches x data-parallel ranks / (units of the whole batch), so the step's loss is
    # Σ sums / Σ units however the units fall over micro-batches and ranks (SFT's masks make them uneven).

    def _scaled(self, micro: Sequence[Batch], count: int) -> list[dict]:
        """The micro-batches, each with its `scale`; collective over the data-parallel group."""
        self._sums = None
        if not self.reads_data:
            return []
        units = torch.tensor(float(sum(self.objective.units(b) for b in micro)), device=self.device)
        if self.layout.data > 1:
            dist.all_reduce(units, group=parallel_state.get_data_parallel_group())
        self._units = int(units.item())
        scale = torch.tensor(count * self.layout.data / max(self._units, 1), dtype=torch.float32)
        return [{**b, "scale": scale} for b in micro]

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}

    def _wanted(self, computed: torch.Tensor, batch: dict, output: Output, temperature: float = 1.0) -> torch.Tensor:
        """What the model computed (logits, scores or hidden states) as `output` asks for it."""
        if output is not Output.LOGPROBS:
            return computed
        return token_logps(computed.float() / temperature if temperature != 1 else computed, batch["labels"])

    def _emitting(self, output: Output):
        """The model ends in its head, or for hidden states before it."""
        return hidden_states(self.module) if output is Output.HIDDEN else contextlib.nullcontext()

    def _micro_loss(self, batch: dict) -> torch.Tensor:
        on_device = self._on_device(batch)
        with self._emitting(self.objective.output):
            computed = self.engine(*model_inputs(on_device))
        loss_sum, metrics = self.objective(self._wanted(computed, on_device, self.objective.output), on_device)
        self._add_metrics(metrics)
        return loss_sum * on_device["scale"]

    def _pipeline_batches(self, micro: list[dict], fields: Sequence[str]) -> Iterator[tuple]:
        """(inputs, targets) pairs as DeepSpeed's pipeline takes them: the first stage gets the inputs, the
        last the objective's fields and the scale."""
        self._fields = [k for k in fields if micro and k in micro[0]]
        for batch in micro:
            inputs = model_inputs(batch)
            yield (inputs[0] if len(inputs) == 1 else tuple(inputs)), (*(batch[k] for k in self._fields), batch["scale"])

    def _pipeline_loss(self, computed: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        *fields, scale = targets
        batch = dict(zip(self._fields, fields))
        if self._capture is not None:  # forward_only: keep what was asked for, and give DeepSpeed a loss to average
            output, temperature, out = self._capture
            out.append(self._wanted(computed, batch, output, temperature))
            return torch.zeros((), device=computed.device)
        loss_sum, metrics = self.objective(self._wanted(computed, batch, self.objective.output), batch)
        self._add_metrics(metrics)
        return loss_sum * scale

    def _add_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        if self.objective.metrics:
            values = torch.stack([metrics[k].detach().float() for k in self.objective.metrics])
            self._sums = values if self._sums is None else self._sums + values

    def _outcome(self, loss: float) -> Outcome:
        """The pass's units and metrics (sums over the batch / units) beside its loss; collective."""
        names = self.objective.metrics
        metrics: dict[str, float] = {}
        if names:
            sums = self._sums if self.computes_loss and self._sums is not None else \
                torch.zeros(len(names), device=self.device)
            if self.computes_loss and self.layout.data > 1:
                dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
            if self.pipeline:  # from the last stage to every stage: the others add zeros
                dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
            if self.reads_data:
                metrics = {k: v / max(self._units, 1) for k, v in zip(names, sums.tolist())}
        return Outcome(loss, self.objective.unit, self._units if self.reads_data else None, metrics)

    def _data_parallel_mean(self, loss: torch.Tensor) -> float:
        if self.layout.data > 1:
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= self.layout.data
        return loss.item()

    def _set_lr(self) -> None:
        for group, base in zip(self._groups, self._base_lrs):
            group["lr"] = base * self.schedule(self.schedule_step)

    # ------------------------------------------------------------------------------------------ what it reports

    @property
    def step_applied(self) -> bool:
        """False when DeepSpeed skipped the last step (gradients not finite, or an fp16 overflow)."""
        return self.engine.was_step_applied()

    @property
    def lr(self) -> float:
        """The learning rate the next step takes."""
        return self._groups[0]["lr"]

    @property
    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping (None where DeepSpeed keeps none)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # --------------------------------------------------------------------------------------------- its state

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under single-process names, in the order every rank of a stage agrees on."""
        return canonical_parameters(self.module)

    def states(self, param: torch.nn.Parameter) -> tuple[str, ...]:
        """The states `param` has: its weight ("param") and, when it trains, the optimizer's (AdamW: exp_avg and
        exp_avg_sq); a frozen one (LoRA's base) its weight alone."""
        return state.states(param, self.factory)

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Every state a trained parameter has (`states`)."""
        return ("param", *(self.factory.states if self.factory is not None else ()))

    def gather(self, param: torch.nn.Parameter, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole fp32 `key` state of `param`, into `out` if given; collective."""
        return state.gather(param, key, self.optimizer, out)

    def whole_shape(self, param: torch.nn.Parameter) -> tuple[int, ...]:
        return state.whole_shape(param)

    def scatter(self, param: torch.nn.Parameter, key: str, whole: torch.Tensor) -> None:
        """Set the `key` state of `param` from its whole fp32 value; collective under ZeRO-3."""
        state.scatter(param, key, whole, self.optimizer)

    def counters(self) -> Counters:
        return Counters(adam_steps=state.optimizer_steps(self.optimizer, self.factory), schedule_step=self.schedule_step,
                        **compat.engine_counts(self.engine), loss_scaler=compat.loss_scaler_state(self.optimizer))

    def load_counters(self, saved: dict) -> None:
        """Counters as a checkpoint saved them. Only the position in the schedule is restored: the schedule itself
        is the config's, so a resumed run may change optim.lr or the decay."""
        counters = Counters(**saved)
        state.set_optimizer_steps(self.optimizer, self.factory, counters.adam_steps)
        self.schedule_step = counters.schedule_step
        self._set_lr()
        compat.set_engine_counts(self.engine, {k: getattr(counters, k) for k in compat.ENGINE_COUNTS})
        compat.set_loss_scaler_state(self.optimizer, counters.loss_scaler)
