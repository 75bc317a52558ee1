"""`scalelm plan`: will this config run on that cluster, how much memory per GPU, how fast, and if it does not
fit, which layouts would. Arithmetic only: nothing is allocated, no process group.

Memory per GPU, for the most loaded pipeline stage (Ψ: the parameters that GPU holds, after the
tensor- and pipeline-parallel split; d: data-parallel ranks):

    weights      Ψ × 2 bytes (bf16/fp16) or 4 (fp32)                 ZeRO-3: / d
    gradients    Ψ × 4 under ZeRO-1 (fp32 accumulation), else 2 or 4  ZeRO-2 and 3: / d
    optimizer    Ψ × 12 (fp32 master weights and AdamW's two moments), / d at every ZeRO stage
    activations  per layer and micro-batch, in 2-byte units (Korthikanti et al. 2022, without the
                 s×s attention scores, which torch SDPA does not keep): s·b·h·(10 + 24/t) bytes, with
                 sequence parallelism s·b·h·34/t; full recomputation keeps only each layer's input,
                 2·s·b·h (/t with sequence parallelism). Times the micro-batches in flight on the
                 first stage, min(pipeline, micro-batches), plus the fp32 logits of one micro-batch.

fp32 activations count double. The estimate leaves out the engines' communication buckets and
the allocator's slack; on the CPU it is tested against measured peak memory (within 20%).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from scalelm.config import Config, validate
from scalelm.errors import ConfigError
from scalelm.model.spec import padded_vocab_size
from scalelm.train.metrics import flops_per_token_megatron, parameter_count

GiB = 2**30
# name: (memory in bytes, dense bf16 peak FLOP/s)
GPUS = {"a100": (80 * 2**30, 312e12), "h100": (80 * 2**30, 989e12), "h200": (141 * 10**9, 989e12)}
HEADROOM = 0.9  # of a GPU's memory the plan lets a run use: the rest is the CUDA context, NCCL and fragmentation


@dataclass
class Memory:
    """Bytes per GPU on the most loaded pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class Plan:
    cfg: Config
    world: int
    parameters: int
    memory: Memory
    micro_batches: int
    bubble: float
    flops_per_step: float

    def fits(self, gpu_bytes: float) -> bool:
        return self.memory.total <= HEADROOM * gpu_bytes

    def step_seconds(self, peak_flops: float, mfu: float) -> float:
        return self.flops_per_step / (self.world * peak_flops * mfu)


def plan(cfg: Config, world: int) -> Plan:
    """The plan of `cfg` on `world` GPUs; ConfigError when the layout does not divide."""
    cfg = copy.deepcopy(cfg)
    validate(cfg, world_size=world)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    vocab = padded_vocab_size(m.vocab_size)
    data = world // (p.tensor * p.pipeline)
    micro_batches = t.global_batch_size // (t.micro_batch_size * data)
    positions = m.max_position_embeddings * m.hidden_size if m.position_embedding == "learned" else 0
    total = parameter_count(m, vocab) + positions
    layer = (parameter_count(m, vocab) - parameter_count(_no_layers(m), vocab)) // m.num_layers
    stage_layers = m.num_layers // p.pipeline
    # the most loaded stage: the first (embedding) or, with an untied head, possibly the last
    ends = vocab * m.hidden_size + positions if p.pipeline > 1 else total - m.num_layers * layer
    held = (stage_layers * layer + ends) / p.tensor

    bytes_train = 4 if t.precision == "fp32" else 2
    weights = held * bytes_train / (data if p.zero_stage == 3 else 1)
    gradients = held * 4 if p.zero_stage == 1 else held * bytes_train / data
    optimizer = held * 12 / data

    s, b, h = t.seq_len, t.micro_batch_size, m.hidden_size
    if t.activation_checkpointing == "full":
        per_layer = 2 * s * b * h / (p.tensor if p.sequence_parallel else 1)
    elif p.sequence_parallel:
        per_layer = s * b * h * 34 / p.tensor
    else:
        per_layer = s * b * h * (10 + 24 / p.tensor)
    per_layer *= 2 if t.precision == "fp32" else 1
    in_flight = min(p.pipeline, micro_batches)
    logits = 2 * s * b * vocab / p.tensor * 4  # fp32 logits and their gradient, one micro-batch
    activations = stage_layers * per_layer * in_flight + logits

    flops = flops_per_token_megatron(m, vocab, s, t.activation_checkpointing == "full") * t.global_batch_size * s
    bubble = (p.pipeline - 1) / (micro_batches + p.pipeline - 1)
    return Plan(cfg, world, total, Memory(weights, gradients, optimizer, activations, in_flight), micro_batches,
                bubble, flops)


def layouts_that_fit(cfg: Config, world: int, gpus_per_node: int, gpu_bytes: float, limit: int = 3) -> list[tuple[str, Plan]]:
    """Up to `limit` layouts of `cfg` on `world` GPUs that fit, the cheapest first: least recomputation, then the
    lowest ZeRO stage (least communication), then the fewest model-parallel ranks, tensor parallelism within a node."""
    found = []
    tensors = [x for x in (1, 2, 4, 8, 16) if x <= gpus_per_node]
    stages = [x for x in range(1, cfg.model.num_layers + 1) if cfg.model.num_layers % x == 0]
    recompute_cost = {"none": 0, "selective": 1, "full": 2}
    for recompute, tp, pp, zero in itertools.product(recompute_cost, tensors, stages, (1, 2, 3)):
        if world % (tp * pp) or (pp > 1 and zero != 1):
            continue
        trial = copy.deepcopy(cfg)
        trial.parallel.tensor, trial.parallel.pipeline, trial.parallel.zero_stage = tp, pp, zero
        trial.parallel.sequence_parallel = tp > 1
        trial.train.activation_checkpointing = recompute
        try:
            candidate = plan(trial, world)
        except ConfigError:
            continue
        if candidate.fits(gpu_bytes):
            overrides = (f"parallel.tensor={tp} parallel.pipeline={pp} parallel.zero_stage={zero} "
                         f"parallel.sequence_parallel={str(tp > 1).lower()} train.activation_checkpointing={recompute}")
            found.append(((recompute_cost[recompute], zero, tp * pp, tp), overrides, candidate))
    found.sort(key=lambda item: item[0])  # (recompute, ZeRO stage, model-parallel size, tensor)
    return [(overrides, candidate) for _, overrides, candidate in found[:limit]]


def describe(p: Plan, nodes: int, gpus_per_node: int, gpu: str, mfu: float) -> list[str]:
    """The plan as lines for a terminal."""
    m, par, t = p.cfg.model, p.cfg.parallel, p.cfg.train
    gpu_bytes, peak = GPUS[gpu]
    mem = p.memory
    data = p.world // (par.tensor * par.pipeline)
    step = p.step_seconds(peak, mfu)
    lines = [
        f"cluster: {nodes} nodes x {gpus_per_node} {gpu} = {p.world} GPUs, {gpu_bytes / GiB:.0f} GiB each",
        f"model: {p.parameters / 1e9:.2f}B parameters ({m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, "
        f"vocabulary {padded_vocab_size(m.vocab_size):,} padded), sequences of {t.seq_len}",
        f"layout: tensor {par.tensor} x pipeline {par.pipeline} x data {data}, ZeRO-{par.zero_stage}"
        + (", sequence parallel" if par.sequence_parallel else "") + f", {t.precision}, recompute {t.activation_checkpointing}",
        f"batch: {t.global_batch_size} sequences = micro-batch {t.micro_batch_size} x {p.micro_batches} x data {data}"
        + (f"; pipeline bubble {p.bubble:.1%}" if par.pipeline > 1 else ""),
        "memory per GPU (most loaded pipeline stage):",
        f"  weights      {mem.weights / GiB:8.2f} GiB",
        f"  gradients    {mem.gradients / GiB:8.2f} GiB",
        f"  optimizer    {mem.optimizer / GiB:8.2f} GiB (fp32 master weights and AdamW moments over {data} data-parallel ranks)",
        f"  activations  {mem.activations / GiB:8.2f} GiB ({mem.in_flight} micro-batch{'es' if mem.in_flight > 1 else ''} in flight)",
        f"  total        {mem.total / GiB:8.2f} GiB of {gpu_bytes / GiB:.0f} GiB: "
        + ("fits" if p.fits(gpu_bytes) else f"DOES NOT FIT (the plan allows {HEADROOM:.0%} of a GPU)"),
        f"compute: {p.flops_per_step / 1e15:,.1f} PFLOP per step; at {mfu:.0%} MFU about {step:,.2f} s per step, "
        f"{t.global_batch_size * t.seq_len / step:,.0f} tokens/s",
    ]
    return lines


def _no_layers(model):
    shallow = copy.copy(model)
    shallow.num_layers = 0
    return shallow
