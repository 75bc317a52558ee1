"""What `scalelm plan` prints: a plan (parallel/plan.py) as lines for a terminal, and when it does not fit, the
layouts of the same model and batch that do."""

from __future__ import annotations

import copy
import itertools

from scalelm.config import Config
from scalelm.errors import ConfigError
from scalelm.model.spec import padded_vocab_size
from scalelm.parallel.plan import GPUS, HEADROOM, GiB, Plan, Term, plan


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
    where = {"only": "", "first": " on the first pipeline stage", "last": " on the last pipeline stage"}[mem.stage]
    lines = [
        f"cluster: {nodes} nodes x {gpus_per_node} {gpu} = {p.world} GPUs, {gpu_bytes / GiB:.0f} GiB each",
        f"model: {p.parameters / 1e9:.2f}B parameters ({m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, "
        f"vocabulary {padded_vocab_size(m.vocab_size):,} padded), sequences of {t.seq_len}",
        *([f"trainable: {p.trainable / 1e6:,.2f}M parameters ({p.trainable / p.parameters:.2%}), LoRA rank {lora.rank} on "
           f"{', '.join(lora.targets)}; the rest frozen"] if (lora := p.cfg.finetune.lora) else []),
        f"layout: tensor {par.tensor} x pipeline {par.pipeline} x data {data}, ZeRO-{par.zero_stage}"
        + (", sequence parallel" if par.sequence_parallel else "") + f", {t.precision}, recompute {t.activation_checkpointing}",
        f"batch: {t.global_batch_size} sequences = micro-batch {t.micro_batch_size} x {p.micro_batches} x data {data}"
        + (f"; pipeline bubble {p.bubble:.1%}" if par.pipeline > 1 else ""),
        f"memory per GPU{where}, at its peak (held for the whole run + the {mem.peak_moment}):",
        *_terms(mem.held),
        *_terms(mem.moments[mem.peak_moment]),
        f"  {'total':20s} {mem.total / GiB:8.2f} GiB of {gpu_bytes / GiB:.0f} GiB: "
        + ("fits" if p.fits(gpu_bytes) else f"DOES NOT FIT (the plan allows {HEADROOM:.0%} of a GPU)"),
        "  other moments: " + ", ".join(f"{name} {(mem.held_bytes + mem.moment_bytes(name)) / GiB:.2f} GiB"
                                        for name in mem.moments if name != mem.peak_moment),
        "  activations without recomputation {:.2f} GiB, with full recomputation {:.2f} GiB".format(
            mem.activations["none"] / GiB, mem.activations["full"] / GiB),
        *([f"host memory per GPU: {mem.snapshot / GiB:.2f} GiB pinned, the copy a checkpoint is written from in the "
           f"background, kept between saves (checkpoint.background)"] if mem.snapshot else []),
        f"compute: {p.flops_per_step / 1e15:,.1f} PFLOP per step; at {mfu:.0%} MFU about {step:,.2f} s per step, "
        f"{t.global_batch_size * t.seq_len / step:,.0f} tokens/s",
    ]
    return lines


def _terms(terms: list[Term]) -> list[str]:
    return [f"  {term.name:20s} {term.bytes / GiB:8.2f} GiB" + (f"  {term.what}" if term.what else "") for term in terms]
