"""Every place scalelm reaches into another library's internals, and nowhere else: a private field read or set,
a function replaced. Each names the version it was written against; tests/parallel/test_compat.py fails, naming
the field, when an upgrade moves one. The rest of scalelm calls these functions, never the internals.

Written against torch 2.13.0, DeepSpeed 0.19.8 and megatron-core 0.16.1.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------- torch 2.13.0


def shutdown_workers(batches: Any) -> None:
    """Stop a DataLoader iterator's worker processes now: left to the garbage collector, their shutdown waits out
    torch's join timeouts (5 s a worker). torch 2.13 has no public close() for the iterator, only
    `_MultiProcessingDataLoaderIter._shutdown_workers`."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def default_store() -> dist.Store:
    """The process group's rendezvous store (torch 2.13: `distributed_c10d._get_default_store`), which every rank
    reaches without a collective."""
    return dist.distributed_c10d._get_default_store()


# ------------------------------------------------------------------------------- megatron-core 0.16.1 on a CPU

# What use_cpu() replaces (tests/parallel/test_compat.py checks that it covers every CUDA call of megatron-core's
# files that scalelm's layers run).
REDIRECTED = (
    "torch.cuda.current_device",
    "torch.cuda.get_rng_state",
    "torch.cuda.set_rng_state",
    "torch.cuda.random.get_rng_state",
    "torch.cuda.random.set_rng_state",
    "torch.cuda.manual_seed",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
)


def use_cpu() -> None:
    """Point megatron-core's CUDA-only calls at the CPU (idempotent). Call before building layers.

    megatron-core 0.16.1 builds and runs its tensor-parallel layers on the CPU once these answer for the CPU:
    torch.cuda.current_device (where tensors are made), torch.cuda's RNG state functions and manual_seed (the
    model-parallel RNG tracker forks dropout streams by saving and restoring "the CUDA generator"; on the CPU that
    is torch's default one) and megatron's own wrappers of them (`tensor_parallel.random._get/_set_cuda_rng_state`).
    Layers must also be built with `use_cpu_initialization=True` and the fused kernels off
    (scalelm.model.spec.transformer_config does that on the CPU). On a GPU nothing here runs."""
    import megatron.core.tensor_parallel.random as megatron_random

    if megatron_random._get_cuda_rng_state is _cpu_rng_state:  # applied already: it only ever turns on
        return
    if torch.cuda.is_available():
        raise RuntimeError("use_cpu() redirects CUDA calls to the CPU and must not run where CUDA is in use")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = torch.cuda.random.set_rng_state = _set_cpu_rng_state
    # NOTE: megatron's tracker seeds a stream by seeding "the CUDA generator" between a save and a restore of its
    # state; with the CPU generator standing in, seeding it is exactly that.
    torch.cuda.manual_seed = torch.manual_seed
    megatron_random._get_cuda_rng_state = _cpu_rng_state
    megatron_random._set_cuda_rng_state = _set_cpu_rng_state
    # NOTE: with one generator standing in for both, every dropout inside a tracker fork "changes the CPU RNG
    # state", and megatron logs a warning each time. The streams are still kept apart: the fork saves the
    # generator's state before and restores it after.
    logging.getLogger(megatron_random.__name__).setLevel(logging.ERROR)


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(state)


# ------------------------------------------------------------------------- DeepSpeed 0.19.8: ZeRO's parameters


def zero3_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 partitions `param` (it then carries `ds_id`, `ds_shape` and `ds_numel`)."""
    return hasattr(param, "ds_id")


_HELD = -1  # a submodule id no module has: while it is among a parameter's active submodules, ZeRO-3 keeps it whole


@contextmanager
def zero3_whole(model: torch.nn.Module, optimizer: Any) -> Iterator[None]:
    """Every ZeRO-3 partitioned parameter of `model` whole on every rank for the duration (one all-gather over the
    data-parallel group in, one partition out; collective), and kept whole while the model's layers are called in
    any order, any number of times: each data-parallel rank may then run its own number of forward passes (a decoder
    does). DeepSpeed 0.19.8: ZeRO-3's hooks release a parameter after each submodule's forward unless a submodule
    still uses it (`ds_active_sub_modules`; one that is never called is marked as using every parameter), and its
    parameter coordinator (`optimizer.parameter_offload`) may be recording a trace of the module calls, which every
    rank must record alike: the trace is dropped first (`_invalidate_trace`), so that the calls here are not in it and
    the next training step records a new one."""
    params = [p for p in model.parameters() if zero3_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    coordinator = optimizer.parameter_offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.add(_HELD)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_HELD)


def whole_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The shape of `param` before ZeRO-3 partitioned it (this rank's shape otherwise)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def whole_numel(param: torch.nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())


def has_master(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps an fp32 master of `param` (ZeRO 1-3, or the bf16 optimizer)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def in_fragments(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps the fp32 master of `param` in fragments over the data-parallel group (ZeRO-1/2, the
    bf16 optimizer): `_hp_mapping`, set on the parameter by `link_hp_params`."""
    return hasattr(param, "_hp_mapping") and not hasattr(param, "ds_id")


def fragment(param: torch.nn.Parameter) -> tuple[tuple[int, int] | None, Callable[[str | None], torch.Tensor] | None, Any]:
    """Where this rank's fragment of `param` lies in the flattened parameter, (start, numel), or None where this rank
    holds none of it; a function reading that fragment of the fp32 master (None) or of an optimizer state (its key);
    and the data-parallel group the fragments are spread over: DeepSpeed's `param._hp_mapping` (its
    `lp_fragment_address` and `get_hp_fragment`) and `param._dp_group`."""
    mapping = param._hp_mapping
    if mapping is None:
        return None, None, param._dp_group
    address = mapping.lp_fragment_address
    return (address.start, address.numel), mapping.get_hp_fragment, param._dp_group


def link_optimizer_state(optimizer: Any) -> None:
    """DeepSpeed links each parameter's fragment to the optimizer's state at the first step (ZeRO-1/2 and bf16:
    `_lazy_init_hp_params_optimizer_state`); link it now, so that a checkpoint can read and load it before any step."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def flat_partitions(optimizer: Any) -> list[torch.Tensor] | None:
    """ZeRO-3's fp32 flat partitions, the tensors its torch optimizer steps (`fp32_partitioned_groups_flat`; its
    param_groups are empty between steps); None under other stages."""
    return getattr(optimizer, "fp32_partitioned_groups_flat", None)


# ------------------------------------------------------------------------- DeepSpeed 0.19.8: the engine's counts

ENGINE_COUNTS = ("global_steps", "global_samples", "skipped_steps")


def engine_counts(engine: Any) -> dict[str, int]:
    """DeepSpeedEngine's step, sample and skipped-step counts (plain attributes it increments in _take_model_step)."""
    return {name: getattr(engine, name) for name in ENGINE_COUNTS}


def set_engine_counts(engine: Any, counts: dict[str, int]) -> None:
    for name in ENGINE_COUNTS:
        setattr(engine, name, counts[name])


def loss_scaler_state(optimizer: Any) -> dict | None:
    """The numbers of the optimizer's loss scaler (fp16's dynamic scale, its hysteresis and counters; a static
    scaler of 1 otherwise), or None where it has none: every int, float and bool attribute of
    `optimizer.loss_scaler`."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None:
        return None
    return {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}


def set_loss_scaler_state(optimizer: Any, state: dict | None) -> None:
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and state:
        for key, value in state.items():
            setattr(scaler, key, value)


# ---------------------------------------------------------------- DeepSpeed 0.19.8: the pipeline's optimizer step


def defer_pipeline_step(engine: Any) -> None:
    """Make the pipeline engine's `train_batch` accumulate gradients and stop before the optimizer step, which
    `pipeline_step` then takes: its TrainSchedule (`engine._train_schedule()`) ends in ReduceTiedGrads, ReduceGrads
    and OptimizerStep instructions, and the last is left out."""
    make = engine._train_schedule
    engine._train_schedule = lambda: _WithoutStep(make())


def pipeline_step(engine: Any) -> None:
    """The optimizer step `defer_pipeline_step` left out: `PipelineEngine._exec_optimizer_step`, which runs it at the
    gradient-accumulation boundary (and counts it, skips it on overflow, steps an lr scheduler)."""
    engine._exec_optimizer_step()


class _WithoutStep:
    """A pipeline schedule (DeepSpeed's PipeSchedule) without its OptimizerStep instructions."""

    def __init__(self, schedule: Any):
        self.schedule = schedule

    def num_pipe_buffers(self) -> int:
        return self.schedule.num_pipe_buffers()

    def __iter__(self):
        from deepspeed.runtime.pipe.schedule import OptimizerStep

        for commands in self.schedule:
            yield [c for c in commands if not isinstance(c, OptimizerStep)]

# ----------------------------------------------------------------------------------------- megatron-core 0.16.1


@contextmanager
def sequence_parallel_off(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` without sequence parallelism for the block (tensor parallelism stays): every module that reads
    a `sequence_parallel` flag in its forward (megatron-core's ColumnParallelLinear and RowParallelLinear, scalelm's
    embedding, heads and LoRA adapters) has it false, so activations stay whole between the layers. The weights are
    the same; only which collectives run changes. For decoding, whose one-token steps do not split over ranks."""
    flagged = [m for m in model.modules() if getattr(m, "sequence_parallel", None) is True]
    for module in flagged:
        module.sequence_parallel = False
    try:
        yield
    finally:
        for module in flagged:
            module.sequence_parallel = True
